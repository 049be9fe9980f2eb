"""The one place that decides where MLflow writes and which flat keys every run carries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config import Params, project_root


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


def client(params: Params):
    from mlflow import MlflowClient

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
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    sizes = {split: sum(counts.values()) for split, counts in manifest["counts"].items()}
    digest = hashlib.sha256(json.dumps(manifest["sha256"], sort_keys=True).encode()).hexdigest()[:16]
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


def transfer_keys(target: str, method: str, precision: str, adapter: Any, seed: int, head_bits: int) -> dict[str, Any]:
    """The flat params every transfer-like run (transfer, sweep trial) carries, in MLflow and in
    results.csv. Non-adapter methods carry the same keys with neutral values, so any two runs
    compare side by side."""
    is_adapter = method in ("serial", "parallel")
    placement = adapter.placement if isinstance(adapter.placement, str) else ",".join(map(str, adapter.placement))
    return {
        "target": target,
        "method": method,
        "precision": precision,
        "adapter_type": method if is_adapter else "none",
        "groups": adapter.groups if is_adapter else 0,
        "reduction": adapter.reduction if is_adapter else 0,
        "placement": placement if is_adapter else "none",
        "adapter_bits": adapter.bits if is_adapter else 0,
        "learn_scale": bool(adapter.learn_scale) if is_adapter else False,
        "head_bits": head_bits,
        "prune_amount": adapter.prune.amount if is_adapter else 0.0,
        "task_bn": bool(adapter.task_bn) if is_adapter else method in ("full", "bn"),
        "bn_bits": adapter.bn_bits if is_adapter or method == "bn" else 32,
        "seed": seed,
    }
