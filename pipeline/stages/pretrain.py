"""Stage `pretrain`: train the base on the source task -> models/base/<precision>/."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Params, as_flat_dict
from pipeline.paths import METRICS_DIR, base_dir, prepared
from pipeline.io import write_json
from pipeline.nn.backbones import Arch, build_backbone
from pipeline.nn.checkpoint import save_base
from pipeline.nn.export import export_packed
from pipeline.nn.memory import memory_report
from pipeline.train.datamodule import PreparedData
from pipeline.train.fit import fit_and_evaluate
from pipeline.train.tracking import run_tags
from pipeline.train.trainer import seed_everything


def run(params: Params, precision: str) -> dict:
    t0 = time.perf_counter()
    p, seed = params.pretrain, params.seeds[0]
    seed_everything(seed, params)
    data = PreparedData(prepared(p.source), p.optim.batch_size, params.trainer.num_workers, seed)
    arch = Arch(params.model.name, precision, data.num_classes, params.data.channels,
                params.data.input_size, params.model.width)
    net = build_backbone(arch)
    out = base_dir(precision)
    flat = {"stage": "pretrain", "precision": precision, "source": p.source, "seed": seed,
            **as_flat_dict(params.model, "model."), **as_flat_dict(p.optim, "optim.")}
    result = fit_and_evaluate(params, net, data, p.optim, run_name=f"pretrain-{precision}",
                              tags=run_tags("pretrain", precision=precision), flat_params=flat, ckpt_dir=out)
    if not result.primary:
        return {}

    net.eval()
    memory = memory_report(net)
    sha = save_base(net, out / "model.pt")
    packed = export_packed(net, out / "model.bnnpack", {"arch": arch.to_dict(), "base_sha256": sha})
    metrics = {
        "val_acc": round(result.val_acc, 4),
        "test_acc": round(result.test_acc, 4),
        "memory_bytes": memory.bytes,
        "packed_payload_bytes": packed["payload_bytes"],
        "params": memory.params,
        **result.convergence(),
        **result.timing_metrics(),
        "dataset_sha256": data.manifest["sha256"]["train"][:16],
    }
    card = {
        "architecture": arch.to_dict(),
        "source": p.source,
        "dataset_sha256": data.manifest["sha256"],
        "classes": data.manifest["classes"],
        "sha256": sha,
        "metrics": metrics,
        "memory": memory.to_dict(),
        "packed": packed,
        "mlflow_run_id": result.run_id,
        "optim": as_flat_dict(p.optim),
        "seed": seed,
    }
    write_json(out / "card.json", card)
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_json(METRICS_DIR / f"pretrain_{precision}.json", metrics)
    result.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("val_acc", "test_acc")})
    result.log_artifact(out / "card.json")
    print(f"pretrain {precision}: val {metrics['val_acc']:.4f} test {metrics['test_acc']:.4f} "
          f"memory {memory.bytes / 1024:.1f} KiB, {metrics['epochs_run']} epochs, {metrics['train_time_s']:.1f}s training")
    return metrics
