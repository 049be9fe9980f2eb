"""Fit, then evaluate the best-val checkpoint on val and test: the path every training stage takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import Optim, Params
from pipeline.train.datamodule import PreparedData
from pipeline.train.module import Classifier
from pipeline.train.trainer import Run, make_trainer


@dataclass
class FitResult:
    module: Classifier
    run: Run
    val_acc: float
    test_acc: Optional[float]

    @property
    def run_id(self) -> str:
        return self.run.logger.run_id

    def timing_metrics(self) -> dict[str, float]:
        t = self.run.timing
        return {
            "train_time_s": round(t.train_time_s, 3),
            "epoch_time_s": round(t.epoch_time_s, 4),
            "time_to_95_s": round(t.time_to_fraction(0.95) or 0.0, 3),
        }

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.logger.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: Path) -> None:
        self.run.logger.experiment.log_artifact(self.run_id, str(path))


def fit_and_evaluate(params: Params, net: torch.nn.Module, data: PreparedData, optim: Optim, *,
                     run_name: str, tags: dict[str, str], flat_params: dict[str, Any],
                     ckpt_dir: Optional[Path] = None, epochs: Optional[int] = None,
                     callbacks: Optional[list] = None, select: str = "best",
                     parent_run_id: Optional[str] = None, test: bool = True) -> FitResult:
    """`select`: evaluate the best-val checkpoint ("best") or the final weights ("last", for
    pruning, where earlier and denser checkpoints would flatter the result). `test=False` leaves
    the test split untouched (sweeps select on val only)."""
    module = Classifier(net, optim, data.num_classes)
    run = make_trainer(params, run_name=run_name, tags=tags, epochs=epochs or optim.epochs,
                       ckpt_dir=ckpt_dir, callbacks=callbacks, parent_run_id=parent_run_id)
    run.logger.log_hyperparams(flat_params)
    run.trainer.fit(module, datamodule=data)
    if select == "best" and run.checkpoint is not None and run.checkpoint.best_model_path:
        state = torch.load(run.checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    val = run.trainer.validate(module, datamodule=data, verbose=False)[0]["val_acc"]
    test_acc = float(run.trainer.test(module, datamodule=data, verbose=False)[0]["test_acc"]) if test else None
    return FitResult(module, run, float(val), test_acc)
