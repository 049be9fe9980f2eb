"""Stage `transfer`: one (target, method[, precision]) over every seed -> models/<target>/<method>/,
reports/metrics/transfer_<target>_<method>.json and its rows for reports/results.csv."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from pipeline.config import BASE_DIR, METRICS_DIR, PREPARED, Params
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.nn.adapter_io import save_adapter
from pipeline.nn.adapters import AdapterSpec, TransferNet
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.nn.export import export_packed
from pipeline.nn.memory import memory_report
from pipeline.nn.pruning import sparsity
from pipeline.train.datamodule import PreparedData
from pipeline.train.evaluate import accuracy
from pipeline.train.fit import fit_and_evaluate
from pipeline.train.tracking import run_tags, transfer_keys
from pipeline.train.trainer import PruningCallback, seed_everything

RESULTS_DIR = Path("reports/results")


def variant(method: str, precision: str) -> str:
    return method if precision == "binary" else f"{method}_{precision}"


def check_args(params: Params, target: str, method: str, precision: str) -> None:
    if target not in params.data.datasets:
        raise UserError(f"transfer: unknown target '{target}'; allowed (data.datasets): {', '.join(params.data.datasets)}")
    if method != "full" and precision != "binary":
        raise UserError(f"transfer: --precision {precision} applies to --method full only; {method} runs on the binary base")


def build_net(params: Params, target: str, method: str, precision: str, seed: int):
    """Base + new head (+ adapters), and the data it trains on (frozen-prefix features cached)."""
    o = params.transfer.optim
    base = load_base(BASE_DIR / precision / "model.pt")
    a = params.adapter
    spec = AdapterSpec(method, a.groups, a.reduction, a.placement, a.task_bn, a.bits, a.head_bits) \
        if method in ("serial", "parallel") else AdapterSpec(method)
    data = PreparedData(PREPARED / target, o.batch_size, params.trainer.num_workers, seed)
    net = TransferNet(base, spec, data.num_classes)
    k = net.frozen_prefix()
    if k:  # run the frozen part once, without autograd, instead of every epoch
        data = data.map_inputs(lambda x: net.prefix_features(x, k))
        net.start = k
    return net, data


def run_one(params: Params, target: str, method: str, precision: str, seed: int, out: Path,
            base_memory_bytes: float, stem: str) -> tuple[dict, list[dict]]:
    seed_everything(seed, params)
    net, data = build_net(params, target, method, precision, seed)
    raw = PreparedData(PREPARED / target, 1, 0, seed)  # untouched inputs for the final numbers
    prune = params.adapter.prune
    pruning = method in ("serial", "parallel") and prune.amount > 0
    o = params.transfer.optim
    epochs = o.epochs + (prune.rounds * prune.epochs if pruning else 0)
    callbacks = [PruningCallback(net.adapter_convs(), prune.amount, prune.rounds, prune.epochs, o.epochs, prune.scope)] \
        if pruning else []
    keys = transfer_keys(target, method, precision, params.adapter, seed)
    result = fit_and_evaluate(
        params, net, data, o, epochs=epochs, callbacks=callbacks, select="last" if pruning else "best",
        run_name=f"transfer-{target}-{variant(method, precision)}-s{seed}",
        tags=run_tags("transfer", **{k: keys[k] for k in ("target", "method", "precision")}),
        flat_params={**keys, "epochs": epochs, "lr": o.lr, "batch_size": o.batch_size},
        ckpt_dir=out / "checkpoints" / f"seed{seed}",
    )
    net.start = 0
    net.finalize()
    net.eval()
    task = memory_report(net, include=net.is_task_module)
    adapter_mem = memory_report(net, include=lambda n, m: ".adapter" in n)
    row = {
        **keys,
        "sparsity": round(sparsity(net.adapter_convs()), 6),
        "val_acc": accuracy(net, *raw.splits["val"]),
        "test_acc": accuracy(net, *raw.splits["test"]),
        "task_memory_bytes": task.bytes,
        "adapter_memory_bytes": adapter_mem.bytes,
        "base_memory_bytes": base_memory_bytes,
        "memory_ratio": task.bytes / base_memory_bytes,
        **result.timing_metrics(),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "epochs": epochs,
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
        "mlflow_run_id": result.run_id,
    })
    result.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and k not in keys})
    for suffix in (".safetensors", ".json"):
        result.log_artifact(out / f"{stem}{suffix}")
    curve = [{"seed": seed, "epoch": r.epoch, "elapsed_train_s": round(r.elapsed_train_s, 4), "val_acc": r.val_acc}
             for r in result.run.timing.history]
    return row, curve


def run(params: Params, target: str, method: str, precision: str = "binary") -> dict:
    check_args(params, target, method, precision)
    name = variant(method, precision)
    out = Path("models") / target / name
    base_memory = memory_report(load_base(BASE_DIR / "binary" / "model.pt")).bytes  # ratios: vs the binary base
    rows, curves = [], []
    for i, seed in enumerate(params.seeds):
        stem = "adapter" if i == 0 else f"adapter_seed{seed}"
        row, curve = run_one(params, target, method, precision, seed, out, base_memory, stem)
        rows.append(row)
        curves += curve
        print(f"transfer {target}/{name} seed {seed}: val {row['val_acc']:.4f} test {row['test_acc']:.4f} "
              f"task memory {row['task_memory_bytes'] / 1024:.2f} KiB ({100 * row['memory_ratio']:.1f}% of base), "
              f"{row['train_time_s']:.1f}s")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS_DIR / f"{target}__{name}.csv", index=False)
    pd.DataFrame(curves).to_csv(METRICS_DIR / f"transfer_{target}_{name}_curve.csv", index=False)
    numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"]
    summary = {k: round(statistics.mean(r[k] for r in rows), 6) for k in numeric}
    summary["seeds"] = len(rows)
    write_json(METRICS_DIR / f"transfer_{target}_{name}.json", summary)
    return summary
