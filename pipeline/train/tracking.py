"""The one place that decides where MLflow writes and which flat keys every run carries."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

from pipeline.config import Params, project_root
from pipeline.io import sha256

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the sweep's MLflow parent run


def main_root(root: Path | None = None) -> Path:
    """The project root; for `dvc exp run --temp`/`--queue` (a copy under .dvc/tmp/exps) the
    original project, so queued experiments land in the project's own MLflow store."""
    root = (root or project_root()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i: i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(params: Params) -> str:
    if params.tracking.uri:
        return params.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{main_root() / 'mlflow.db'}"


def artifact_location(params: Params) -> str | None:
    """With the default local store, artifacts go next to it (not into the cwd, which is a temp
    copy under `dvc exp run --temp`); a tracking server decides for itself."""
    if tracking_uri(params).startswith("sqlite:///") and not params.tracking.uri:
        return (main_root() / "mlartifacts").as_uri()
    return None


def client(params: Params) -> MlflowClient:
    return MlflowClient(tracking_uri(params))


# The UI opens an experiment by its kind; untagged ones with few runs are guessed to be GenAI.
KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(params: Params) -> str:
    c = client(params)
    exp = c.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        try:
            return c.create_experiment(params.tracking.experiment, artifact_location=artifact_location(params), tags=KIND)
        except Exception:  # another worker created it first
            exp = c.get_experiment_by_name(params.tracking.experiment)
    if exp.tags.get("mlflow.experimentKind") != KIND["mlflow.experimentKind"]:  # made by Lightning or older code
        c.set_experiment_tag(exp.experiment_id, *next(iter(KIND.items())))
    return exp.experiment_id


def log_dataset(params: Params, run_id: str, folder: Path, manifest: dict) -> None:
    """The prepared dataset as the run's MLflow dataset input (the runs table's Dataset column):
    its name, a digest of the split sha256s in its manifest, its folder, and the split sizes."""
    sizes = {split: sum(counts.values()) for split, counts in manifest["counts"].items()}
    digest = sha256(manifest["sha256"], length=16)
    dataset = Dataset(name=manifest["name"], digest=digest, source_type="local",
                      source=json.dumps({"uri": str(Path(folder).resolve())}),
                      profile=json.dumps({"num_classes": manifest["num_classes"], **{f"{k}_images": v for k, v in sizes.items()}}))
    client(params).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])


def start_child_run(params: Params, parent_run_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A run nested under `parent_run_id` (the MLflow UI shows sweep trials under their sweep)."""
    run = client(params).create_run(experiment_id(params), run_name=run_name,
                                    tags={**tags, "mlflow.parentRunId": parent_run_id})
    return run.info.run_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(stage: str, **extra: Any) -> dict[str, str]:
    tags = {"stage": stage, "git_commit": git_commit()}
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


def parent_run_id(params: Params, study, target: str, created: bool, wait_s: float) -> str:
    """The sweep's MLflow parent run, recorded in the study itself, so resumed runs and workers on
    other machines nest their trials under the same one. Only the study's creator makes it; the
    others wait for it to be recorded, so simultaneous coordinators never make two."""
    known = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + (0 if created else wait_s)
    while not known and time.monotonic() < deadline:
        time.sleep(0.5)
        known = study.user_attrs.get(PARENT_RUN_ATTR)
    if known:
        return known
    # Creator, or a study whose creator died before recording one: adopt a tagged run or make one.
    c, exp = client(params), experiment_id(params)
    found = c.search_runs([exp], filter_string=f"tags.study = '{study.study_name}' and tags.stage = 'sweep'",
                          max_results=1, order_by=["attributes.start_time ASC"])
    run_id = found[0].info.run_id if found else \
        c.create_run(exp, run_name=f"sweep-{target}", tags=run_tags("sweep", target=target, study=study.study_name)).info.run_id
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


@contextlib.contextmanager
def parent_run(params: Params, study, target: str, created: bool, wait_s: float = 60.0) -> Iterator[str]:
    """The sweep's parent run, open (RUNNING) while the block runs, then FINISHED, FAILED or KILLED.
    SIGTERM (a killed `dvc repro`, a batch scheduler) unwinds like Ctrl-C, so the run is closed as
    KILLED instead of staying RUNNING forever."""
    run_id = parent_run_id(params, study, target, created, wait_s)
    c = client(params)
    c.update_run(run_id, status="RUNNING")  # reopened when a later call asks for more trials
    try:
        with _terminate_as_exit():
            yield run_id
    except KeyboardInterrupt:
        c.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:
        c.set_terminated(run_id, "KILLED" if isinstance(exc, SystemExit) else "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def log_to_run(params: Params, run_id: str, metrics: dict[str, float], files: list[Path]) -> None:
    """Metrics and files onto an existing run (a sweep's parent)."""
    c = client(params)
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value))
    for f in files:
        c.log_artifact(run_id, str(f))
