"""The one place that silences library messages this project triggers on purpose. Each is named by
the start of its message and the module that raises it, with why it is harmless; every other
warning still shows. The filters reach spawned processes (sweep workers, DDP) through PYTHONWARNINGS."""

from __future__ import annotations

import logging
import os
import re
import warnings

# (start of the message, no comma or colon; module that warns; why it is harmless here)
HARMLESS = [
    ("`isinstance(treespec", "lightning.pytorch.utilities._pytree",
     "Lightning 2.6 calls its own deprecated pytree API (LeafSpec); nothing this project calls"),
    ("Found ", "lightning.pytorch.loops.fit_loop",
     "'Found N module(s) in eval mode': the frozen base's BatchNorm stays in eval mode by design "
     "(TransferNet.train), so its running statistics stay those of the shared base"),
    ("Checkpoint directory ", "lightning.pytorch.callbacks.model_checkpoint",
     "'... exists and is not empty': resume.json is written there before fit, to key the resume"),
]


class _PerRunNoise(logging.Filter):
    """Lightning's info lines printed at every Trainer (dozens per stage): the hardware summary,
    which params.yaml's trainer section already states; why fit ended, which the run's own line
    (epochs run, stopped early) states; checkpoint restores, which the pipeline's own "resuming"
    line names; and an advert for a cloud logger."""

    PREFIXES = ("GPU available", "TPU available", "HPU available", "LOCAL_RANK", "`Trainer.fit` stopped",
                "Restoring states from the checkpoint", "Restored all states from the checkpoint")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith(self.PREFIXES) or "litlogger" in text)


def quiet() -> None:
    for message, module, _why in HARMLESS:
        warnings.filterwarnings("ignore", message=re.escape(message), module=re.escape(module) + r"\Z")
    inherited = [s for s in os.environ.get("PYTHONWARNINGS", "").split(",") if s]
    specs = [f"ignore:{message}::{module}" for message, module, _why in HARMLESS]
    os.environ["PYTHONWARNINGS"] = ",".join(inherited + [s for s in specs if s not in inherited])
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_PerRunNoise())
