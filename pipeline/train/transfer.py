"""One transfer run of a `RunSpec`, in three steps with one job each: `fit` (base + new head
[+ adapters] trained by the one training rule, then finalised), `measure` (accuracies, memory and
its breakdown, timing, convergence: the results.csv row) and `save` (packed file, safetensors +
JSON, MLflow artifacts, learning curve). `run` chains them; the transfer stages' protocol and the
sweep use it.

Multi-device strategies re-run the command once per device: every process fits and measures in
step (the weights are synchronised, so the numbers agree), and only the primary writes."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import Params
from pipeline.errors import TrainingDiverged
from pipeline.nn.adapter_io import save_adapter
from pipeline.nn.adapters import TransferNet
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.nn.export import export_packed
from pipeline.nn.inference import BATCH, predict
from pipeline.nn.memory import breakdown, memory_report, storage_plan, training_memory
from pipeline.nn.pruning import sparsity
from pipeline.paths import base_checkpoint, prepared
from pipeline.train.datamodule import PreparedData
from pipeline.train.fit import FitResult, fit_and_evaluate
from pipeline.train.spec import RunSpec
from pipeline.train.trainer import PruningCallback, seed_everything

SUFFIXES = (".safetensors", ".json", ".bnnpack")  # the files of one task state


@dataclass(frozen=True)
class Tracking:
    """Where a run goes in MLflow: its name, tags, parent (sweep trials nest under their sweep)
    and params beyond the run spec's own."""

    run_name: str
    tags: dict[str, str]
    parent_run_id: Optional[str] = None
    extra_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fitted:
    spec: RunSpec
    net: TransferNet         # finalised: exactly what the packed files store
    fit: FitResult
    data: PreparedData       # the untouched inputs, for the final numbers
    prefix_s: float          # the frozen-prefix feature pass, part of the training time
    base_sha256: str
    train_memory: dict[str, int]  # one training step's working memory (nn.memory.training_memory)
    prefix_k: int = 0             # leading feature modules frozen (their outputs shared between runs)

    @property
    def primary(self) -> bool:
        return self.fit.primary

    def predict(self, split: str) -> torch.Tensor:
        """The finalised network's predicted class for every image of `split`: the frozen prefix's
        features come from `prefix_features` (computed once per process), the rest runs here, both
        in the batches `predict` uses, so the arithmetic is the whole network's, batch for batch."""
        x = self.data.splits[split][0]
        if not self.prefix_k:
            return predict(self.net, x)
        feats, _ = prefix_features(self.net, self.prefix_k, self.data, split, BATCH)
        self.net.start = self.prefix_k
        try:
            return predict(self.net, feats)
        finally:
            self.net.start = 0


@dataclass
class Record:
    """What one run leaves: its results.csv row and its learning curve, and whether this process
    is the one that wrote its files (False in the extra processes of a multi-device strategy)."""

    row: dict[str, Any]
    curve: list[dict[str, Any]]
    primary: bool = True
    predictions: dict[str, Any] = field(default_factory=dict)  # split -> predicted class per image


def base_memory_bytes() -> float:
    """Memory ratios are always against the binary base."""
    return memory_report(load_base(base_checkpoint("binary"))).bytes


_PREFIX: dict[str, tuple[tuple, torch.Tensor, float]] = {}  # split -> (key, features, seconds), one per split


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256(repr(module).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def prefix_features(net: TransferNet, k: int, data: PreparedData, split: str, batch_size: int) -> tuple[torch.Tensor, float]:
    """`split`'s inputs through the first k feature modules (frozen: identical in every run on
    this base) and the seconds that pass took. Kept per process, one entry per split: an arm's
    seeds and a sweep's retrains in one worker share it (its measured seconds are reported for
    each, so the training time still pays for it). Keyed by the split's sha256 and the prefix's
    own weights, so another base or a finalised (BN-fused) prefix gets its own features."""
    key = (data.manifest["sha256"][split], k, batch_size, _digest(net.base.features[:k]))
    hit = _PREFIX.get(split)
    if hit is None or hit[0] != key:
        t0 = time.perf_counter()
        x = net.prefix_features(data.splits[split][0], k, batch_size)
        hit = _PREFIX[split] = (key, x, time.perf_counter() - t0)
    return hit[1], hit[2]


def build(params: Params, spec: RunSpec) -> tuple[TransferNet, PreparedData, float]:
    """Base + new head (+ adapters), the data it trains on (frozen-prefix features cached), and the
    seconds that feature pass took."""
    base = load_base(base_checkpoint(spec.precision))
    data = PreparedData(prepared(spec.target), spec.optim.batch_size, params.trainer.num_workers, spec.seed)
    net = TransferNet(base, spec.state, data.num_classes)
    k = net.frozen_prefix()
    if not k:
        return net, data, 0.0
    # the frozen part runs once, without autograd, instead of every epoch; training never reads test
    feats = {s: prefix_features(net, k, data, s, 512) for s in ("train", "val")}
    net.start = k
    return net, data.with_inputs({s: x for s, (x, _) in feats.items()}), sum(t for _, t in feats.values())


def fit(params: Params, spec: RunSpec, tracking: Tracking, ckpt_dir: Path, callbacks: Optional[list] = None) -> Fitted:
    """Train `spec` by the one training rule, then finalise the network (permanent pruning,
    frozen k-bit codes, fused BN). Raises TrainingDiverged when the loss went non-finite.
    `callbacks` join the trainer's (the lr search's pruner)."""
    seed_everything(spec.seed, params)
    net, data, prefix_s = build(params, spec)
    train_mem = training_memory(net, data.splits["train"][0][: spec.optim.batch_size])
    callbacks, gate = list(callbacks or []), None
    if spec.pruned:
        p, o = spec.prune, spec.optim
        cb = PruningCallback(net.adapter_convs(), p.amount, p.rounds, p.epochs, o.max_epochs, p.scope,
                             o.patience, o.min_delta)
        callbacks, gate = callbacks + [cb], cb.selecting
    base_sha = sha256(base_checkpoint(spec.precision))
    result = fit_and_evaluate(
        params, net, data, spec.optim, lr=spec.lr, epochs=spec.epoch_cap, callbacks=callbacks, gate=gate,
        run_name=tracking.run_name, tags=tracking.tags, parent_run_id=tracking.parent_run_id, test=False,
        flat_params={**spec.mlflow_params(), "base_sha256": base_sha, **tracking.extra_params}, ckpt_dir=ckpt_dir)
    loss = result.run.trainer.callback_metrics.get("train_loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise TrainingDiverged(f"training diverged (train loss {float(loss)})")
    k, net.start = net.start, 0
    net.finalize()
    net.eval()
    return Fitted(spec, net, result, PreparedData(prepared(spec.target), 1, 0, spec.seed), prefix_s, base_sha,
                  train_mem, k)


def measure(f: Fitted, base_bytes: float, test: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results.csv row and the predicted class of every image ({split: uint8 array}), from
    which the row's accuracies are computed. With test=False (sweep trials) the test split is
    not read."""
    net, splits = f.net, f.data.splits
    preds = {s: f.predict(s).numpy().astype("uint8") for s in (("val", "test") if test else ("val",))}
    acc = {s: float((p == splits[s][1].numpy()).mean()) for s, p in preds.items()}
    task = memory_report(net, include=net.is_task_module)
    adapter = memory_report(net, include=lambda n, m: ".adapter" in n)
    return {
        **f.spec.columns(),
        "sparsity": round(sparsity(net.adapter_convs()), 6),
        "val_acc": acc["val"],
        "test_acc": acc.get("test"),
        "task_memory_bytes": task.bytes,
        "adapter_memory_bytes": adapter.bytes,
        "base_memory_bytes": base_bytes,
        "memory_ratio": task.bytes / base_bytes,
        **{f"mem_{k}_bytes": v for k, v in breakdown(storage_plan(net, include=net.is_task_module)).items()},
        **f.fit.timing_metrics(f.prefix_s),
        **f.train_memory,
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "lr": f.spec.lr,
        **f.fit.convergence(),
    }, preds


def save(f: Fitted, row: dict[str, Any], stem: Path) -> list[dict[str, Any]]:
    """Write `stem`.bnnpack, .safetensors and .json, log the row and files to the run's MLflow run,
    and return the learning curve; adds `packed_payload_bytes` to `row`."""
    net, spec, manifest = f.net, f.spec, f.data.manifest
    meta = {**spec.to_dict(), "arch": net.base.arch.to_dict(), "num_classes": f.data.num_classes,
            "classes": manifest["classes"], "base_sha256": f.base_sha256,
            "dataset_sha256": manifest["sha256"]}  # TASK_META: enough to run it on its base
    packed = export_packed(net, stem.with_suffix(".bnnpack"), meta, include=net.is_task_module)
    row["packed_payload_bytes"] = packed["payload_bytes"]
    task = memory_report(net, include=net.is_task_module)
    save_adapter(net, stem, {
        **meta, "base": str(base_checkpoint(spec.precision)),
        "memory": {"task": task.to_dict(), "adapter_bytes": row["adapter_memory_bytes"], "packed": packed},
        "metrics": {k: row[k] for k in ("val_acc", "test_acc", "task_memory_bytes", "memory_ratio")},
    })  # no run id here: same params and seed give byte-identical adapter files
    columns = spec.columns()
    f.fit.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in columns})
    for suffix in (".safetensors", ".json"):
        f.fit.log_artifact(stem.with_suffix(suffix))
    return [{"seed": spec.seed, "lr": spec.lr, "epoch": r.epoch,
             "elapsed_train_s": round(f.prefix_s + r.elapsed_train_s, 4), "val_acc": r.val_acc}
            for r in f.fit.run.timing.history]


def run(params: Params, spec: RunSpec, tracking: Tracking, out: Path, stem: str, base_bytes: float,
        test: bool = True) -> Record:
    """Fit, measure and save one run: files `out/stem.*`, checkpoints under `out/checkpoints/stem`."""
    f = fit(params, spec, tracking, out / "checkpoints" / stem)
    row, preds = measure(f, base_bytes, test)
    curve = save(f, row, out / stem) if f.primary else []
    return Record(row, curve, f.primary, preds)
