"""Stage `pretrain`: train the base on the source task -> models/base/<precision>/ (checkpoint,
packed file, model card) and reports/metrics/pretrain_<precision>.json."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import predictions
from pipeline.config import Params, as_flat_dict
from pipeline.io import write_json
from pipeline.nn.backbones import Arch, Backbone, build_backbone
from pipeline.nn.checkpoint import save_base
from pipeline.nn.export import export_packed
from pipeline.nn.inference import predict
from pipeline.nn.memory import memory_report
from pipeline.paths import METRICS_DIR, base_dir, prepared
from pipeline.train.datamodule import PreparedData
from pipeline.train.fit import FitResult, fit_and_evaluate
from pipeline.train.tracking import run_tags
from pipeline.train.trainer import seed_everything


def run(params: Params, precision: str) -> dict:
    t0 = time.perf_counter()
    p, seed = params.pretrain, params.seeds[0]
    seed_everything(seed, params)
    data = PreparedData(prepared(p.source), p.optim.batch_size, params.trainer.num_workers, seed)
    net = build_backbone(Arch(params.model.name, precision, data.num_classes, params.data.channels,
                              params.data.input_size, params.model.width))
    flat = {"stage": "pretrain", "precision": precision, "source": p.source, "seed": seed,
            **as_flat_dict(params.model, "model."), **as_flat_dict(p.optim, "optim.")}
    result = fit_and_evaluate(params, net, data, p.optim, lr=p.optim.lr, run_name=f"pretrain-{precision}",
                              tags=run_tags("pretrain", precision=precision), flat_params=flat, ckpt_dir=base_dir(precision))
    if not result.primary:  # an extra process of a multi-device strategy: only the primary writes
        return {}
    net.eval()
    metrics = save_pretrained(params, net, result, data, base_dir(precision))
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_json(METRICS_DIR / f"pretrain_{precision}.json", metrics)
    result.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("val_acc", "test_acc")})
    result.log_artifact(base_dir(precision) / "card.json")
    print(f"pretrain {precision}: val {metrics['val_acc']:.4f} test {metrics['test_acc']:.4f} "
          f"memory {metrics['memory_bytes'] / 1024:.1f} KiB, {metrics['epochs_run']} epochs, "
          f"{metrics['train_time_s']:.1f}s training")
    return metrics


def save_pretrained(params: Params, net: Backbone, result: FitResult, data: PreparedData, out: Path) -> dict:
    """The checkpoint, its packed file and the model card (architecture, memory, source accuracy);
    returns the stage's metrics."""
    memory = memory_report(net)
    preds = {s: predict(net, data.splits[s][0]).numpy() for s in predictions.SPLITS}
    predictions.write(out / "predictions.npz", {s: data.splits[s][1].numpy() for s in predictions.SPLITS},
                      {predictions.run_key("pretrain", params.seeds[0]): preds})
    acc = {s: float((preds[s] == data.splits[s][1].numpy()).mean()) for s in predictions.SPLITS}
    sha = save_base(net, out / "model.pt")
    packed = export_packed(net, out / "model.bnnpack", {"arch": net.arch.to_dict(), "base_sha256": sha})
    metrics = {
        "val_acc": round(acc["val"], 4),   # from the stored predictions (predictions.npz)
        "test_acc": round(acc["test"], 4),
        "memory_bytes": memory.bytes,
        "packed_payload_bytes": packed["payload_bytes"],
        "params": memory.params,
        **result.convergence(),
        **result.timing_metrics(),
        "dataset_sha256": data.manifest["sha256"]["train"][:16],
    }
    write_json(out / "card.json", {
        "architecture": net.arch.to_dict(), "source": params.pretrain.source, "dataset_sha256": data.manifest["sha256"],
        "classes": data.manifest["classes"], "sha256": sha, "metrics": metrics, "memory": memory.to_dict(),
        "packed": packed, "mlflow_run_id": result.run_id, "optim": as_flat_dict(params.pretrain.optim),
        "seed": params.seeds[0],
    })
    return metrics
