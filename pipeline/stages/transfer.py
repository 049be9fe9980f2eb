"""Stage `transfer`: one (target, method[, precision]) over every seed -> models/<target>/<method>/,
reports/metrics/transfer_<target>_<method>.json and its rows for reports/results.csv."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd

from pipeline.config import METRICS_DIR, Params
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.train.tracking import run_tags
from pipeline.train.transfer import base_memory_bytes, train_transfer

RESULTS_DIR = Path("reports/results")


def variant(method: str, precision: str) -> str:
    return method if precision == "binary" else f"{method}_{precision}"


def run(params: Params, target: str, method: str, precision: str = "binary") -> dict:
    if target not in params.data.datasets:
        raise UserError(f"transfer: unknown target '{target}'; allowed (data.datasets): {', '.join(params.data.datasets)}")
    if method != "full" and precision != "binary":
        raise UserError(f"transfer: --precision {precision} applies to --method full only; {method} runs on the binary base")
    t0 = time.perf_counter()
    name = variant(method, precision)
    out = Path("models") / target / name
    base_bytes = base_memory_bytes()
    rows, curves = [], []
    for i, seed in enumerate(params.seeds):
        row, curve = train_transfer(
            params, target=target, method=method, precision=precision, seed=seed, adapter=params.adapter,
            optim=params.transfer.optim, out=out, stem="adapter" if i == 0 else f"adapter_seed{seed}",
            run_name=f"transfer-{target}-{name}-s{seed}", base_bytes=base_bytes,
            tags=run_tags("transfer", target=target, method=method, precision=precision),
        )
        if row is None:  # an extra process of a multi-device strategy: the primary writes
            continue
        rows.append(row)
        curves += curve
        print(f"transfer {target}/{name} seed {seed}: val {row['val_acc']:.4f} test {row['test_acc']:.4f} "
              f"task memory {row['task_memory_bytes'] / 1024:.2f} KiB ({100 * row['memory_ratio']:.1f}% of base), "
              f"{row['train_time_s']:.1f}s")
    if not rows:
        return {}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS_DIR / f"{target}__{name}.csv", index=False)
    pd.DataFrame(curves).to_csv(METRICS_DIR / f"transfer_{target}_{name}_curve.csv", index=False)
    numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"]
    summary = {k: round(statistics.mean(r[k] for r in rows), 6) for k in numeric}
    summary["seeds"] = len(rows)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_json(METRICS_DIR / f"transfer_{target}_{name}.json", summary)
    return summary
