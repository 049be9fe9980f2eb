"""Stage `sweep`: an Optuna study of adapter configurations on one target ->
reports/sweep/<target>/{trials.csv, pareto.csv}, reports/metrics/sweep_<target>.json."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import optuna
import pandas as pd

from pipeline.config import BASE_DIR, METRICS_DIR, PREPARED, Params
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.nn.checkpoint import sha256
from pipeline.nn.memory import BREAKDOWN_COLUMNS
from pipeline.stats import mean_ci
from pipeline.train.datamodule import PreparedData
from pipeline.train.parallel import map_runs
from pipeline.train.pareto import hypervolume
from pipeline.train.sweep import PARENT_RUN_ATTR, create_study, run_workers, study_name, trial_rows
from pipeline.train.tracking import client, experiment_id, run_tags

SWEEP_DIR = Path("reports/sweep")


def parent_run(params: Params, study, target: str, created: bool, wait_s: float = 60.0) -> str:
    """The sweep's MLflow parent run, recorded in the study itself, so resumed runs and workers on
    other machines nest their trials under the same one. Only the study's creator makes it; the
    others wait for it to be recorded, so simultaneous coordinators never make two."""
    known = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + (0 if created else wait_s)
    while not known and time.monotonic() < deadline:
        time.sleep(0.5)
        known = study.user_attrs.get(PARENT_RUN_ATTR)
    if known:
        return known
    # Creator, or a study whose creator died before recording one: adopt a tagged run or make one.
    c = client(params)
    exp = experiment_id(params)
    found = c.search_runs([exp], filter_string=f"tags.study = '{study.study_name}' and tags.stage = 'sweep'",
                          max_results=1, order_by=["attributes.start_time ASC"])
    run_id = found[0].info.run_id if found else \
        c.create_run(exp, run_name=f"sweep-{target}", tags=run_tags("sweep", target=target, study=study.study_name)).info.run_id
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


def run(params: Params, target: str, n_trials: Optional[int] = None, workers: Optional[int] = None,
        storage: Optional[str] = None, name: Optional[str] = None) -> dict:
    if target not in params.data.datasets:
        raise UserError(f"sweep: unknown target '{target}'; allowed (data.datasets): {', '.join(params.data.datasets)}")
    for flag, value in (("--n-trials", n_trials), ("--workers", workers)):
        if value is not None and value < 1:
            raise UserError(f"sweep: {flag} must be >= 1")
    t0 = time.perf_counter()
    s = params.sweep

    params = replace(params, sweep=replace(s, n_trials=n_trials or s.n_trials, workers=workers or s.workers))
    s = params.sweep
    storage = storage or s.storage
    folder = SWEEP_DIR / target
    base_sha = sha256(BASE_DIR / "binary" / "model.pt")
    data = PreparedData(PREPARED / target, 1)  # the target must be prepared (and intact) before any trial
    name = name or s.study_name or study_name(params, target, base_sha, data.manifest["sha256"])
    study, created = create_study(params, target, name, storage, folder)
    parent = parent_run(params, study, target, created)
    c = client(params)
    c.update_run(parent, status="RUNNING")  # reopened when a later call asks for more trials
    try:
        with _terminate_as_exit():
            run_workers(params, target, name, storage, folder, s.workers, parent)
            parent = study.user_attrs.get(PARENT_RUN_ATTR, parent)
            metrics = summarise(params, study, target, name, folder, parent, t0)
    except KeyboardInterrupt:
        c.set_terminated(parent, "KILLED")
        raise
    except BaseException as exc:
        c.set_terminated(parent, "KILLED" if isinstance(exc, SystemExit) else "FAILED")
        raise
    c.set_terminated(parent, "FINISHED")
    return metrics


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (a killed `dvc repro`, a batch scheduler) unwinds like Ctrl-C, so the sweep's MLflow
    run is closed as KILLED instead of staying RUNNING forever."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def summarise(params: Params, study, target: str, name: str, folder: Path, parent: str, t0: float) -> dict:
    s = params.sweep
    trials = pd.DataFrame(trial_rows(study))
    trials.to_csv(folder / "trials.csv", index=False)
    runs = retrain_pareto(params, study, target, folder, parent, name)
    runs.to_csv(folder / "pareto_runs.csv", index=False)
    pareto = pareto_points(study, runs)
    pareto.to_csv(folder / "pareto.csv", index=False)
    hv = {split: hypervolume(list(zip(pareto[f"{split}_acc"], pareto.memory_pct)), s.reference_accuracy,
                             s.reference_memory_pct) if len(pareto) else 0.0 for split in ("val", "test")}
    states = trials.state.value_counts().to_dict()
    done = trials[trials.state == "COMPLETE"] if len(trials) else trials
    metrics = {
        "study": name,
        "complete": int(states.get("COMPLETE", 0)),
        "failed": int(states.get("FAIL", 0)),
        "pareto_size": len(pareto),
        "seeds": len(params.seeds),
        "hypervolume": round(hv["val"], 4),   # the number to compare sweeps by: val, never test
        "hypervolume_test": round(hv["test"], 4),  # reported beside it, chooses nothing
        "reference_point": {"accuracy": s.reference_accuracy, "memory_pct": s.reference_memory_pct},
        "memory_pct_min": round(float(pareto.memory_pct.min()), 4) if len(pareto) else None,
        "memory_pct_max": round(float(pareto.memory_pct.max()), 4) if len(pareto) else None,
        "hit_cap_improving": int(runs.hit_cap_improving.sum()) if len(runs) else 0,
        # trials stopped while still improving score low for their budget, not their configuration
        "trials_hit_cap_improving": int(done.hit_cap_improving.fillna(False).astype(bool).sum()) if len(done) else 0,
    }
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_json(METRICS_DIR / f"sweep_{target}.json", metrics)
    c = client(params)
    for key in ("complete", "failed", "pareto_size", "hypervolume", "hypervolume_test"):
        c.log_metric(parent, key, float(metrics[key]))
    sweep_front(trials, pareto, target, folder / "pareto.png")
    for f in ("trials.csv", "pareto.csv", "pareto_runs.csv", "pareto.png"):
        c.log_artifact(parent, str(folder / f))
    print(f"sweep {target} ({name}): {metrics['complete']} complete, {metrics['failed']} failed, "
          f"Pareto set {len(pareto)} retrained on {len(params.seeds)} seeds, hypervolume (val) {hv['val']:.4f}, "
          f"{metrics['trials_hit_cap_improving']} trials stopped at the cap still improving")
    for _, r in pareto.iterrows():
        print(f"  trial {int(r.number):3d} {r.method:8s} memory {r.memory_pct:6.2f}% val {r.val_acc:.4f} "
              f"± {r.val_acc_ci:.4f} test {r.test_acc:.4f} ± {r.test_acc_ci:.4f}")
    return metrics


def retrain_pareto(params: Params, study, target: str, folder: Path, parent: str, name: str) -> pd.DataFrame:
    """The non-dominated COMPLETE trials (on val), each retrained on every seed at the final budget
    (transfer.optim, the trial's lr), `sweep.workers` runs side by side: one row per (trial, seed),
    the same columns as results.csv."""
    from pipeline.train.sweep import one_device, suggest
    from pipeline.train.transfer import base_memory_bytes, train_transfer

    base_bytes = base_memory_bytes()
    jobs = []
    for t in sorted(study.best_trials, key=lambda t: (t.values[1], t.number)):
        method, adapter, lr, trial_params = suggest(optuna.trial.FixedTrial(t.params), params)
        jobs += [dict(params=one_device(trial_params), target=target, method=method, precision="binary", seed=seed, adapter=adapter,
                      optim=replace(params.transfer.optim, lr=lr), out=folder / "pareto",
                      stem=f"trial_{t.number:04d}_seed{seed}", base_bytes=base_bytes, parent_run_id=parent,
                      run_name=f"sweep-{target}-trial{t.number}-s{seed}",
                      extra_params={"trial_number": t.number, "study": name},
                      tags=run_tags("sweep_retrain", target=target, method=method, precision="binary", study=name))
                 for seed in params.seeds]
    done = map_runs(train_transfer, jobs, params.sweep.workers)
    rows = [{"number": int(j["extra_params"]["trial_number"]), **row} for j, (row, _) in zip(jobs, done)
            if row.get("primary", True)]
    return pd.DataFrame(rows)


def pareto_points(study, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per Pareto trial: its params, the trial's own val accuracy, and mean ± 95% interval
    over the retrained seeds of val and test accuracy, memory and training time."""
    rows = []
    for t in sorted(study.best_trials, key=lambda t: (t.values[1], t.number)):
        r = runs[runs.number == t.number]
        row = {"number": t.number, **t.params, "trial_val_acc": t.values[0], "seeds": len(r)}
        for key in ("val_acc", "test_acc", "task_memory_bytes", "memory_ratio", "train_time_s", "epochs_run",
                    *BREAKDOWN_COLUMNS):
            row[key], row[f"{key}_ci"] = mean_ci(r[key])
        row["memory_pct"] = 100 * row["memory_ratio"]
        row["hit_cap_improving"] = int(r.hit_cap_improving.sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["number", "method", "val_acc", "val_acc_ci", "test_acc",
                                                         "test_acc_ci", "task_memory_bytes", "memory_ratio", "memory_pct"])


def sweep_front(trials: pd.DataFrame, pareto: pd.DataFrame, target: str, out: Path) -> Path:
    """One sweep's trials (val, single seed) and its Pareto set retrained on every seed (val and
    test, 95% intervals): the figure on the sweep's MLflow parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = trials[trials.state == "COMPLETE"] if len(trials) else trials
    if len(done):
        ax.scatter(100 * done.memory_ratio, done.val_acc, s=16, color="black", alpha=0.3, label="trials (val, one seed)")
    if len(pareto):
        p = pareto.sort_values("memory_pct")
        for split, colour in (("val", "tab:green"), ("test", "tab:red")):
            ax.errorbar(p.memory_pct, p[f"{split}_acc"], yerr=p[f"{split}_acc_ci"].fillna(0), fmt=".-", color=colour,
                        capsize=3, label=f"Pareto set, {split} (retrained, every seed)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel("task-specific memory (% of the binary base, log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Sweep on '{target}': accuracy vs task memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
