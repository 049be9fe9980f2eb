"""The study's protocol in one place: each arm's lr chosen on val from `transfer.lr_grid` with
the first seed, the other seeds repeating the chosen lr; the task-state files each run leaves
and their cleanup; the arm's rows, curve and summary. The transfer stages run an arm; the sweep
retrains its Pareto points with `retrain`."""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Params
from pipeline.errors import TrainingDiverged
from pipeline.io import write_json
from pipeline.paths import METRICS_DIR, RESULTS_DIR, task_dir
from pipeline.train import transfer
from pipeline.train.parallel import map_runs
from pipeline.train.spec import RunSpec, from_params
from pipeline.train.tracking import run_tags
from pipeline.train.transfer import SUFFIXES, Record, Tracking


def lr_stem(lr: float) -> str:
    return "lr" + f"{lr:g}".replace(".", "p")  # no dot: file names add their suffix to the stem


def choose_lr(search: list[dict]) -> dict:
    """The grid run with the best val accuracy; ties go to the earlier grid entry."""
    return max(enumerate(search), key=lambda ir: (round(ir[1]["val_acc"], 9), -ir[0]))[1]


def _tracking(spec: RunSpec, role: str) -> Tracking:
    return Tracking(f"transfer-{spec.target}-{spec.variant}-s{spec.seed}-lr{spec.lr:g}",
                    run_tags("transfer", target=spec.target, method=spec.method, precision=spec.precision, role=role))


def lr_search(params: Params, base: RunSpec, out: Path, base_bytes: float) -> list[Record]:
    """`base` at every lr of the grid; a run that diverges is a candidate that lost."""
    search = []
    for lr in params.transfer.lr_grid:
        spec = replace(base, lr=lr)
        try:
            search.append(transfer.run(params, spec, _tracking(spec, "lr_search"), out, lr_stem(lr), base_bytes))
        except TrainingDiverged as exc:
            print(f"transfer {spec.target}/{spec.variant} lr {lr:g}: {exc}; not a candidate")
    if not search:
        raise TrainingDiverged(f"transfer {base.target}/{base.variant}: training diverged at every lr of "
                               f"transfer.lr_grid {params.transfer.lr_grid}; give smaller learning rates")
    return search


def keep_files(out: Path, chosen_stem: str, search_stems: list[str], seeds: list[int]) -> None:
    """The chosen lr's run becomes seed 0's task state (`adapter.*`), the other grid runs' files
    go, and so do task states an earlier run left for seeds no longer asked for."""
    for stem in search_stems:
        for suffix in SUFFIXES:
            src = out / f"{stem}{suffix}"
            if stem == chosen_stem:
                shutil.move(src, out / f"adapter{suffix}")
            else:
                src.unlink(missing_ok=True)
    keep = {"adapter"} | {f"adapter_seed{s}" for s in seeds[1:]}
    for stale in out.glob("*"):
        if stale.suffix in SUFFIXES and stale.stem not in keep:
            stale.unlink()


def summary(final: list[dict], search: list[dict], grid: list[float], wall_s: float) -> dict[str, Any]:
    """The arm's metrics file: every numeric column's mean over seeds, the lr and what it was
    chosen from, and how many runs hit their cap still improving (every run counted once)."""
    numeric = [k for k, v in final[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("seed", "lr")]
    out = {k: round(statistics.mean(r[k] for r in final), 6) for k in numeric}
    out.update({
        "seeds": len(final), "lr": final[0]["lr"],
        "lr_search_val_acc": {f"{g:g}": next((r["val_acc"] for r in search if r["lr"] == g), None) for g in grid},
        "hit_cap_improving": sum(bool(r["hit_cap_improving"]) for r in search + final[1:]),
        "training_runs": len(search) + len(final) - 1,
        "wall_time_s": round(wall_s, 3),
    })
    return out


def _print_arm(spec: RunSpec, final: list[dict], result: dict, search_desc: str) -> None:
    name = f"{spec.target}/{spec.variant}"
    for r in final:
        print(f"transfer {name} seed {r['seed']} (lr {r['lr']:g} of {search_desc}): val {r['val_acc']:.4f} "
              f"test {r['test_acc']:.4f} task memory {r['task_memory_bytes'] / 1024:.2f} KiB "
              f"({100 * r['memory_ratio']:.1f}% of base), {r['epochs_run']} epochs, {r['train_time_s']:.1f}s"
              + (" [hit the cap still improving]" if r["hit_cap_improving"] else ""))
    print(f"transfer {name}: {len(final)} seeds at lr {result['lr']:g} (val by lr: "
          + ", ".join(f"{k} {'diverged' if v is None else f'{v:.4f}'}" for k, v in result["lr_search_val_acc"].items())
          + f"), {result['wall_time_s']:.0f}s")


def run_arm(params: Params, target: str, method: str, precision: str) -> dict[str, Any]:
    """One arm: lr search on the first seed, the other seeds at the chosen lr, each run by the one
    training rule. Writes models/<target>/<variant>/, the arm's rows, curve and metrics file.
    One process, one run after another: two runs side by side with one thread each measured no
    faster here than one run with two threads, for 3 + 2 runs (benchmarks/side_by_side.py)."""
    t0 = time.perf_counter()
    grid, seeds = params.transfer.lr_grid, params.seeds
    first = from_params(params, target, method, precision, grid[0], seeds[0])
    out, base_bytes = task_dir(target, first.variant), transfer.base_memory_bytes()
    search = lr_search(params, first, out, base_bytes)
    chosen = choose_lr([r.row for r in search])  # every DDP process chooses alike: same weights, same val
    spec = replace(first, lr=chosen["lr"])
    repeats = [transfer.run(params, spec.with_seed(s), _tracking(spec.with_seed(s), "seed_repeat"), out,
                            f"adapter_seed{s}", base_bytes) for s in seeds[1:]]
    if not search[0].primary:
        return {}  # an extra process of a multi-device strategy: it trained in step; only the primary writes
    keep_files(out, lr_stem(chosen["lr"]), [lr_stem(r.row["lr"]) for r in search], seeds)
    chosen_run = next(r for r in search if r.row is chosen)
    final = [chosen] + [r.row for r in repeats]
    desc = " ".join(f"{g:g}" for g in grid)
    for r in final:
        r["lr_grid"] = desc
    curves = chosen_run.curve + [c for r in repeats for c in r.curve]
    result = summary(final, [r.row for r in search], grid, time.perf_counter() - t0)
    write_arm(spec, final, curves, result)
    _print_arm(spec, final, result, desc)
    return result


def write_arm(spec: RunSpec, rows: list[dict], curves: list[dict], result: dict) -> None:
    """The arm's rows for reports/results.csv, its learning curve and its metrics file."""
    stem = f"{spec.target}__{spec.variant}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS_DIR / f"{stem}.csv", index=False)
    pd.DataFrame(curves).to_csv(METRICS_DIR / f"transfer_{spec.target}_{spec.variant}_curve.csv", index=False)
    write_json(METRICS_DIR / f"transfer_{spec.target}_{spec.variant}.json", result)


def _retrain_one(params: Params, spec: RunSpec, tracking: Tracking, out: Path, stem: str, base_bytes: float) -> dict:
    return transfer.run(params, spec, tracking, out, stem, base_bytes).row


def retrain(params: Params, points: list[tuple[int, RunSpec]], out: Path, tracking: dict[str, Any],
            procs: int) -> list[dict]:
    """Each (number, spec) retrained on every seed at its own budget, `procs` runs side by side:
    one results.csv-like row per (point, seed), `number` first. `tracking` holds the MLflow
    parent run and study the runs are filed under."""
    base_bytes = transfer.base_memory_bytes()
    jobs, numbers = [], []
    for number, spec in points:
        for seed in params.seeds:
            s = spec.with_seed(seed)
            jobs.append(dict(params=params, spec=s, out=out, stem=f"trial_{number:04d}_seed{seed}", base_bytes=base_bytes,
                             tracking=Tracking(f"sweep-{s.target}-trial{number}-s{seed}",
                                               run_tags("sweep_retrain", target=s.target, method=s.method,
                                                        precision=s.precision, study=tracking["study"]),
                                               tracking["parent_run_id"], {"trial_number": number, "study": tracking["study"]})))
            numbers.append(number)
    return [{"number": n, **row} for n, row in zip(numbers, map_runs(_retrain_one, jobs, procs))]
