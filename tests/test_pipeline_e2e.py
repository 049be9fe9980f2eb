"""End to end: a real `dvc repro` of tiny params in a temporary git repo, read back through the
files it writes and through MlflowClient."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(built_project) -> tuple[Path, str, str]:
    return built_project


def test_repro_writes_every_output(project):
    root, _, _ = project
    for name, classes in (("mnist_0to4", 5), ("mnist_5to9", 5), ("uci_digits", 10)):
        manifest = json.loads((root / "data/prepared" / name / "manifest.json").read_text())
        assert manifest["num_classes"] == classes
        # max_per_class 40 -> 28 / 6 / 6 per class at 0.7 / 0.15 / 0.15
        assert {s: sum(c.values()) for s, c in manifest["counts"].items()} == \
            {"train": 28 * classes, "val": 6 * classes, "test": 6 * classes}
    for precision in ("binary", "fp32"):
        card = json.loads((root / "models/base" / precision / "card.json").read_text())
        assert card["architecture"]["precision"] == precision
        metrics = json.loads((root / f"reports/metrics/pretrain_{precision}.json").read_text())
        assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["max_epochs"] == 2
    results = pd.read_csv(root / "reports/results.csv")
    # 1 target x (5 methods on the binary base + full on fp32) x 2 seeds, each at its chosen lr
    assert len(results) == 12 and sorted(results.seed.unique()) == [0, 1]
    for _, arm in results.groupby(["method", "precision"]):
        # lr_search start [0.005, 0.01] inside [low 0.005, high 0.01]: both tried, no step past an end
        assert arm.lr.nunique() == 1 and arm.lr.iloc[0] in (0.005, 0.01) and arm.lr_searched.nunique() == 1
        searched = [s.split()[0] for s in arm.lr_searched.iloc[0].split(", ")]
        assert [s.rstrip("*") for s in searched] == ["0.005", "0.01"]
        assert [float(s[:-1]) for s in searched if s.endswith("*")] == [arm.lr.iloc[0]]
    assert set(zip(results.target, results.method, results.precision)) == {
        ("mnist_5to9", m, "binary") for m in ("full", "head", "bn", "serial", "parallel")} | {("mnist_5to9", "full", "fp32")}
    adapters = results[results.method.isin(["serial", "parallel"])]
    assert (adapters.sparsity > 0.45).all()  # pruned to 0.5 per layer (rounding per layer)
    assert (results.memory_ratio == results.task_memory_bytes / results.base_memory_bytes).all()


def test_sweep_and_report_outputs(project):
    root, _, _ = project
    sweep = json.loads((root / "reports/metrics/sweep_mnist_5to9.json").read_text())
    assert sweep["complete"] == 2 and 1 <= sweep["pareto_size"] <= 2
    trials = pd.read_csv(root / "reports/sweep/mnist_5to9/trials.csv")
    assert (trials.state == "COMPLETE").sum() == 2
    done = trials[trials.state == "COMPLETE"]
    # sweep.max_epochs 1: an unpruned trial's one epoch is its cap, and one epoch is always "still improving"
    assert sweep["trials_hit_cap_improving"] == int(done.hit_cap_improving.sum())
    assert sweep["trials_hit_cap_improving"] >= int((done.prune_amount == 0).sum())
    report = (root / "reports/report.md").read_text()
    for heading in ("## 1. Accuracy", "## 2. Training time", "## 3. Size", "## Where the time goes"):
        assert heading in report
    for png in ("accuracy_vs_memory_mnist_5to9", "sweep_mnist_5to9", "training_time", "learning_curves", "storage_for_tasks"):
        assert (root / "reports/plots" / f"{png}.png").stat().st_size > 10_000
        assert f"plots/{png}.png" in report


def test_stored_predictions_recompute_every_recorded_accuracy(project):
    """Every reported run's per-image predictions: results.csv's val and test accuracy of every
    arm and seed, the sweep's retrained points (pareto_runs.csv) and the bases' metrics, each
    recomputed from the .npz files, with no mismatch; the labels are the prepared splits'."""
    from safetensors.torch import load_file

    from pipeline.predictions import Predictions

    root, _, _ = project
    results = pd.read_csv(root / "reports/results.csv")
    preds = Predictions.read(root / "reports/predictions/mnist_5to9.npz")
    for split in ("val", "test"):
        y = load_file(str(root / f"data/prepared/mnist_5to9/{split}.safetensors"))["y"].numpy()
        assert (preds.labels(split) == y).all()
    mismatches, checked = 0, 0
    for _, r in results.iterrows():
        key = f"{r.method if r.precision == 'binary' else r.method + '_' + r.precision}/seed{r.seed}"
        for split in ("val", "test"):
            checked += 1
            mismatches += abs(preds.accuracy(key, split) - r[f"{split}_acc"]) > 1e-12
    runs = pd.read_csv(root / "reports/sweep/mnist_5to9/pareto_runs.csv")
    sweep = Predictions.read(root / "reports/sweep/mnist_5to9/predictions.npz")
    for _, r in runs.iterrows():
        for split in ("val", "test"):
            checked += 1
            key = f"trial{r.number}/seed{r.seed}"
            mismatches += abs(sweep.accuracy(key, split) - r[f"{split}_acc"]) > 1e-12
            mismatches += preds.accuracy(key, split) != sweep.accuracy(key, split)  # merged into the target's file
    for precision in ("binary", "fp32"):
        m = json.loads((root / f"reports/metrics/pretrain_{precision}.json").read_text())
        base = Predictions.read(root / f"models/base/{precision}/predictions.npz")
        for split in ("val", "test"):
            checked += 1
            mismatches += round(base.accuracy("pretrain/seed0", split), 4) != m[f"{split}_acc"]
    assert checked == 2 * (len(results) + len(runs) + 2) and len(runs) >= 2 and mismatches == 0


def test_second_repro_does_nothing(project):
    _, first, second = project
    assert "Running stage 'pretrain@binary'" in first
    assert "Running stage" not in second


def test_evaluate_reproduces_recorded_accuracy(project):
    root, _, _ = project
    results = pd.read_csv(root / "reports/results.csv").set_index(["target", "method", "precision", "seed"])
    for method, stem, seed in (("serial", "adapter", 0), ("full", "adapter", 0), ("serial", "adapter_seed1", 1)):
        out = run_cli(["pipeline", "evaluate", "--target", "mnist_5to9", "--adapter",
                       f"models/mnist_5to9/{method}/{stem}.safetensors"], root).stdout
        recorded = results.loc[("mnist_5to9", method, "binary", seed), "test_acc"]
        assert f"test accuracy {recorded:.4f}" in out


def test_packed_files_alone_reproduce_every_task_state(project):
    """Every task state the run wrote (each method, each seed, the sweep's Pareto retrains): base +
    task state from the two packed files give the trained network's logits exactly, its recorded
    accuracy, and the numpy XNOR path the same argmax on every test image."""
    root, _, _ = project
    results = pd.read_csv(root / "reports/results.csv").set_index(["target", "method", "precision", "seed"])
    files = sorted((root / "models/mnist_5to9").glob("*/adapter*.bnnpack"))
    assert len(files) == 6 * 2  # 6 arms (full, full_fp32, head, bn, serial, parallel) x 2 seeds
    pattern = re.compile(r"test accuracy (\S+) .*\n  vs (\w+): (\d+) images, (\d+) argmax mismatches, "
                         r"largest logit difference (\S+)")
    for f in files + sorted((root / "reports/sweep/mnist_5to9/pareto").glob("*.bnnpack")):
        rel = str(f.relative_to(root))
        for other in ("trained", "numpy"):
            proc = run_in_process(["evaluate", "--target", "mnist_5to9", "--packed", rel, "--compare", other], root)
            assert proc.returncode == 0, proc.stderr
            acc, name, images, mismatches, diff = pattern.search(proc.stdout).groups()
            assert (name, int(images), int(mismatches)) == (other, 30, 0), proc.stdout
            assert float(diff) == 0.0 if other == "trained" else float(diff) < 1e-3, proc.stdout
        if "models/" in rel:
            method = f.parent.name
            seed = int(f.stem.removeprefix("adapter_seed")) if "seed" in f.stem else 0
            key = ("mnist_5to9", "full" if method == "full_fp32" else method,
                   "fp32" if method == "full_fp32" else "binary", seed)
            assert float(acc) == pytest.approx(results.loc[key, "test_acc"], abs=1e-4), rel


def test_bank_runs_from_packed_files(project):
    root, _, _ = project
    proc = run_in_process(["bank", "--packed", "--targets", "mnist_5to9", "--method", "parallel", "--swaps", "50"],
                          root)
    assert proc.returncode == 0, proc.stderr
    recorded = pd.read_csv(root / "reports/results.csv").query(
        "method == 'parallel' and seed == 0").test_acc.iloc[0]
    assert f"(mnist_5to9): test accuracy {recorded:.4f} (recorded {recorded:.4f})" in proc.stdout
    assert re.search(r"swap: median [\d.]+ us, p99 [\d.]+ us over 50 swaps among 1 task states", proc.stdout)
    # any task states, named by file: every adapter method, both seeds
    states = sorted(str(p.relative_to(root)) for m in ("head", "bn", "serial", "parallel")
                    for p in (root / "models/mnist_5to9" / m).glob("adapter*.bnnpack"))
    proc = run_in_process(["bank", "--packed", "--states", *states, "--swaps", "80"], root)
    assert proc.returncode == 0, proc.stderr
    results = pd.read_csv(root / "reports/results.csv")
    for state in states:
        method = Path(state).parent.name
        seed = 1 if "seed1" in state else 0
        acc = results.query("method == @method and seed == @seed and precision == 'binary'").test_acc.iloc[0]
        assert f"{state} (mnist_5to9): test accuracy {acc:.4f} (recorded {acc:.4f})" in proc.stdout
    assert "over 80 swaps among 8 task states" in proc.stdout


def test_mlflow_runs_read_back(project):
    root, _, _ = project
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bnn-adapters")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["stage"], []).append(r)
    # 6 arms x (2 lr on the selection seed + the chosen lr on seeds 0 and 1)
    assert len(by_stage["pretrain"]) == 2 and len(by_stage["transfer"]) == 24
    assert len(by_stage["sweep"]) == 1 and len(by_stage["sweep_trial"]) == 2
    pareto = pd.read_csv(root / "reports/sweep/mnist_5to9/pareto.csv")
    assert len(by_stage["sweep_retrain"]) == 2 * len(pareto)  # each Pareto point on both seeds
    parent = by_stage["sweep"][0]
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id
               for r in by_stage["sweep_trial"] + by_stage["sweep_retrain"])
    pre = next(r for r in by_stage["pretrain"] if r.data.tags["precision"] == "binary")
    card = json.loads((root / "models/base/binary/card.json").read_text())
    assert pre.data.metrics["test_acc"] == pytest.approx(card["metrics"]["test_acc"], abs=5e-5)
    assert pre.data.tags["git_commit"] != "unknown"
    assert "card.json" in [a.path for a in client.list_artifacts(pre.info.run_id)]
    history = client.get_metric_history(pre.info.run_id, "train_loss")
    assert len(history) == 2  # one value per epoch
    keys = {"target", "method", "precision", "adapter_type", "groups", "reduction", "placement",
            "adapter_bits", "prune_amount", "seed"}
    metrics = {"val_acc", "test_acc", "task_memory_bytes", "adapter_memory_bytes", "memory_ratio",
               "train_time_s", "epoch_time_s", "time_to_95_s", "trainable_params"}
    roles = {r.data.tags["role"] for r in by_stage["transfer"]}
    assert roles == {"lr_search", "reported"}
    for r in by_stage["transfer"]:
        assert keys <= set(r.data.params), r.info.run_name
        if r.data.tags["role"] == "reported":
            assert metrics <= set(r.data.metrics), r.info.run_name
            assert r.data.params["seed"] in ("0", "1"), r.info.run_name
        else:  # a choice: the selection seed, val only, the test split never read
            assert r.data.params["seed"] == "100" and "val_acc" in r.data.metrics, r.info.run_name
            assert "test_acc" not in r.data.metrics, r.info.run_name
