"""One transfer run (base + new head [+ adapters] trained on a target, finalised, measured and
saved): shared by the transfer stage and by sweep trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from pipeline.config import BASE_DIR, PREPARED, Adapter, Optim, Params
from pipeline.errors import UserError
from pipeline.nn.adapter_io import save_adapter
from pipeline.nn.adapters import AdapterSpec, TransferNet
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.nn.export import export_packed
from pipeline.nn.memory import memory_report
from pipeline.nn.pruning import sparsity
from pipeline.train.datamodule import PreparedData
from pipeline.train.evaluate import accuracy
from pipeline.train.fit import fit_and_evaluate
from pipeline.train.tracking import transfer_keys
from pipeline.train.trainer import PruningCallback, seed_everything


class TrainingDiverged(UserError):
    pass


def base_memory_bytes() -> float:
    """Memory ratios are always against the binary base."""
    return memory_report(load_base(BASE_DIR / "binary" / "model.pt")).bytes


def build_net(params: Params, target: str, method: str, precision: str, seed: int, adapter: Adapter,
              batch_size: int) -> tuple[TransferNet, PreparedData]:
    """Base + new head (+ adapters), and the data it trains on (frozen-prefix features cached)."""
    base = load_base(BASE_DIR / precision / "model.pt")
    a = adapter
    spec = AdapterSpec(method, a.groups, a.reduction, a.placement, a.task_bn, a.bits, a.head_bits) \
        if method in ("serial", "parallel") else AdapterSpec(method)
    data = PreparedData(PREPARED / target, batch_size, params.trainer.num_workers, seed)
    net = TransferNet(base, spec, data.num_classes)
    k = net.frozen_prefix()
    if k:  # run the frozen part once, without autograd, instead of every epoch
        data = data.map_inputs(lambda x: net.prefix_features(x, k))
        net.start = k
    return net, data


def train_transfer(params: Params, *, target: str, method: str, precision: str, seed: int, adapter: Adapter,
                   optim: Optim, out: Path, stem: str, run_name: str, tags: dict[str, str],
                   extra_params: Optional[dict[str, Any]] = None, callbacks: Optional[list] = None,
                   parent_run_id: Optional[str] = None, touch_test: bool = True,
                   base_bytes: Optional[float] = None) -> tuple[Optional[dict], list[dict]]:
    """Train, finalise (permanent pruning, frozen k-bit codes), measure memory, save the adapter
    files under `out/stem.*`. With touch_test=False (sweep trials) the test split is not read.
    Returns (None, []) in the extra processes of a multi-device strategy."""
    seed_everything(seed, params)
    net, data = build_net(params, target, method, precision, seed, adapter, optim.batch_size)
    raw = PreparedData(PREPARED / target, 1, 0, seed)  # untouched inputs for the final numbers
    prune = adapter.prune
    pruning = method in ("serial", "parallel") and prune.amount > 0
    epochs = optim.epochs + (prune.rounds * prune.epochs if pruning else 0)
    cbs = list(callbacks or [])
    if pruning:
        cbs.append(PruningCallback(net.adapter_convs(), prune.amount, prune.rounds, prune.epochs, optim.epochs, prune.scope))
    keys = transfer_keys(target, method, precision, adapter, seed)
    result = fit_and_evaluate(
        params, net, data, optim, epochs=epochs, callbacks=cbs, select="last" if pruning else "best",
        run_name=run_name, tags=tags, parent_run_id=parent_run_id, test=touch_test,
        flat_params={**keys, "epochs": epochs, "lr": optim.lr, "batch_size": optim.batch_size, **(extra_params or {})},
        ckpt_dir=out / "checkpoints" / stem,
    )
    if not result.primary:
        return None, []
    loss = result.run.trainer.callback_metrics.get("train_loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise TrainingDiverged(f"training diverged (train loss {float(loss)})")
    net.start = 0
    net.finalize()
    net.eval()
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
        **result.timing_metrics(),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "epochs": epochs,
        "epochs_run": len(result.run.timing.history),
    }
    packed = export_packed(net, out / f"{stem}.bnnpack", {"target": target, "method": method},
                           include=net.is_task_module)
    row["packed_payload_bytes"] = packed["payload_bytes"]
    base_file = BASE_DIR / precision / "model.pt"
    save_adapter(net, out / stem, {
        "target": target, "method": method, "precision": precision, "seed": seed,
        "base": str(base_file), "base_sha256": sha256(base_file),
        "classes": raw.manifest["classes"], "dataset_sha256": raw.manifest["sha256"],
        "memory": {"task": task.to_dict(), "adapter_bytes": adapter_mem.bytes, "packed": packed},
        "metrics": {k: row[k] for k in ("val_acc", "test_acc", "task_memory_bytes", "memory_ratio")},
    })  # no run id here: same params and seed give byte-identical adapter files
    result.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and k not in keys})
    for suffix in (".safetensors", ".json"):
        result.log_artifact(out / f"{stem}{suffix}")
    curve = [{"seed": seed, "epoch": r.epoch, "elapsed_train_s": round(r.elapsed_train_s, 4), "val_acc": r.val_acc}
             for r in result.run.timing.history]
    return row, curve
