"""Fit, then evaluate the best-val checkpoint on val and test: the path every training stage takes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import Optim, Params
from pipeline.io import sha256
from pipeline.train.datamodule import PreparedData
from pipeline.train.module import Classifier
from pipeline.train.tracking import log_dataset
from pipeline.train.trainer import Run, make_trainer


@dataclass
class FitResult:
    module: Classifier
    run: Run
    val_acc: float
    test_acc: Optional[float]

    @property
    def primary(self) -> bool:
        """False in the extra processes of a multi-device strategy (DDP re-runs the command once per
        device): they train and evaluate in step, and only the primary writes outputs and logs."""
        return self.run.trainer.is_global_zero

    @property
    def run_id(self) -> str:
        return self.run.logger.run_id

    def convergence(self) -> dict[str, Any]:
        """epochs_run, whether early stopping ended the run, and whether it hit its cap while val
        accuracy was still rising (then it is flagged, not reported as converged)."""
        t, cap = self.run.timing, self.run.extra["max_epochs"]
        epochs_run = len(t.history)
        stopped = epochs_run < cap
        return {"epochs_run": epochs_run, "max_epochs": cap, "stopped_early": stopped,
                "hit_cap_improving": not stopped and t.still_improving(self.run.extra["min_delta"])}

    def timing_metrics(self, prefix_s: float = 0.0) -> dict[str, float]:
        """Training seconds, the frozen-prefix feature pass (`prefix_s`, run once before fit)
        included: a method that needs that pass pays for it."""
        t = self.run.timing
        return {
            "train_time_s": round(prefix_s + t.train_time_s, 3),
            "prefix_time_s": round(prefix_s, 3),
            "epoch_time_s": round(t.epoch_time_s, 4),
            "time_to_95_s": round(prefix_s + (t.time_to_fraction(0.95) or 0.0), 3),
        }

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.logger.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: Path) -> None:
        self.run.logger.experiment.log_artifact(self.run_id, str(path))


def resume_fingerprint(run_name: str, flat_params: dict, optim: Optim, lr: float, epochs: int, params: Params,
                       data: PreparedData) -> str:
    """Everything that shapes a run: its params, the budget, the hardware settings that change
    the arithmetic, and the sha256 of every split it reads (train/val/test). A checkpoint left by
    a run with another fingerprint is never resumed: a changed split or base must retrain."""
    t = params.trainer
    key = {"run": run_name, "params": flat_params, "optim": asdict(optim), "lr": lr, "epochs": epochs,
           "data": data.manifest["sha256"],
           "trainer": {k: getattr(t, k) for k in ("accelerator", "devices", "strategy", "precision", "deterministic")}}
    return sha256(key)


def find_resume(ckpt_dir: Optional[Path], fingerprint: str) -> dict[str, Any]:
    """A run killed mid-way left `last.ckpt` and `resume.json` in its checkpoint folder: resume it
    when the fingerprint is the same, else clear the folder and start afresh."""
    if ckpt_dir is None:
        return {"fingerprint": fingerprint}
    marker, last = ckpt_dir / "resume.json", ckpt_dir / "last.ckpt"
    try:
        saved = json.loads(marker.read_text()) if marker.exists() else {}
    except json.JSONDecodeError:
        saved = {}
    if last.exists() and saved.get("fingerprint") == fingerprint:
        return {"fingerprint": fingerprint, "ckpt": str(last), "run_id": saved.get("run_id")}
    return {"fingerprint": fingerprint, "stale": [last, ckpt_dir / "best.ckpt", marker]}


def fit_and_evaluate(params: Params, net: torch.nn.Module, data: PreparedData, optim: Optim, *, lr: float,
                     run_name: str, tags: dict[str, str], flat_params: dict[str, Any],
                     ckpt_dir: Optional[Path] = None, epochs: Optional[int] = None,
                     callbacks: Optional[list] = None, gate=None,
                     parent_run_id: Optional[str] = None, test: bool = True) -> FitResult:
    """The one training rule: up to `epochs` (default optim.max_epochs), early stopping on val
    accuracy, the best-val weights restored (with `gate`, the best among the epochs it allows).
    `test=False` leaves the test split untouched (sweeps select on val only)."""
    module = Classifier(net, optim, lr, data.num_classes)
    epochs = epochs or optim.max_epochs
    resume = find_resume(ckpt_dir, resume_fingerprint(run_name, flat_params, optim, lr, epochs, params, data))
    run = make_trainer(params, run_name=run_name, tags=tags, optim=optim, epochs=epochs, ckpt_dir=ckpt_dir,
                       callbacks=callbacks, parent_run_id=parent_run_id, run_id=resume.get("run_id"), gate=gate)
    if resume.get("ckpt"):
        run.logger.experiment.set_tag(run.logger.run_id, "resumed_from", resume["ckpt"])
        print(f"resuming {run_name} from {resume['ckpt']} (MLflow run {run.logger.run_id})")
    else:
        for stale in resume.get("stale", []):  # only now: a bad trainer setting must not cost the checkpoints
            stale.unlink(missing_ok=True)
        run.logger.log_hyperparams(flat_params)
        if run.trainer.is_global_zero:
            log_dataset(params, run.logger.run_id, data.folder, data.manifest)
        if ckpt_dir is not None and run.trainer.is_global_zero:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / "resume.json").write_text(json.dumps({"fingerprint": resume["fingerprint"], "run_id": run.logger.run_id}))
    run.trainer.fit(module, datamodule=data, ckpt_path=resume.get("ckpt"))
    if run.checkpoint is not None and run.checkpoint.best_model_path:
        state = torch.load(run.checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    val = run.trainer.validate(module, datamodule=data, verbose=False)[0]["val_acc"]
    test_acc = float(run.trainer.test(module, datamodule=data, verbose=False)[0]["test_acc"]) if test else None
    return FitResult(module, run, float(val), test_acc)
