"""One transfer run (base + new head [+ adapters] trained on a target, finalised, measured and
saved): shared by the transfer stage and by sweep trials."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.config import BASE_DIR, PREPARED, Adapter, Optim, Params
from pipeline.errors import UserError
from pipeline.nn.adapter_io import save_adapter
from pipeline.nn.adapters import TaskSpec, TransferNet
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.nn.export import export_packed
from pipeline.nn.memory import breakdown, memory_report, storage_plan
from pipeline.nn.pruning import sparsity
from pipeline.train.datamodule import PreparedData
from pipeline.train.evaluate import accuracy
from pipeline.train.fit import fit_and_evaluate
from pipeline.train.tracking import transfer_keys
from pipeline.train.trainer import PruningCallback, seed_everything


ADAPTER_SUFFIXES = (".safetensors", ".json", ".bnnpack")  # the files of one task state


class TrainingDiverged(UserError):
    pass


def base_memory_bytes() -> float:
    """Memory ratios are always against the binary base."""
    return memory_report(load_base(BASE_DIR / "binary" / "model.pt")).bytes


def head_bits(params: Params, method: str) -> int:
    """Every method that trains a new head stores it alike; full finetuning keeps a whole float copy."""
    return 32 if method == "full" else params.transfer.head_bits


def build_net(params: Params, target: str, method: str, precision: str, seed: int, adapter: Adapter,
              batch_size: int) -> tuple[TransferNet, PreparedData, float]:
    """Base + new head (+ adapters), the data it trains on (frozen-prefix features cached), and the
    seconds that feature pass took (part of the method's training time)."""
    base = load_base(BASE_DIR / precision / "model.pt")
    a, hb = adapter, head_bits(params, method)
    if method in ("serial", "parallel"):
        spec = TaskSpec(method, a.groups, a.reduction, a.placement, a.task_bn, a.bits, hb, a.bn_bits, a.learn_scale)
    else:
        spec = TaskSpec(method, head_bits=hb, bn_bits=a.bn_bits if method == "bn" else 32)
    data = PreparedData(PREPARED / target, batch_size, params.trainer.num_workers, seed)
    net = TransferNet(base, spec, data.num_classes)
    k = net.frozen_prefix()
    t0 = time.perf_counter()
    if k:  # run the frozen part once, without autograd, instead of every epoch
        data = data.map_inputs(lambda x: net.prefix_features(x, k))
        net.start = k
    return net, data, time.perf_counter() - t0


def train_transfer(params: Params, *, target: str, method: str, precision: str, seed: int, adapter: Adapter,
                   optim: Optim, out: Path, stem: str, run_name: str, tags: dict[str, str],
                   extra_params: Optional[dict[str, Any]] = None, callbacks: Optional[list] = None,
                   parent_run_id: Optional[str] = None, touch_test: bool = True,
                   base_bytes: Optional[float] = None) -> tuple[Optional[dict], list[dict]]:
    """Train, finalise (permanent pruning, frozen k-bit codes), measure memory, save the adapter
    files under `out/stem.*`. With touch_test=False (sweep trials) the test split is not read.
    In the extra processes of a multi-device strategy the row holds only `primary: False`, the lr
    and the (synchronised) val accuracy, and nothing is written."""
    seed_everything(seed, params)
    net, data, prefix_s = build_net(params, target, method, precision, seed, adapter, optim.batch_size)
    raw = PreparedData(PREPARED / target, 1, 0, seed)  # untouched inputs for the final numbers
    prune = adapter.prune
    pruning = method in ("serial", "parallel") and prune.amount > 0
    cbs, gate, epochs = list(callbacks or []), None, optim.max_epochs
    if pruning:  # dense phase (up to the cap), the rounds, then the sparse network under the same rule
        cb = PruningCallback(net.adapter_convs(), prune.amount, prune.rounds, prune.epochs, optim.max_epochs,
                             prune.scope, optim.patience, optim.min_delta)
        cbs.append(cb)
        gate, epochs = cb.selecting, 2 * optim.max_epochs + prune.rounds * prune.epochs
    keys = transfer_keys(target, method, precision, adapter, seed, head_bits(params, method))
    base_file = BASE_DIR / precision / "model.pt"
    base_sha = sha256(base_file)
    result = fit_and_evaluate(
        params, net, data, optim, epochs=epochs, callbacks=cbs, gate=gate,
        run_name=run_name, tags=tags, parent_run_id=parent_run_id, test=touch_test,
        flat_params={**keys, "lr": optim.lr, "batch_size": optim.batch_size, "max_epochs": epochs,
                     "patience": optim.patience, "min_delta": optim.min_delta, "base_sha256": base_sha,
                     **(extra_params or {})},
        ckpt_dir=out / "checkpoints" / stem,
    )
    if not result.primary:  # an extra DDP process: only what keeps the stage's choices in step
        return {"primary": False, "lr": optim.lr, "val_acc": result.val_acc}, []
    loss = result.run.trainer.callback_metrics.get("train_loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise TrainingDiverged(f"training diverged (train loss {float(loss)})")
    net.start = 0
    net.finalize()
    net.eval()
    task_plan = storage_plan(net, include=net.is_task_module)
    task = memory_report(net, include=net.is_task_module)
    adapter_mem = memory_report(net, include=lambda n, m: ".adapter" in n)
    base_bytes = base_bytes or base_memory_bytes()
    row = {
        **keys,
        "sparsity": round(sparsity(net.adapter_convs()), 6),
        "val_acc": accuracy(net, *raw.splits["val"]),
        "test_acc": accuracy(net, *raw.splits["test"]) if touch_test else None,
        "task_memory_bytes": task.bytes,
        "adapter_memory_bytes": adapter_mem.bytes,
        "base_memory_bytes": base_bytes,
        "memory_ratio": task.bytes / base_bytes,
        **{f"mem_{k}_bytes": v for k, v in breakdown(task_plan).items()},  # BREAKDOWN_COLUMNS
        **result.timing_metrics(prefix_s),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "lr": optim.lr,
        **result.convergence(),
    }
    packed_meta = {"target": target, "method": method, "precision": precision, "seed": seed,
                   "arch": net.base.arch.to_dict(), "spec": net.spec.to_dict(), "num_classes": raw.num_classes,
                   "classes": raw.manifest["classes"], "base_sha256": base_sha,
                   "dataset_sha256": raw.manifest["sha256"]}  # TASK_META: enough to run it on its base
    packed = export_packed(net, out / f"{stem}.bnnpack", packed_meta, include=net.is_task_module)
    row["packed_payload_bytes"] = packed["payload_bytes"]
    save_adapter(net, out / stem, {
        "target": target, "method": method, "precision": precision, "seed": seed,
        "base": str(base_file), "base_sha256": base_sha,
        "classes": raw.manifest["classes"], "dataset_sha256": raw.manifest["sha256"],
        "memory": {"task": task.to_dict(), "adapter_bytes": adapter_mem.bytes, "packed": packed},
        "metrics": {k: row[k] for k in ("val_acc", "test_acc", "task_memory_bytes", "memory_ratio")},
    })  # no run id here: same params and seed give byte-identical adapter files
    result.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))
                        and k not in keys})
    for suffix in (".safetensors", ".json"):
        result.log_artifact(out / f"{stem}{suffix}")
    curve = [{"seed": seed, "lr": optim.lr, "epoch": r.epoch, "elapsed_train_s": round(prefix_s + r.elapsed_train_s, 4),
              "val_acc": r.val_acc}
             for r in result.run.timing.history]
    return row, curve
