"""Stage `transfer`: one (target, method[, precision]) -> models/<target>/<method>/,
reports/metrics/transfer_<target>_<method>.json and its rows for reports/results.csv.

The protocol every arm shares: the lr is chosen on val from `transfer.lr_grid` with the first
seed, then the other seeds repeat the chosen lr; each run follows the one training rule."""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from pipeline.config import METRICS_DIR, Params
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.train.tracking import run_tags
from pipeline.train.transfer import ADAPTER_SUFFIXES, TrainingDiverged, base_memory_bytes, train_transfer

RESULTS_DIR = Path("reports/results")


def variant(method: str, precision: str) -> str:
    return method if precision == "binary" else f"{method}_{precision}"


def lr_stem(lr: float) -> str:
    return "lr" + f"{lr:g}".replace(".", "p")  # no dot: file names add their suffix to the stem


def choose_lr(search: list[dict]) -> dict:
    """The grid run with the best val accuracy; ties go to the earlier grid entry."""
    return max(enumerate(search), key=lambda ir: (round(ir[1]["val_acc"], 9), -ir[0]))[1]


def run(params: Params, target: str, method: str, precision: str = "binary") -> dict:
    if target not in params.data.datasets:
        raise UserError(f"transfer: unknown target '{target}'; allowed (data.datasets): {', '.join(params.data.datasets)}")
    if method != "full" and precision != "binary":
        raise UserError(f"transfer: --precision {precision} applies to --method full only; {method} runs on the binary base")
    t0 = time.perf_counter()
    name = variant(method, precision)
    out = Path("models") / target / name
    base_bytes = base_memory_bytes()
    grid, seeds = params.transfer.lr_grid, params.seeds

    def job(lr: float, seed: int, stem: str, role: str) -> dict:
        return dict(target=target, method=method, precision=precision, seed=seed, adapter=params.adapter,
                    optim=replace(params.transfer.optim, lr=lr), out=out, stem=stem, base_bytes=base_bytes,
                    run_name=f"transfer-{target}-{name}-s{seed}-lr{lr:g}",
                    tags=run_tags("transfer", target=target, method=method, precision=precision, role=role))

    # One process, one run after another: two runs side by side with one thread each measured no
    # faster here than one run with two threads, for 3 + 2 runs (benchmarks/side_by_side.py).
    search = []
    for lr in grid:
        try:
            search.append(train_transfer(params, **job(lr, seeds[0], lr_stem(lr), "lr_search")))
        except TrainingDiverged as exc:  # a candidate that lost, not a failed stage
            print(f"transfer {target}/{name} lr {lr:g}: {exc}; not a candidate")
    if not search:
        raise UserError(f"transfer {target}/{name}: training diverged at every lr of transfer.lr_grid {grid}; "
                        f"allowed: give smaller learning rates")
    rows = [r for r, _ in search]
    chosen = choose_lr(rows)  # every DDP process chooses alike (val accuracy is synchronised) ...
    lr = chosen["lr"]
    primary = chosen.get("primary", True)
    for r in rows if primary else []:  # the chosen run is seed 0's result; the others were only for choosing
        for suffix in ADAPTER_SUFFIXES:
            src = out / f"{lr_stem(r['lr'])}{suffix}"
            if r is chosen:
                shutil.move(src, out / f"adapter{suffix}")
            else:
                src.unlink(missing_ok=True)
    curves = next(c for r, c in search if r is chosen)
    repeats = [train_transfer(params, **job(lr, s, f"adapter_seed{s}", "seed_repeat")) for s in seeds[1:]]
    if not primary:  # ... and trains the repeats in step; only the primary writes
        return {}
    final = [chosen] + [r for r, _ in repeats]
    keep = {"adapter"} | {f"adapter_seed{s}" for s in seeds[1:]}
    for stale in out.glob("*"):  # only now, all runs done: an earlier run's other seeds must not linger
        if stale.suffix in ADAPTER_SUFFIXES and stale.stem not in keep:
            stale.unlink()
    for _, c in repeats:
        curves += c
    search_desc = " ".join(f"{g:g}" for g in grid)
    for r in final:
        r["lr_grid"] = search_desc
    for r in final:
        print(f"transfer {target}/{name} seed {r['seed']} (lr {lr:g} of {search_desc}): val {r['val_acc']:.4f} "
              f"test {r['test_acc']:.4f} task memory {r['task_memory_bytes'] / 1024:.2f} KiB "
              f"({100 * r['memory_ratio']:.1f}% of base), {r['epochs_run']} epochs, {r['train_time_s']:.1f}s"
              + (" [hit the cap still improving]" if r["hit_cap_improving"] else ""))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(final).to_csv(RESULTS_DIR / f"{target}__{name}.csv", index=False)
    pd.DataFrame(curves).to_csv(METRICS_DIR / f"transfer_{target}_{name}_curve.csv", index=False)
    numeric = [k for k, v in final[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("seed", "lr")]
    summary = {k: round(statistics.mean(r[k] for r in final), 6) for k in numeric}
    summary.update({
        "seeds": len(final), "lr": lr,
        "lr_search_val_acc": {f"{g:g}": next((r["val_acc"] for r in rows if r["lr"] == g), None) for g in grid},
        "hit_cap_improving": sum(bool(r["hit_cap_improving"]) for r in rows + final[1:]),  # every run once
        "training_runs": len(rows) + len(final) - 1,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    })
    write_json(METRICS_DIR / f"transfer_{target}_{name}.json", summary)
    print(f"transfer {target}/{name}: {len(final)} seeds at lr {lr:g} (val by lr: "
          + ", ".join(f"{k} {'diverged' if v is None else f'{v:.4f}'}" for k, v in summary["lr_search_val_acc"].items())
          + f"), {summary['wall_time_s']:.0f}s")
    return summary
