"""Stage `sweep`: an Optuna study of adapter configurations on one target ->
reports/sweep/<target>/{trials.csv, pareto.csv}, reports/metrics/sweep_<target>.json."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.config import BASE_DIR, METRICS_DIR, PREPARED, Params
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.nn.adapter_io import apply_adapter, read_adapter
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.train.datamodule import PreparedData
from pipeline.train.evaluate import accuracy
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
    PreparedData(PREPARED / target, 1)  # the target must be prepared (and intact) before any trial
    name = name or s.study_name or study_name(params, target, base_sha)
    study, created = create_study(params, target, name, storage, folder)
    parent = parent_run(params, study, target, created)
    run_workers(params, target, name, storage, folder, s.workers, parent)
    parent = study.user_attrs.get(PARENT_RUN_ATTR, parent)

    trials = pd.DataFrame(trial_rows(study))
    trials.to_csv(folder / "trials.csv", index=False)
    pareto = pareto_on_test(study, target, base_sha)
    pareto.to_csv(folder / "pareto.csv", index=False)
    hv = hypervolume(list(zip(pareto.test_acc, pareto.memory_pct)), s.reference_accuracy, s.reference_memory_pct) \
        if len(pareto) else 0.0
    states = trials.state.value_counts().to_dict()
    metrics = {
        "study": name,
        "complete": int(states.get("COMPLETE", 0)),
        "failed": int(states.get("FAIL", 0)),
        "pareto_size": len(pareto),
        "hypervolume": round(hv, 4),
        "reference_point": {"accuracy": s.reference_accuracy, "memory_pct": s.reference_memory_pct},
        "best_test_acc_le_12pct": float(pareto[pareto.memory_pct <= 12].test_acc.max()) if (pareto.memory_pct <= 12).any() else None,
    }
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_json(METRICS_DIR / f"sweep_{target}.json", metrics)
    c = client(params)
    for key in ("complete", "failed", "pareto_size", "hypervolume"):
        c.log_metric(parent, key, float(metrics[key]))
    for f in ("trials.csv", "pareto.csv"):
        c.log_artifact(parent, str(folder / f))
    print(f"sweep {target} ({name}): {metrics['complete']} complete, {metrics['failed']} failed, "
          f"Pareto set {len(pareto)}, hypervolume {hv:.4f}")
    for _, r in pareto.iterrows():
        print(f"  trial {int(r.number):3d} {r.method:8s} memory {r.memory_pct:6.2f}% val {r.val_acc:.4f} test {r.test_acc:.4f}")
    return metrics


def pareto_on_test(study, target: str, base_sha: str) -> pd.DataFrame:
    """The non-dominated COMPLETE trials (on val), re-evaluated once on test."""
    data = PreparedData(PREPARED / target, 1)
    base_file = BASE_DIR / "binary" / "model.pt"
    rows = []
    for t in sorted(study.best_trials, key=lambda t: t.values[1]):
        config, tensors = read_adapter(Path(t.user_attrs["adapter"]))
        net = apply_adapter(load_base(base_file), base_sha, config, tensors, source=t.user_attrs["adapter"])
        ratio = t.user_attrs["memory_ratio"]
        rows.append({"number": t.number, **t.params, "val_acc": t.values[0],
                     "test_acc": accuracy(net, *data.splits["test"]), "task_memory_bytes": t.values[1],
                     "memory_ratio": ratio, "memory_pct": 100 * ratio})
    return pd.DataFrame(rows, columns=None if rows else ["number", "val_acc", "test_acc", "task_memory_bytes",
                                                         "memory_ratio", "memory_pct", "method"])
