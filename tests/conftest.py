"""Shared fixtures: a tiny params set (the default params.yaml, shrunk) and a project copy."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def set_keys(raw: dict, **changes) -> dict:
    """Set dotted keys (`transfer.optim.patience=5`) in a raw params mapping, in place."""
    for key, value in changes.items():
        *path, leaf = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[leaf] = value
    return raw


def tiny_params(**overrides) -> dict:
    """The default params with everything shrunk so a whole pipeline runs in about a minute."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"]["datasets"] = {
        "mnist_0to4": {"source": "mnist5k", "classes": [0, 1, 2, 3, 4], "max_per_class": 40},
        "mnist_5to9": {"source": "mnist5k", "classes": [5, 6, 7, 8, 9], "max_per_class": 40},
        "uci_digits": {"source": "uci_digits", "max_per_class": 40},
    }
    p["data"]["split"] = {"train": 0.7, "val": 0.15, "test": 0.15}
    p["pretrain"]["source"] = "mnist_0to4"
    p["data"]["input_size"] = 16
    p["model"]["width"] = 4
    p["trainer"]["progress_bar"] = False
    p["trainer"]["threads"] = 1
    p["pretrain"]["optim"]["max_epochs"] = 2
    p["transfer"]["optim"]["max_epochs"] = 2
    p["seeds"] = [0]                    # one run per arm; BUILT_PARAMS exercises seeds and the lr search
    p["transfer"]["lr_search"] = {"start": [0.005], "step": 3.0, "low": 0.005, "high": 0.005, "prune_warmup": 0}
    p["sweep"]["workers"] = 1           # tiny runs: spawning processes costs more than it saves
    p["transfer"]["workers"] = 1
    p["sweep"]["min_retrain"] = 1       # the Pareto set below the base's size alone
    p["adapter"]["placement"] = "all"
    p["adapter"]["groups"] = 2
    p["adapter"]["prune"] = {"amount": 0.5, "rounds": 2, "epochs": 1, "scope": "layer"}
    p["transfer"]["targets"] = ["mnist_5to9"]
    set_keys(p, **overrides)
    return p


def run_cli(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_project(dest: Path, params: dict) -> Path:
    """A git + DVC project with this repo's pipeline definition and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cli(["git", "init", "-q"], dest)
    run_cli(["git", "config", "user.email", "test@example.com"], dest)
    run_cli(["git", "config", "user.name", "test"], dest)
    run_cli([str(BIN / "dvc"), "init", "-q"], dest)
    run_cli([str(BIN / "dvc"), "config", "core.analytics", "false"], dest)
    run_cli(["git", "add", "-A"], dest)
    run_cli(["git", "commit", "-qm", "init"], dest)
    return dest


def backbone_with_bn_stats(arch, seed: int = 0, batch: int = 8):
    """A backbone whose BNs hold non-trivial affine parameters and running statistics (a few
    train-mode passes on random data), in eval mode: what export and adapter tests start from."""
    import torch
    import torch.nn as nn

    from pipeline.nn.backbones import build_backbone

    torch.manual_seed(seed)
    net = build_backbone(arch)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
        net.train()
        for _ in range(3):
            net(torch.randn(batch, arch.in_channels, arch.input_size, arch.input_size, generator=g) * 2 + 0.5)
    net.eval()
    return net


def run_in_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`pipeline ARGV` inside this interpreter (no 10 s of imports per call): exit code, stdout
    and stderr as a subprocess would give them; an escaping exception prints its traceback."""
    import contextlib
    import io
    import traceback

    from pipeline.cli import main

    out, err, old = io.StringIO(), io.StringIO(), Path.cwd()
    # Lightning's MLFlowLogger calls mlflow.set_tracking_uri, which MLflow 3 also writes to this
    # variable: an earlier in-process fit would point this command at that fit's store.
    uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old)
        if uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = uri
    return subprocess.CompletedProcess(["pipeline", *argv], code, out.getvalue(), err.getvalue())


def copy_project(src: Path, dest: Path) -> Path:
    """A private copy of a built project (git, DVC cache and outputs included)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


# The one fully built tiny pipeline that the slow tests share (built once per session):
# every stage of dvc.yaml on tiny params, with a 2-trial sweep.
BUILT_PARAMS = tiny_params(**{"seeds": [0, 1], "transfer.lr_search.start": [0.005, 0.01], "transfer.lr_search.step": 2.0,
                              "transfer.lr_search.high": 0.01, "sweep.n_trials": 2, "sweep.max_epochs": 1, "sweep.space.placement": ["last:1", "last:2"],
                              "sweep.space.groups": [2], "sweep.space.bits": [4, 8]})


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> tuple[Path, str, str]:
    """(root, stdout of the first `dvc repro`, stdout of a second one). Treat it as read-only:
    tests that change files work on `copy_project(root, ...)`."""
    root = make_project(tmp_path_factory.mktemp("built"), BUILT_PARAMS)
    first = run_cli([str(BIN / "dvc"), "repro"], root)
    second = run_cli([str(BIN / "dvc"), "repro"], root)
    return root, first.stdout, second.stdout


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Unit tests use tiny tensors: one intra-op thread is as fast and immune to a busy 2-core
    machine. (Subprocesses, i.e. the pipeline runs, set their own threads from params.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> dict:
    return copy.deepcopy(tiny_params())
