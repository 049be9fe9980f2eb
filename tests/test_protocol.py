"""The study's protocol: one training rule (early stopping, best-val weights, pruned runs judged
after their last round), lr chosen on val, and no stale state (resume fingerprints and study
names carry the data, the base and every setting that shapes a run)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import replace

import pytest
import torch
import yaml

import pandas as pd

from conftest import BIN, ROOT, copy_project, run_cli, set_keys
from pipeline.config import parse_params
from pipeline.nn.adapters import TaskSpec, TransferNet
from pipeline.nn.pruning import sparsity
from pipeline.train.protocol import best_lr, bracket
from pipeline.train.datamodule import PreparedData
from pipeline.train.fit import resume_fingerprint
from pipeline.train.sweep import study_name
from pipeline.train.trainer import EpochRecord, PruningCallback, TimingCallback
from test_adapters import _budget, _fit, toy_task, vgg_base  # noqa: F401  (fixtures)


# ------------------------------------------------------------------------------ convergence flag


def _timing(accs: list[float]) -> TimingCallback:
    t = TimingCallback()
    t.history = [EpochRecord(i, 1.0, i + 1.0, a) for i, a in enumerate(accs)]
    return t


@pytest.mark.parametrize("accs, min_delta, improving", [
    ([0.50, 0.60, 0.70, 0.70, 0.70, 0.70], 0.0, False),   # last 3 best .70 = best before: converged
    ([0.50, 0.60, 0.70, 0.70, 0.70, 0.71], 0.0, True),    # .71 > .70 by .01 > 0
    ([0.50, 0.60, 0.70, 0.70, 0.70, 0.71], 0.02, False),  # .01 gain is not above min_delta .02
    ([0.50, 0.60, 0.65], 0.0, True),                      # no epochs before the window: cannot tell
    ([0.90, 0.50, 0.60, 0.89], 0.0, False),               # epoch 0 (.90) still the best
])
def test_still_improving_compares_last_three_epochs_with_the_best_before(accs, min_delta, improving):
    assert _timing(accs).still_improving(min_delta) is improving


# ------------------------------------------------------------------------------ lr choice


def test_best_lr_takes_best_finished_run_and_the_smaller_lr_on_ties():
    assert best_lr({0.002: 0.90, 0.005: 0.95, 0.01: 0.95}) == 0.005
    # 2/3 and 0.6666666667 are the same accuracy once rounded: still a tie, the smaller lr
    assert best_lr({0.01: 2 / 3, 0.002: 0.6666666667}) == 0.002
    assert best_lr({0.01: 0.5, 0.02: None, 0.005: 0.49}) == 0.01   # pruned / diverged never win
    assert best_lr({0.01: None}) is None


def _peaked(peak: float, calls: list):
    """val accuracy falling with |log(lr / peak)|: the search should find the peak's neighbour."""
    import math

    def evaluate(lr):
        calls.append(round(lr, 10))
        return 0.9 - 0.05 * abs(math.log(lr / peak))
    return evaluate


def test_bracket_stops_at_once_when_the_winner_is_interior():
    calls = []
    tried = bracket([0.003, 0.01, 0.03], 3.0, 1e-4, 0.3, _peaked(0.01, calls))
    assert calls == [0.03, 0.01, 0.003] and best_lr(tried) == 0.01


def test_bracket_extends_past_the_winning_end_until_interior():
    calls = []
    tried = bracket([0.003, 0.01, 0.03], 3.0, 1e-4, 1.0, _peaked(0.2, calls))
    # 0.03 wins -> 0.09 wins -> 0.27 wins -> 0.81: 0.27 is now interior (0.81 is further from 0.2)
    assert calls == [0.03, 0.01, 0.003, 0.09, 0.27, 0.81] and best_lr(tried) == pytest.approx(0.27)
    calls = []
    tried = bracket([0.003, 0.01, 0.03], 3.0, 1e-4, 0.3, _peaked(1e-3, calls))
    assert calls == [0.03, 0.01, 0.003, 0.001, 0.0003333333] and best_lr(tried) == pytest.approx(1e-3)


def test_bracket_stops_at_a_limit_and_when_the_end_run_was_pruned():
    calls = []
    tried = bracket([0.003, 0.01, 0.03], 3.0, 1e-4, 0.1, _peaked(5.0, calls))  # 0.27 would leave high 0.1
    assert calls == [0.03, 0.01, 0.003, 0.09] and best_lr(tried) == pytest.approx(0.09)
    calls = []
    pruned_high = lambda lr: None if lr > 0.05 else _peaked(5.0, calls)(lr)  # noqa: E731
    tried = bracket([0.003, 0.01, 0.03], 3.0, 1e-4, 1.0, pruned_high)
    assert sorted(tried) == pytest.approx([0.003, 0.01, 0.03, 0.09]) and best_lr(tried) == 0.03  # interior now


# ------------------------------------------------------------------------------ the training rule


def test_early_stopping_ends_a_flat_run_and_keeps_epoch_zero(toy_task, vgg_base, monkeypatch, tmp_path):
    """lr 1e-9: val accuracy never rises after epoch 0, so with patience 2 the run stops after
    epochs 0, 1, 2 (two without a gain), of a cap of 10, and epoch 0's weights are restored."""
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("head"), 3)
    flat = _budget(max_epochs=10, patience=2)
    result = _fit(toy_task, net, "early-stop", monkeypatch, optim=flat, lr=1e-9, ckpt_dir=tmp_path / "ckpt")
    conv = result.convergence()
    assert conv == {"epochs_run": 3, "max_epochs": 10, "stopped_early": True, "hit_cap_improving": False}
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0


def test_a_run_at_its_cap_still_improving_is_flagged(toy_task, vgg_base, monkeypatch):
    """Two epochs with a real lr on a learnable task: the cap ends it, and with no epochs before
    the 3-epoch window nothing says it converged."""
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("head"), 3)
    result = _fit(toy_task, net, "capped", monkeypatch, optim=_budget(max_epochs=2), lr=0.02)
    assert result.convergence() == {"epochs_run": 2, "max_epochs": 2, "stopped_early": False, "hit_cap_improving": True}


def test_pruned_run_is_judged_only_after_its_last_round(toy_task, vgg_base, monkeypatch, tmp_path):
    """Dense phase capped at 2 epochs, then rounds at epochs 2 and 3 (sparsity .25 then .5): the
    best checkpoint must come from epoch 3 or later, at the final sparsity, however good a denser
    epoch was; early stopping may not end the run before the rounds."""
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("serial", groups=2, placement="all"), 3)
    optim = _budget(max_epochs=2, patience=1)
    cb = PruningCallback(net.adapter_convs(), 0.5, 2, 1, optim.max_epochs, "layer", optim.patience, optim.min_delta)
    params, folder, root = toy_task
    monkeypatch.chdir(root)
    from pipeline.train.fit import fit_and_evaluate

    data = PreparedData(folder, batch_size=16)
    result = fit_and_evaluate(params, net, data, optim, lr=0.02, run_name="prune-gate", tags={"stage": "test"},
                              flat_params={"name": "prune-gate"}, ckpt_dir=tmp_path / "ckpt", epochs=6,
                              callbacks=[cb], gate=cb.selecting)
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", map_location="cpu", weights_only=True)
    assert cb.done == 2 and best["epoch"] >= 3
    assert result.convergence()["epochs_run"] >= 4  # 2 dense + 2 rounds, at the least
    masks = [v for k, v in best["state_dict"].items() if k.endswith(".mask") and ".adapter." in k]
    zeros = sum(int((m == 0).sum()) for m in masks)
    assert zeros / sum(m.numel() for m in masks) == pytest.approx(0.5, abs=0.02)
    assert sparsity(net.adapter_convs()) == pytest.approx(0.5, abs=0.02)  # the restored weights


# ------------------------------------------------------------------------------ no stale state


def _params(change: dict | None = None):
    """params.yaml with `change` merged in (nested mappings merge, anything else replaces)."""
    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    return parse_params(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), change or {}))


def _manifest_sha(**changed) -> dict:
    sha = {"train": "a" * 64, "val": "b" * 64, "test": "c" * 64}
    return {**sha, **changed}


@pytest.mark.parametrize("change", [
    {"transfer": {"optim": {"weight_decay": 0.01}}},
    {"transfer": {"optim": {"optimizer": "sgd"}}},
    {"transfer": {"optim": {"scheduler": "none"}}},
    {"transfer": {"optim": {"patience": 9}}},
    {"transfer": {"head_bits": 4}},
    {"adapter": {"prune": {"scope": "global"}}},
    {"selection_seed": 7},            # trials train on it
    {"sweep": {"max_epochs": 4}},
    {"sweep": {"in_flight": 3}},      # the proposals depend on it
    {"sweep": {"space": {"groups": [4]}}},
    {"trainer": {"precision": "64-true"}},
])
def test_study_name_changes_with_every_setting_that_shapes_a_trial(change):
    base = _params()
    changed = _params(change)
    sha = _manifest_sha()
    assert study_name(base, "t", "base1", sha) != study_name(changed, "t", "base1", sha)


def test_study_name_carries_data_and_base_and_ignores_how_the_sweep_is_run():
    p = _params()
    name = study_name(p, "t", "base1", _manifest_sha())
    assert study_name(p, "t", "base2", _manifest_sha()) != name
    for split in ("train", "val", "test"):
        assert study_name(p, "t", "base1", _manifest_sha(**{split: "d" * 64})) != name, split
    # more trials, more workers or another reference point resume the same study
    same = _params({"sweep": {"n_trials": 50, "workers": 4, "reference_memory_pct": 50.0, "stale_after_s": 9}})
    assert study_name(same, "t", "base1", _manifest_sha()) == name


class _Data:
    def __init__(self, sha):
        self.manifest = {"sha256": sha}


def test_resume_fingerprint_carries_every_split_and_the_run_settings():
    p = _params()
    o = p.transfer.optim
    fp = resume_fingerprint("r", {"lr": 0.005, "base_sha256": "x"}, o, 0.005, 10, p, _Data(_manifest_sha()))
    assert fp == resume_fingerprint("r", {"lr": 0.005, "base_sha256": "x"}, o, 0.005, 10, p, _Data(_manifest_sha()))
    for split in ("train", "val", "test"):
        assert fp != resume_fingerprint("r", {"lr": 0.005, "base_sha256": "x"}, o, 0.005, 10, p,
                                        _Data(_manifest_sha(**{split: "d" * 64}))), split
    others = [
        ("r", {"lr": 0.005, "base_sha256": "y"}, o, 0.005, 10, p),                     # another base
        ("r", {"lr": 0.01, "base_sha256": "x"}, o, 0.005, 10, p),               # another lr in the params
        ("r", {"lr": 0.005, "base_sha256": "x"}, o, 0.01, 10, p),               # another lr trained with
        ("r", {"lr": 0.005, "base_sha256": "x"}, replace(o, weight_decay=0.1), 0.005, 10, p),
        ("r", {"lr": 0.005, "base_sha256": "x"}, replace(o, patience=1), 0.005, 10, p),
        ("r", {"lr": 0.005, "base_sha256": "x"}, o, 0.005, 11, p),                     # another cap
        ("r", {"lr": 0.005, "base_sha256": "x"}, o, 0.005, 10, replace(p, trainer=replace(p.trainer, precision="64-true"))),
    ]
    for args in others:
        assert resume_fingerprint(*args, _Data(_manifest_sha())) != fp, args


def test_every_optim_field_reaches_the_fingerprint():
    """A new Optim field must not be forgotten: each one, changed, changes the fingerprint."""
    p = _params()
    o = p.transfer.optim
    fp = resume_fingerprint("r", {}, o, 0.005, 10, p, _Data(_manifest_sha()))
    for f in dataclasses.fields(o):
        value = getattr(o, f.name)
        if f.name == "optimizer":
            other = "sgd" if value != "sgd" else "adam"
        elif isinstance(value, str):
            other = "none" if value != "none" else "cosine"
        else:
            other = value * 2 + 1
        assert resume_fingerprint("r", {}, replace(o, **{f.name: other}), 0.005, 10, p, _Data(_manifest_sha())) != fp, f.name


# ------------------------------------------------------------------------------ end to end (slow)


def _dvc(root, *args) -> str:
    return run_cli([str(BIN / "dvc"), *args], root).stdout


def _set_params(root, **changes) -> None:
    raw = set_keys(yaml.safe_load((root / "params.yaml").read_text()), **changes)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _runs(root, name: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("bnn-adapters")
    return c.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")


@pytest.mark.slow
def test_new_split_retrains_the_base_from_scratch(built_project, tmp_path):
    """The defect this guards: with a new data.seed, pretrain resumed the old last.ckpt (trained on
    images now in val/test), trained 0 steps and scored the old model on the new splits."""
    root = copy_project(built_project[0], tmp_path / "p")
    old_card = json.loads((root / "models/base/binary/card.json").read_text())
    assert (root / "models/base/binary/last.ckpt").exists()  # persisted: the trap is armed
    _set_params(root, **{"data.seed": 1})
    out = _dvc(root, "repro", "pretrain@binary")
    assert "Running stage 'prepare@mnist_0to4'" in out and "Running stage 'pretrain@binary'" in out
    assert "resuming" not in out
    card = json.loads((root / "models/base/binary/card.json").read_text())
    assert card["dataset_sha256"] != old_card["dataset_sha256"]
    runs = sorted(_runs(root, "pretrain-binary"), key=lambda r: r.info.start_time)
    assert len(runs) == 2 and card["mlflow_run_id"] == runs[1].info.run_id  # a new run, not the old one continued
    from mlflow import MlflowClient

    steps = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(runs[1].info.run_id, "train_loss")
    assert len(steps) == card["metrics"]["epochs_run"] >= 1  # it trained, every epoch


@pytest.mark.slow
def test_new_base_makes_transfer_retrain(built_project, tmp_path):
    root = copy_project(built_project[0], tmp_path / "p")
    before = json.loads((root / "models/mnist_5to9/serial/adapter.json").read_text())["base_sha256"]
    _set_params(root, **{"pretrain.optim.lr": 0.002})
    out = _dvc(root, "repro", "transfer@mnist_5to9-serial")
    assert "Running stage 'pretrain@binary'" in out and "Running stage 'transfer@mnist_5to9-serial'" in out
    assert "resuming" not in out
    from pipeline.nn.checkpoint import sha256

    new_sha = sha256(root / "models/base/binary/model.pt")
    assert new_sha != before
    for stem in ("adapter", "adapter_seed1"):
        assert json.loads((root / f"models/mnist_5to9/serial/{stem}.json").read_text())["base_sha256"] == new_sha


@pytest.mark.slow
def test_changed_weight_decay_opens_a_new_study(built_project, tmp_path):
    root = copy_project(built_project[0], tmp_path / "p")
    old = json.loads((root / "reports/metrics/sweep_mnist_5to9.json").read_text())["study"]
    _set_params(root, **{"transfer.optim.weight_decay": 0.01})
    _dvc(root, "repro", "sweep@mnist_5to9")
    new = json.loads((root / "reports/metrics/sweep_mnist_5to9.json").read_text())
    assert new["study"] != old and new["complete"] == 2
    import optuna
    from pipeline.train.sweep import open_storage

    names = {s.study_name for s in optuna.get_all_study_summaries(open_storage(None, root / "reports/sweep/mnist_5to9"))}
    assert names == {old, new["study"]}


@pytest.mark.slow
def test_shuffled_test_labels_change_no_choice(built_project, tmp_path):
    """Val selects, test reports: with the target's test labels permuted, every choice (each arm's
    lr, the sweep's Pareto set, the report's best adapter and smallest-within-k) is the same; only
    test numbers move."""
    from safetensors.torch import load_file, save_file

    from pipeline.io import sha256
    from pipeline.report import analysis

    root = built_project[0]
    shuffled = copy_project(root, tmp_path / "p")
    folder = shuffled / "data/prepared/mnist_5to9"
    t = load_file(str(folder / "test.safetensors"))
    y = t["y"][torch.randperm(len(t["y"]), generator=torch.Generator().manual_seed(0))]
    assert (y != t["y"]).float().mean() > 0.5
    save_file({"x": t["x"], "y": y.contiguous()}, str(folder / "test.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["test"] = sha256(folder / "test.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    # the stages by hand: dvc would restore the prepared data it has cached
    for method, precision in (("full", "binary"), ("full", "fp32"), ("head", "binary"), ("bn", "binary"),
                              ("serial", "binary"), ("parallel", "binary")):
        run_cli(["pipeline", "transfer", "--target", "mnist_5to9", "--method", method, "--precision", precision], shuffled)
    for cmd in (["sweep", "--target", "mnist_5to9"], ["results"], ["report"]):
        run_cli(["pipeline", *cmd], shuffled)

    def choices(r):
        metrics = {f.stem: json.loads(f.read_text()) for f in (r / "reports/metrics").glob("transfer_mnist_5to9_*.json")}
        inputs = analysis.load_inputs(r / "reports")
        picked = {k: (m["lr"], m["lr_search"], m["val_acc"]) for k, m in metrics.items()}
        pareto = pd.read_csv(r / "reports/sweep/mnist_5to9/pareto.csv")
        picked["pareto"] = (list(pareto.number), list(pareto.val_acc))
        for name, pick in (("best", (analysis.best_adapter(inputs, "mnist_5to9", 0.12) or [None])[0]),
                           ("within1", analysis.smallest_within(inputs, "mnist_5to9", 1)),
                           ("within3", analysis.smallest_within(inputs, "mnist_5to9", 3))):
            picked[name] = None if pick is None else (pick.source, pick.method, pick.memory_ratio, pick.val_acc)
        tests = sorted(pd.read_csv(r / "reports/results.csv").test_acc) + sorted(pareto.test_acc)
        return picked, tests

    (a, test_a), (b, test_b) = choices(root), choices(shuffled)
    assert a == b
    assert test_a != test_b  # the shuffle reached the test numbers


@pytest.mark.slow
def test_sweep_parent_run_ends_failed_on_a_crash_and_finished_when_done(built_project, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from conftest import run_in_process
    from pipeline.stages import sweep

    root = copy_project(built_project[0], tmp_path / "p")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bnn-adapters").experiment_id

    def parents():
        return client.search_runs([exp], filter_string="tags.stage = 'sweep'")

    assert [r.info.status for r in parents()] == ["FINISHED"]  # the built project's own sweep

    def crash(*args, **kwargs):
        raise RuntimeError("worker crashed")

    monkeypatch.setattr(sweep, "run_workers", crash)
    out = run_in_process(["sweep", "--target", "mnist_5to9", "--n-trials", "3"], root)
    assert out.returncode == 1 and "worker crashed" in out.stderr
    assert [r.info.status for r in parents()] == ["FAILED"]  # never left RUNNING
    monkeypatch.undo()
    out = run_in_process(["sweep", "--target", "mnist_5to9", "--n-trials", "3"], root)
    assert out.returncode == 0, out.stderr
    (parent,) = parents()  # the same parent run, reopened for the third trial and closed again
    assert parent.info.status == "FINISHED" and parent.data.metrics["complete"] == 3
