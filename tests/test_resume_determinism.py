"""Interruption and determinism, end to end: a pretrain killed with SIGKILL and rerun through
`dvc repro` resumes from its last checkpoint and ends exactly where an uninterrupted run ends;
two independent runs with the same params give identical accuracies and identical files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, make_project, run_cli, tiny_params

pytestmark = pytest.mark.slow

PARAMS = tiny_params(**{
    "data.datasets.mnist_0to4.max_per_class": 150, "model.width": 8, "pretrain.optim.max_epochs": 6, "pretrain.optim.patience": 6,
    "pretrain.precisions": ["binary"], "transfer.baselines": [], "transfer.adapters": ["serial"],
})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metrics(root: Path) -> dict:
    return json.loads((root / "reports/metrics/pretrain_binary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a = make_project(tmp_path_factory.mktemp("a"), PARAMS)
    b = make_project(tmp_path_factory.mktemp("b"), PARAMS)
    for root in (a, b):
        run_cli([str(BIN / "dvc"), "repro", "transfer@mnist_5to9-serial"], root)
    # c: the same pretrain, killed after its first checkpoint, then `dvc repro` again
    c = make_project(tmp_path_factory.mktemp("c"), PARAMS)
    run_cli([str(BIN / "dvc"), "repro", "prepare@mnist_0to4"], c)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(["pipeline", "pretrain", "--precision", "binary"], cwd=c, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = c / "models/base/binary/last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the checkpoint file be complete
    killed_midway = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli([str(BIN / "dvc"), "repro", "pretrain@binary"], c)
    return a, b, c, killed_midway, resumed.stdout


def test_killed_pretrain_resumes_and_matches_uninterrupted(runs):
    a, _, c, killed_midway, out = runs
    assert killed_midway, "the pretrain finished before it could be killed; make the run longer"
    assert "resuming pretrain-binary from" in out
    ma, mc = metrics(a), metrics(c)
    for key in ("val_acc", "test_acc", "memory_bytes", "epochs_run"):
        assert ma[key] == mc[key], key
    assert sha(a / "models/base/binary/model.pt") == sha(c / "models/base/binary/model.pt")
    # the resumed run continued the killed run's MLflow run, tagged where it resumed from
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{c / 'mlflow.db'}")
    runs_c = client.search_runs([client.get_experiment_by_name("bnn-adapters").experiment_id])
    assert len(runs_c) == 1 and "resumed_from" in runs_c[0].data.tags
    steps = {m.step for m in client.get_metric_history(runs_c[0].info.run_id, "train_loss")}
    assert len(steps) == 6  # one per epoch; an epoch redone after the kill logs the same step again


def test_same_params_same_results(runs):
    a, b, _, _, _ = runs
    assert metrics(a)["val_acc"] == metrics(b)["val_acc"] and metrics(a)["test_acc"] == metrics(b)["test_acc"]
    assert sha(a / "models/base/binary/model.pt") == sha(b / "models/base/binary/model.pt")
    for name in ("adapter.safetensors", "adapter.json", "adapter.bnnpack"):
        assert sha(a / "models/mnist_5to9/serial" / name) == sha(b / "models/mnist_5to9/serial" / name), name
    ta = json.loads((a / "reports/metrics/transfer_mnist_5to9_serial.json").read_text())
    tb = json.loads((b / "reports/metrics/transfer_mnist_5to9_serial.json").read_text())
    assert (ta["val_acc"], ta["test_acc"]) == (tb["val_acc"], tb["test_acc"])
