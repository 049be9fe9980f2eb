"""Stage `results`: the per-arm row and prediction files of every transfer arm ->
reports/results.csv, and with the sweep's retrained points' predictions ->
reports/predictions/<target>.npz (every reported run of one target in one file). Each arm and
sweep owns its own files, so parallel stages never write the same file."""

from __future__ import annotations

import pandas as pd

from pipeline import predictions
from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.paths import PREDICTIONS_DIR, RESULTS_CSV as OUT, RESULTS_DIR as ROWS, sweep_dir


def run(params: Params) -> pd.DataFrame:
    arms = sorted(ROWS.glob("*.csv"))
    if not arms:
        raise UserError(f"results: no rows in {ROWS}/; run the transfer stage first (`dvc repro transfer`)")
    table = pd.concat([pd.read_csv(f) for f in arms], ignore_index=True)
    table = table.sort_values(["target", "method", "precision", "seed"], kind="stable")
    table.to_csv(OUT, index=False)
    for stale in PREDICTIONS_DIR.glob("*.npz"):  # a target no longer run leaves no file behind
        stale.unlink()
    for target in sorted(table.target.unique()):
        sweep = sweep_dir(target) / "predictions.npz"
        files = [*sorted(ROWS.glob(f"{target}__*.npz")), *([sweep] if sweep.exists() else [])]
        predictions.Predictions.read(*files).save(PREDICTIONS_DIR / f"{target}.npz")
    print(f"results: {len(table)} rows from {len(arms)} arms -> {OUT}, predictions -> {PREDICTIONS_DIR}/<target>.npz")
    return table
