"""The quiet console: exactly the known harmless library messages are silenced (by message and
module), in this process and in the processes it spawns; every other warning still shows."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

from pipeline.console import HARMLESS, quiet

LEAF = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
EVAL = "Found 6 module(s) in eval mode at the start of training. This may lead to unexpected behavior"
CKPT = "Checkpoint directory /x/checkpoints/lr0p01 exists and is not empty."
CASES = [(LEAF, "lightning.pytorch.utilities._pytree"), (EVAL, "lightning.pytorch.loops.fit_loop"),
         (CKPT, "lightning.pytorch.callbacks.model_checkpoint")]


def _shown(message: str, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet()
        warnings.warn_explicit(message, UserWarning, "lib.py", 1, module=module, registry={})
    return any(message in str(w.message) for w in caught)


def test_each_harmless_message_is_silenced_only_from_its_own_module(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "")  # restored after the test, whatever quiet() writes
    assert len(HARMLESS) == len(CASES)
    for message, module in CASES:
        assert not _shown(message, module), module
        assert _shown(message, "pipeline.train.fit"), module            # same words, another module: shown
        assert _shown("something else went wrong", module), module       # same module, another message: shown


def test_filters_reach_spawned_processes_and_repeat_calls_add_nothing(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "default::ResourceWarning")
    quiet()
    once = os.environ["PYTHONWARNINGS"]
    quiet()
    assert os.environ["PYTHONWARNINGS"] == once and once.startswith("default::ResourceWarning,")
    code = ("import warnings\n"
            + "".join(f"warnings.warn_explicit({m!r}, UserWarning, 'lib.py', 1, module={mod!r})\n" for m, mod in CASES)
            + "warnings.warn_explicit('a real problem', UserWarning, 'lib.py', 1, module='lightning.pytorch.loops.fit_loop')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)).stderr
    assert "a real problem" in err
    assert not any(m[:20] in err for m, _ in CASES), err


def test_per_run_lightning_info_lines_are_dropped_and_others_kept():
    import logging

    quiet()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    keep = logging.LogRecord(log.name, logging.INFO, "x.py", 1, "Missing logger folder: /tmp/x", None, None)
    assert all(f.filter(keep) for f in log.filters)
    for text in ("GPU available: False, used: False", "TPU available: False, using: 0 TPU cores",
                 "`Trainer.fit` stopped: `max_epochs=4` reached.",
                 "Restoring states from the checkpoint path at x/last.ckpt", "Restored all states from the checkpoint at x",
                 "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](x)"):
        record = logging.LogRecord(log.name, logging.INFO, "x.py", 1, text, None, None)
        assert not all(f.filter(record) for f in log.filters), text
