"""The study's protocol in one place: each arm's lr chosen on val by a bracketing search on the
selection seed (never a reported seed), the reported seeds at the chosen lr side by side, the
task-state files each arm leaves, and the arm's rows, predictions, curve and summary. The
transfer stages run an arm; the sweep retrains its Pareto points with `retrain`."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
import pandas as pd

from pipeline import predictions
from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.errors import TrainingDiverged
from pipeline.io import write_json
from pipeline.paths import METRICS_DIR, RESULTS_DIR, prepared, task_dir
from pipeline.train import transfer
from pipeline.train.parallel import map_runs
from pipeline.train.spec import RunSpec, from_params
from pipeline.train.tracking import run_tags
from pipeline.train.trainer import TrialPruning
from pipeline.train.transfer import SUFFIXES, Tracking


def _tracking(spec: RunSpec, role: str) -> Tracking:
    return Tracking(f"transfer-{spec.target}-{spec.variant}-s{spec.seed}-lr{spec.lr:.3g}",
                    run_tags("transfer", target=spec.target, method=spec.method, precision=spec.precision, role=role))


def best_lr(tried: dict[float, Optional[float]]) -> Optional[float]:
    """The lr with the best val accuracy among finished runs (None: pruned or diverged); ties go
    to the smaller lr."""
    done = {lr: v for lr, v in tried.items() if v is not None}
    return max(done, key=lambda lr: (round(done[lr], 9), -lr)) if done else None


def bracket(start: list[float], step: float, low: float, high: float,
            evaluate: Callable[[float], Optional[float]]) -> dict[float, Optional[float]]:
    """The search's order: `evaluate` (lr -> val accuracy, None when pruned or diverged) at every
    start value, largest first (they finish sooner, so the pruner stops the slow ones), then one
    `step` past whichever end wins, while the winner is an end and the step stays in [low, high].
    Returns {lr: value} in the order tried."""
    tried: dict[float, Optional[float]] = {}
    for lr in sorted(start, reverse=True):
        tried[lr] = evaluate(lr)
    while (b := best_lr(tried)) is not None:
        lrs = sorted(tried)
        if b == lrs[0] and b / step >= low * (1 - 1e-9):
            nxt = b / step
        elif b == lrs[-1] and b * step <= high * (1 + 1e-9):
            nxt = b * step
        else:
            break
        tried[nxt] = evaluate(nxt)
    return tried


def lr_search(params: Params, base: RunSpec, out: Path) -> list[dict[str, Any]]:
    """`base` (on the selection seed) at each lr `bracket` asks for: one trial of a
    single-objective Optuna study (val accuracy of the finalised network) per lr. Its MedianPruner
    stops a run whose val accuracy trails the median of the finished runs at the same epoch (from
    the second run, after prune_warmup epochs): a slow lr can lose to a fast one that way, the
    price of a cheap search. Returns each searched lr as {lr, val_acc, epochs, state, chosen} in
    the order tried; a diverged run is a candidate that lost."""
    ls = params.transfer.lr_search
    if ls.fixed:
        return [{"lr": ls.start[0], "val_acc": None, "epochs": 0, "chosen": True, "state": "fixed"}]
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's traceback is not the user's line
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0),  # never samples: every lr is enqueued
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=ls.prune_warmup))

    def objective(trial: optuna.Trial) -> float:
        spec = replace(base, lr=trial.suggest_float("lr", ls.low, ls.high, log=True))
        pruning = TrialPruning(trial)
        f = transfer.fit(params, spec, _tracking(spec, "lr_search"), out / "checkpoints" / f"lr_search_{trial.number}",
                         [pruning])
        trial.set_user_attr("epochs", f.fit.convergence()["epochs_run"])
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}")
        return float((f.predict("val") == f.data.splits["val"][1]).float().mean())

    def evaluate(lr: float) -> Optional[float]:
        study.enqueue_trial({"lr": lr})
        study.optimize(objective, n_trials=1, catch=(TrainingDiverged,))
        t = study.trials[-1]
        return t.value if t.state == optuna.trial.TrialState.COMPLETE else None

    tried = bracket(ls.start, ls.step, ls.low, ls.high, evaluate)
    chosen = best_lr(tried)
    if chosen is None:
        raise TrainingDiverged(f"transfer {base.target}/{base.variant}: no run finished at any lr searched "
                               f"({', '.join(f'{lr:.3g}' for lr in tried)}); lower transfer.lr_search")
    return [{"lr": t.params["lr"], "val_acc": t.value, "epochs": t.user_attrs.get("epochs"), "chosen": t.params["lr"] == chosen,
             "state": {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "diverged"}.get(t.state.name, t.state.name)}
            for t in study.trials]


def searched_text(search: list[dict]) -> str:
    """`0.001 0.003 0.01* 0.03 (pruned)`: every lr searched, ascending, the chosen one starred."""
    def one(r):
        return f"{r['lr']:.3g}" + ("*" if r["chosen"] else "") + ("" if r["state"] == "complete" else f" ({r['state']})")
    if search[0]["state"] == "fixed":
        return f"{search[0]['lr']:.3g} (fixed: no search)"
    return ", ".join(one(r) for r in sorted(search, key=lambda r: r["lr"]))


def seed_stem(params: Params, seed: int) -> str:
    """The task-state file stem of a reported seed: the first seed's is `adapter`."""
    return "adapter" if seed == params.seeds[0] else f"adapter_seed{seed}"


def keep_files(out: Path, params: Params) -> None:
    """Task states an earlier run left for seeds no longer asked for go."""
    keep = {seed_stem(params, s) for s in params.seeds}
    for stale in out.glob("*"):
        if stale.suffix in SUFFIXES and stale.stem not in keep:
            stale.unlink()


def summary(final: list[dict], search: list[dict], wall_s: float) -> dict[str, Any]:
    """The arm's metrics file: every numeric column's mean over seeds, the lr and every value
    searched, and how many runs hit their cap still improving."""
    numeric = [k for k, v in final[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("seed", "lr")]
    out = {k: round(sum(r[k] for r in final) / len(final), 6) for k in numeric if all(r[k] is not None for r in final)}
    out.update({
        "seeds": len(final), "lr": final[0]["lr"],
        "lr_search": search,
        "hit_cap_improving": sum(bool(r["hit_cap_improving"]) for r in final),
        "training_runs": sum(r["state"] != "fixed" for r in search) + len(final),
        "wall_time_s": round(wall_s, 3),
    })
    return out


def _print_arm(spec: RunSpec, final: list[dict], result: dict, searched: str) -> None:
    name = f"{spec.target}/{spec.variant}"
    for r in final:
        print(f"transfer {name} seed {r['seed']} (lr {r['lr']:.3g}): val {r['val_acc']:.4f} "
              f"test {r['test_acc']:.4f} task memory {r['task_memory_bytes'] / 1024:.2f} KiB "
              f"({100 * r['memory_ratio']:.1f}% of base), {r['epochs_run']} epochs, {r['train_time_s']:.1f}s"
              + (" [hit the cap still improving]" if r["hit_cap_improving"] else ""))
    print(f"transfer {name}: {len(final)} seeds at lr {result['lr']:.3g} (searched on the selection seed: "
          f"{searched}), {result['wall_time_s']:.0f}s")


def procs_for(params: Params, workers: int) -> int:
    """Runs side by side only on one device: a multi-device strategy already spans the machine."""
    return workers if params.trainer.devices == 1 and params.trainer.strategy in ("auto", "single_device") else 1


def labels(target: str) -> dict[str, Any]:
    _, splits = load_prepared(prepared(target))
    return {s: splits[s][1].numpy() for s in predictions.SPLITS}


def run_arm(params: Params, target: str, method: str, precision: str) -> dict[str, Any]:
    """One arm: the lr search on the selection seed, then every reported seed at the chosen lr,
    `transfer.workers` side by side with one thread each, each by the one training rule. Writes
    models/<target>/<variant>/, the arm's rows, predictions, curve and metrics file."""
    t0 = time.perf_counter()
    first = from_params(params, target, method, precision, math.nan, params.selection_seed)
    out, base_bytes = task_dir(target, first.variant), transfer.base_memory_bytes()
    search = lr_search(params, first, out)
    spec = replace(first, lr=next(r["lr"] for r in search if r["chosen"]))
    jobs = [dict(params=params, spec=spec.with_seed(s), tracking=_tracking(spec.with_seed(s), "reported"), out=out,
                 stem=seed_stem(params, s), base_bytes=base_bytes) for s in params.seeds]
    records = map_runs(transfer.run, jobs, procs_for(params, params.transfer.workers))
    if not records[0].primary:
        return {}  # an extra process of a multi-device strategy: it trained in step; only the primary writes
    keep_files(out, params)
    searched = searched_text(search)
    final = [r.row for r in records]
    for r in final:
        r["lr_searched"] = searched
    result = summary(final, search, time.perf_counter() - t0)
    write_arm(spec, final, [c for r in records for c in r.curve], result,
              {predictions.run_key(spec.variant, r.row["seed"]): r.predictions for r in records})
    _print_arm(spec, final, result, searched)
    return result


def write_arm(spec: RunSpec, rows: list[dict], curves: list[dict], result: dict, preds: dict[str, dict]) -> None:
    """The arm's rows for reports/results.csv, its predictions, learning curve and metrics file."""
    stem = f"{spec.target}__{spec.variant}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS_DIR / f"{stem}.csv", index=False)
    predictions.write(RESULTS_DIR / f"{stem}.npz", labels(spec.target), preds)
    pd.DataFrame(curves).to_csv(METRICS_DIR / f"transfer_{spec.target}_{spec.variant}_curve.csv", index=False)
    write_json(METRICS_DIR / f"transfer_{spec.target}_{spec.variant}.json", result)


def retrain(params: Params, points: list[tuple[int, RunSpec]], out: Path, tracking: dict[str, Any],
            procs: int) -> tuple[list[dict], dict[str, dict]]:
    """Each (number, spec) retrained on every reported seed at its own budget, `procs` runs side
    by side: one results.csv-like row per (point, seed), `number` first, and their predictions
    (run key `trial<number>/seed<k>`). `tracking` holds the MLflow parent run and study."""
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
    records = map_runs(transfer.run, jobs, procs)
    rows = [{"number": n, **r.row} for n, r in zip(numbers, records)]
    preds = {predictions.run_key(f"trial{n}", r.row["seed"]): r.predictions for n, r in zip(numbers, records)}
    return rows, preds
