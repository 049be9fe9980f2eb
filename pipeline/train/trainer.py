"""The one trainer factory: MLflow logger, checkpoints (last and best-val), timing, seeds."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger

from pipeline.config import Optim, Params
from pipeline.errors import UserError, first_line
from pipeline.nn.pruning import prune_to
from pipeline.train.tracking import artifact_location, experiment_id, start_child_run, tracking_uri


@dataclass
class EpochRecord:
    epoch: int
    train_seconds: float      # this epoch, training only (no validation)
    elapsed_train_s: float    # cumulative training seconds at the end of this epoch
    val_acc: Optional[float] = None


class TimingCallback(Callback):
    """Training seconds per epoch, excluding validation, and val accuracy after each epoch."""

    def __init__(self):
        self.history: list[EpochRecord] = []
        self._t0: Optional[float] = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def _close(self, trainer) -> None:
        if self._t0 is None:
            return
        seconds = time.perf_counter() - self._t0
        self._t0 = None
        elapsed = (self.history[-1].elapsed_train_s if self.history else 0.0) + seconds
        self.history.append(EpochRecord(trainer.current_epoch, seconds, elapsed))

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._close(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and self.history and "val_acc" in trainer.callback_metrics:
            self.history[-1].val_acc = float(trainer.callback_metrics["val_acc"])

    def on_train_epoch_end(self, trainer, pl_module):
        self._close(trainer)

    def state_dict(self) -> dict:  # saved in checkpoints, so a resumed run keeps its history
        return {"history": [vars(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [EpochRecord(**r) for r in state.get("history", [])]

    @property
    def train_time_s(self) -> float:
        return sum(r.train_seconds for r in self.history)

    @property
    def epoch_time_s(self) -> float:
        return statistics.median(r.train_seconds for r in self.history) if self.history else 0.0

    def still_improving(self, min_delta: float, window: int = 3) -> bool:
        """Val accuracy of the last `window` epochs beat everything before them by more than
        `min_delta`: a run that stops there (at its cap) had not converged."""
        accs = [r.val_acc for r in self.history if r.val_acc is not None]
        if len(accs) <= window:
            return True
        return max(accs[-window:]) - max(accs[:-window]) > min_delta

    def time_to_fraction(self, fraction: float = 0.95) -> Optional[float]:
        """Training seconds until val accuracy first reaches `fraction` of its final value."""
        accs = [r for r in self.history if r.val_acc is not None]
        if not accs:
            return None
        goal = fraction * accs[-1].val_acc
        return next(r.elapsed_train_s for r in accs if r.val_acc >= goal)


class PruningCallback(Callback):
    """Iterative magnitude pruning once the dense network has converged: the dense phase ends when
    val accuracy has not gained more than `min_delta` for `patience` epochs (or at `dense_cap`
    epochs); then one round every `every` epochs, sparsity rising linearly to `amount` at the last
    of `rounds` rounds. `selecting()` opens only after the last round, so early stopping and the
    best-val checkpoint judge the network at its final sparsity, never a denser one."""

    def __init__(self, convs, amount: float, rounds: int, every: int, dense_cap: int, scope: str,
                 patience: int, min_delta: float):
        self.convs, self.amount, self.rounds = convs, amount, rounds
        self.every, self.dense_cap, self.scope = every, dense_cap, scope
        self.patience, self.min_delta = patience, min_delta
        self.done, self.best, self.wait, self.next_round = 0, float("-inf"), 0, None

    def selecting(self) -> bool:
        return self.done >= self.rounds

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.next_round is not None or "val_acc" not in trainer.callback_metrics:
            return
        acc = float(trainer.callback_metrics["val_acc"])
        if acc > self.best + self.min_delta:
            self.best, self.wait = acc, 0
        else:
            self.wait += 1
        if self.wait >= self.patience or trainer.current_epoch + 1 >= self.dense_cap:
            self.next_round = trainer.current_epoch + 1

    def on_train_epoch_start(self, trainer, pl_module):
        if self.next_round is not None and self.done < self.rounds and trainer.current_epoch >= self.next_round:
            self.done += 1
            self.next_round = trainer.current_epoch + self.every
            prune_to(self.convs, self.amount * self.done / self.rounds, self.scope)

    def state_dict(self):
        return {"done": self.done, "best": self.best, "wait": self.wait, "next_round": self.next_round}

    def load_state_dict(self, state):
        self.done, self.best, self.wait, self.next_round = state["done"], state["best"], state["wait"], state["next_round"]


class TrialPruning(Callback):
    """Reports each epoch's val accuracy to an Optuna trial and stops training once its pruner
    says so (`pruned_at`: that epoch, else None). Optuna's own Lightning callback lives in
    optuna-integration, which this project does not install for one hook."""

    def __init__(self, trial):
        self.trial, self.pruned_at = trial, None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or "val_acc" not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics["val_acc"]), trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_at = trainer.current_epoch + 1
            trainer.should_stop = True


class _Gated:
    """Early stopping and the best-val checkpoint act only while `gate()` holds (pruned runs:
    after the last pruning round)."""

    def __init__(self, gate: Optional[Callable[[], bool]] = None, **kwargs):
        super().__init__(**kwargs)
        self.gate = gate

    def _closed(self) -> bool:
        return self.gate is not None and not self.gate()


class GatedEarlyStopping(_Gated, EarlyStopping):
    def _should_skip_check(self, trainer) -> bool:
        return super()._should_skip_check(trainer) or self._closed()


class GatedCheckpoint(_Gated, ModelCheckpoint):
    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        return super()._should_skip_saving_checkpoint(trainer) or self._closed()


class EpochBar(TQDMProgressBar):
    """One bar per run on a terminal; validation (a few batches) gets none."""

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar


class EpochLines(Callback):
    """One line per epoch where output is a log, not a terminal (redrawn bars would fill it)."""

    def __init__(self, run_name: str):
        self.run_name = run_name

    def on_train_epoch_end(self, trainer, pl_module):  # validation has run by now
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k in ("train_loss", "val_acc")}
        print(f"{self.run_name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
              + " ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)


@dataclass
class Run:
    trainer: L.Trainer
    logger: MLFlowLogger
    timing: TimingCallback
    checkpoint: Optional[ModelCheckpoint] = None
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int, params: Params) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
    if params.trainer.threads:
        torch.set_num_threads(params.trainer.threads)


def make_trainer(params: Params, *, run_name: str, tags: dict[str, str], optim: Optim, epochs: Optional[int] = None,
                 ckpt_dir: Optional[Path] = None, callbacks: Optional[list[Callback]] = None,
                 parent_run_id: Optional[str] = None, run_id: Optional[str] = None,
                 gate: Optional[Callable[[], bool]] = None) -> Run:
    """`epochs` overrides optim.max_epochs (pruned runs add their rounds); `gate` holds early
    stopping and best-val selection back until it returns True."""
    t = params.trainer
    experiment_id(params)  # created (or tagged) here with its kind, not by the logger without one
    logger = MLFlowLogger(
        experiment_name=params.tracking.experiment,
        run_name=run_name,
        tracking_uri=tracking_uri(params),  # explicit: Lightning's own default is a deprecated file store
        tags=tags,
        artifact_location=artifact_location(params),
        run_id=run_id or (start_child_run(params, parent_run_id, run_name, tags) if parent_run_id else None),
    )
    timing = TimingCallback()
    # The one training rule: early stopping on val accuracy, the best-val weights kept.
    stop = GatedEarlyStopping(gate=gate, monitor="val_acc", mode="max", patience=optim.patience,
                              min_delta=optim.min_delta, check_finite=True)
    cbs: list[Callback] = [timing, *(callbacks or []), stop]
    ckpt = None
    if ckpt_dir is not None:
        ckpt = GatedCheckpoint(gate=gate, dirpath=ckpt_dir, filename="best", monitor="val_acc", mode="max",
                               enable_version_counter=False)
        # A second callback for the resume point: Lightning's save_last writes last.ckpt only in
        # epochs that also save a top-k checkpoint, i.e. at the best epoch, not the last one.
        last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                               enable_version_counter=False)
        cbs += [ckpt, last]
    bar = t.progress_bar and sys.stdout.isatty()
    if t.progress_bar:
        cbs.append(EpochBar(refresh_rate=10) if bar else EpochLines(run_name))
    try:
        trainer = L.Trainer(
            max_epochs=epochs or optim.max_epochs,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            precision=t.precision,
            deterministic=t.deterministic,
            logger=logger,
            callbacks=cbs,
            enable_checkpointing=ckpt is not None,
            enable_progress_bar=bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=str(ckpt_dir) if ckpt_dir else None,
        )
    except (ValueError, TypeError, RuntimeError) as exc:  # Lightning rejects the hardware settings
        raise UserError(f"trainer: {first_line(exc)} (accelerator={t.accelerator!r}, devices={t.devices!r}, "
                        f"strategy={t.strategy!r}, precision={t.precision!r})") from None
    return Run(trainer, logger, timing, ckpt, {"max_epochs": epochs or optim.max_epochs, "min_delta": optim.min_delta})
