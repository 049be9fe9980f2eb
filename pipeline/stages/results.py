"""Stage `results`: the per-run row files of every transfer run -> reports/results.csv.
Each transfer run owns its own rows file, so parallel runs never write the same file."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.paths import RESULTS_CSV as OUT, RESULTS_DIR as ROWS



def run(params: Params) -> pd.DataFrame:
    files = sorted(ROWS.glob("*.csv"))
    if not files:
        raise UserError(f"results: no rows in {ROWS}/; run the transfer stage first (`dvc repro transfer`)")
    table = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    table = table.sort_values(["target", "method", "precision", "seed"], kind="stable")
    table.to_csv(OUT, index=False)
    print(f"results: {len(table)} rows from {len(files)} runs -> {OUT}")
    return table
