"""The README stays true: its DAG is what `dvc dag --mermaid` prints, its params snippet is
params.yaml's, every `pipeline` command and flag it names exists, and the quick start is the
Makefile's and CI's."""

from __future__ import annotations

import re
import subprocess

import yaml

from conftest import BIN, ROOT

README = (ROOT / "README.md").read_text()


def _block(after: str, lang: str) -> str:
    start = README.index(f"```{lang}\n", README.index(after)) + len(f"```{lang}\n")
    return README[start:README.index("```", start)]


def test_dag_is_what_dvc_dag_prints():
    printed = subprocess.run([str(BIN / "dvc"), "dag", "--mermaid"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert _block("## The pipeline", "mermaid").strip() == printed.strip()


def test_adapter_snippet_is_params_yaml():
    shown = yaml.safe_load(_block("The adapter section:", "yaml"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert shown == {"adapter": params["adapter"]}


def test_every_pipeline_command_and_flag_exists():
    from pipeline.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    uses = re.findall(r"\bpipeline (?:--params \S+ )?([a-z_]+)((?: [^`\n]*)?)", README)
    named = {cmd for cmd, _ in uses if cmd in subparsers}
    assert named == set(subparsers), f"README never shows: {set(subparsers) - named}"
    for cmd, rest in uses:
        if cmd not in subparsers:
            continue
        options = {o for a in subparsers[cmd]._actions for o in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
            assert flag in options, f"README: `pipeline {cmd}` has no {flag}"


def test_quick_start_is_the_makefile_and_ci():
    quick = _block("## Quick start", "bash")
    assert [line.split("#")[0].strip() for line in quick.strip().splitlines()] == ["make repro", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^repro:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "torch==2.13.0" in makefile
    assert re.search(r"^\s*make test\b", (ROOT / ".ci" / "run").read_text(), re.M)


def _table_after(text: str, heading: str) -> list[str]:
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_default_results_are_the_committed_reports():
    """The README's results table is report.md's runs table of the committed default run, word for
    word, so the numbers a reader sees are the ones the pipeline wrote."""
    report = (ROOT / "reports" / "report.md").read_text()
    assert _table_after(README, "## Default results") == _table_after(report, "## All transfer runs")
