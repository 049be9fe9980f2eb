"""dvc.yaml's deps are complete: every `pipeline` file a stage's command loads is one of its deps.

A code file missing from a stage's deps means `dvc repro` skips that stage after the file changes,
and the committed results silently come from the old code. Reading imports by eye misses the
indirect ones (pipeline.cli's own imports, a module's imports of config/io/paths), so the test
asks Python itself: each stage of dvc.yaml, as DVC expands it (one per foreach item and matrix
cell), runs its real command on a copy of the tiny built project under PYTHONPROFILEIMPORTTIME
(`python -X importtime`: every module loaded, local imports included, spawned workers too), and
every `pipeline` module in that list must be covered by a dep of that stage (a folder dep covers
the files under it). Package `__init__.py` files run too, so they count like any module.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BIN, ROOT, copy_project

# `import time: self [us] | cumulative | imported package`; nesting shows as leading spaces.
IMPORT_LINE = re.compile(r"^import time:\s*\d+\s*\|\s*\d+\s*\|\s*(?P<name>\S+)\s*$", re.M)
STAGE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Stage:
    name: str               # DVC's name: prepare@mnist_0to4, baseline@mnist_5to9-full, results, ...
    cmds: tuple[str, ...]   # the command(s) exactly as DVC runs them (shell)
    wdir: str               # relative to the project root
    deps: tuple[str, ...]   # dep paths relative to the project root


def resolved_stages(root: Path) -> list[Stage]:
    """Every pipeline stage of root/dvc.yaml, foreach/matrix expanded, from DVC itself (so the
    commands are the ones `dvc repro` runs, with the project's params substituted)."""
    from dvc.repo import Repo

    stages = []
    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            if not getattr(s, "cmd", None):  # .dvc files: data, no command
                continue
            cmds = (s.cmd,) if isinstance(s.cmd, str) else tuple(s.cmd)
            deps = tuple(os.path.relpath(d.fs_path, root) for d in s.deps)
            stages.append(Stage(s.name, cmds, os.path.relpath(s.wdir, root), deps))
    return stages


def loaded_pipeline_modules(stderr: str) -> set[str]:
    return {m["name"] for m in IMPORT_LINE.finditer(stderr)
            if m["name"] == "pipeline" or m["name"].startswith("pipeline.")}


def module_file(root: Path, module: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py under root (None: neither)."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(root)
    return None


def covered(path: Path, deps: tuple[str, ...]) -> bool:
    """A file dep covers exactly that file; a folder dep covers every file under it."""
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def stage_env(project: Path) -> dict:
    """The environment DVC gives a command (run_cli's), with the project's own `pipeline/` first
    on the path: the venv's editable install points at the repo, and the deps name the copy's files."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(project), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONPROFILEIMPORTTIME": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_stage(stage: Stage, project: Path) -> tuple[int, str]:
    """Run the stage's command(s) in `project` as DVC would (shell, stage wdir, stop at the first
    failure): (exit code, stderr of all of them)."""
    err = []
    for cmd in stage.cmds:
        proc = subprocess.run(cmd, shell=True, cwd=project / stage.wdir, env=stage_env(project),
                              capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
        err.append(proc.stderr)
        if proc.returncode != 0:
            return proc.returncode, "".join(err)
    return 0, "".join(err)


def stderr_tail(stderr: str, chars: int = 2000) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))[-chars:]


def check_stage(stage: Stage, built: Path, dest: Path) -> list[str]:
    """Problems of one stage (empty: its deps cover everything its command loaded)."""
    project = copy_project(built, dest)  # a private copy: the rerun writes outputs, MLflow runs, checkpoints
    code, stderr = run_stage(stage, project)
    if code != 0:
        return [f"stage '{stage.name}': `{' && '.join(stage.cmds)}` exited {code}:\n{stderr_tail(stderr)}"]
    modules = loaded_pipeline_modules(stderr)
    if "pipeline.cli" not in modules and any(c.split()[:1] == ["pipeline"] for c in stage.cmds):
        # the import list was not captured (or not read): an empty list would pass vacuously
        return [f"stage '{stage.name}': no `pipeline.cli` in the import-time list; stderr:\n{stderr_tail(stderr)}"]
    problems = []
    for module in sorted(modules):
        path = module_file(project, module)
        if path is None:
            problems.append(f"stage '{stage.name}': loads module {module} but no file of the project defines it")
        elif not covered(path, stage.deps):
            problems.append(f"stage '{stage.name}': loads {path.as_posix()} but its deps do not list it")
    return problems


def _imports_on_some_paths(node: ast.AST, conditional: bool = False):
    """(line, source) of each pipeline import (or import_module/__import__ call) under `node`
    that sits in a function, lambda or `if` (other than `if TYPE_CHECKING`)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from _imports_on_some_paths(ast.Module(body=child.orelse, type_ignores=[]), True)
            continue
        here = conditional or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.If))
        if here and isinstance(child, ast.ImportFrom) and (child.level or (child.module or "").split(".")[0] == "pipeline"):
            yield child.lineno, f"from {'.' * child.level}{child.module or ''} import ..."
        elif here and isinstance(child, ast.Import) and any(a.name.split(".")[0] == "pipeline" for a in child.names):
            yield child.lineno, f"import {', '.join(a.name for a in child.names)}"
        elif isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", None)) in ("import_module", "__import__"):
            yield child.lineno, ast.unparse(child)
        yield from _imports_on_some_paths(child, here)


def test_import_time_list_reads_this_python(tmp_path):
    """The parser's premise, checked fast on this interpreter: the import-time list names every
    `pipeline` module a command loads (parents and indirect imports included), and each maps to
    the project's own file (PYTHONPATH beats the editable install)."""
    project = tmp_path / "proj"
    shutil.copytree(ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import pipeline.paths, pipeline.config as c; print(c.__file__)"],
                          cwd=tmp_path, env=stage_env(project), capture_output=True, text=True, timeout=120, check=True)
    assert Path(proc.stdout.strip()) == project / "pipeline/config.py"
    modules = loaded_pipeline_modules(proc.stderr)
    assert {"pipeline", "pipeline.paths", "pipeline.config", "pipeline.errors"} <= modules  # errors: config's import
    assert module_file(project, "pipeline") == Path("pipeline/__init__.py")
    assert module_file(project, "pipeline.config") == Path("pipeline/config.py")
    assert covered(Path("pipeline/nn/binary.py"), ("pipeline/nn",))
    assert covered(Path("pipeline/stats.py"), ("pipeline/stats.py",))
    assert not covered(Path("pipeline/nn/binary.py"), ("pipeline/nn/binary", "pipeline/n", "pipeline/nn/binary.pyc"))


def test_pipeline_imports_run_on_every_path():
    """The stage runs below take one path through the code (a rerun resumes from its checkpoints,
    a complete sweep adds no trial). That path loads every `pipeline` module the stage could load
    only while pipeline modules import each other at module level: an import inside a function
    or a branch loads only when that code runs. pipeline/cli.py is the exception by design (each
    command imports its stage, and each stage's run exercises exactly its own); `if TYPE_CHECKING`
    blocks never run. Anything else must move to the top of its module, or the deps test must learn
    to follow it."""
    nested = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel != "pipeline/cli.py":
            nested += [f"{rel}:{line}: {text}" for line, text in _imports_on_some_paths(ast.parse(path.read_text(), rel))]
    assert not nested, "pipeline imports that load only on some paths:\n" + "\n".join(nested)


@pytest.mark.slow
def test_every_stage_lists_the_code_it_loads(built_project, tmp_path):
    """Each expanded stage reruns on its own copy of the built project (all inputs there; the
    fixture's outputs untouched), several side by side; one message lists every stage's problems."""
    built, _, _ = built_project
    stages = resolved_stages(copy_project(built, tmp_path / "_resolve"))  # Repo() may write under .dvc/
    assert stages, "no stages resolved from dvc.yaml"
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        reports = pool.map(lambda s: check_stage(s, built, tmp_path / re.sub(r"[^\w.-]", "_", s.name)), stages)
        problems = [p for report in reports for p in report]
    assert not problems, f"{len(problems)} problem(s) in dvc.yaml's deps:\n" + "\n".join(problems)
