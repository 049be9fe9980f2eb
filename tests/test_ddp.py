"""Multi-device training through the engine: `trainer.strategy: ddp` with two CPU processes
(gloo), the same code path as DDP on GPUs. The extra process trains in step; only the primary
writes outputs and MLflow runs, so a stage leaves one set of files and one run."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from conftest import BIN, make_project, run_cli, tiny_params

pytestmark = pytest.mark.slow


def test_ddp_on_two_cpu_processes(tmp_path):
    params = tiny_params(**{"pretrain.precisions": ["binary"], "transfer.baselines": [],
                            "transfer.adapters": ["serial"], "trainer.accelerator": "cpu", "trainer.devices": 2,
                            "trainer.strategy": "ddp",
                            # the protocol across processes: both choose the same lr, both train the repeat
                            "seeds": [0, 1], "transfer.lr_search.start": [0.005, 0.01],
                            "transfer.lr_search.step": 2.0, "transfer.lr_search.high": 0.01})
    root = make_project(tmp_path / "proj", params)
    out = run_cli([str(BIN / "dvc"), "repro", "transfer@mnist_5to9-serial"], root)
    log = out.stdout + out.stderr
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log
    assert log.count("pretrain binary: val") == 1  # the second process printed and wrote nothing
    for seed in (0, 1):
        assert len(re.findall(rf"transfer mnist_5to9/serial seed {seed} \(lr [0-9.]+\): val", log)) == 1

    client = MlflowClient("sqlite:///" + str(root / "mlflow.db"))
    exp = client.get_experiment_by_name("bnn-adapters")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["pretrain"] + ["transfer"] * 4  # 2 lr + 2 seeds

    card = json.loads((root / "models/base/binary/card.json").read_text())
    pretrain = next(r for r in runs if r.data.tags["stage"] == "pretrain")
    assert card["mlflow_run_id"] == pretrain.info.run_id
    state = torch.load(root / "models/base/binary/model.pt", map_location="cpu", weights_only=True)
    assert state  # a whole, loadable file (two writers would risk a torn one)

    rows = pd.read_csv(root / "reports/results/mnist_5to9__serial.csv")
    assert list(rows.seed) == [0, 1] and rows.lr.nunique() == 1
    recorded = rows[rows.seed == 0].test_acc.iloc[0]  # adapter.safetensors is seed 0's task state
    evaluated = run_cli(["pipeline", "evaluate", "--target", "mnist_5to9",
                         "--adapter", "models/mnist_5to9/serial/adapter.safetensors"], root).stdout
    measured = float(re.search(r"mnist_5to9 test accuracy ([0-9.]+)", evaluated).group(1))
    assert abs(measured - recorded) < 5e-5, (recorded, evaluated)
