"""Stage `sweep`: an Optuna study of adapter configurations on one target ->
reports/sweep/<target>/{trials.csv, pareto.csv, pareto_runs.csv}, reports/metrics/sweep_<target>.json.
The study's machinery (storage, workers, Pareto retrains) is pipeline.train.sweep; its figure is
drawn by the report stage, so a plot change never reruns a sweep."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.nn.checkpoint import sha256
from pipeline.paths import base_checkpoint, prepared, sweep_dir
from pipeline.train.datamodule import PreparedData
from pipeline.train.sweep import create_study, run_workers, study_name, summarise
from pipeline.train.tracking import PARENT_RUN_ATTR, parent_run


def run(params: Params, target: str, n_trials: Optional[int] = None, workers: Optional[int] = None,
        storage: Optional[str] = None, name: Optional[str] = None) -> dict:
    params.dataset(target, "sweep")
    for flag, value in (("--n-trials", n_trials), ("--workers", workers)):
        if value is not None and value < 1:
            raise UserError(f"sweep: {flag} must be >= 1")
    t0 = time.perf_counter()
    s = params.sweep
    params = replace(params, sweep=replace(s, n_trials=n_trials or s.n_trials, workers=workers or s.workers))
    storage, folder = storage or s.storage, sweep_dir(target)
    base_sha = sha256(base_checkpoint("binary"))
    data = PreparedData(prepared(target), 1)  # the target must be prepared (and intact) before any trial
    name = name or s.study_name or study_name(params, target, base_sha, data.manifest["sha256"])
    study, created = create_study(params, target, name, storage, folder)
    with parent_run(params, study, target, created) as parent:
        run_workers(params, target, name, storage, folder, params.sweep.workers, parent)
        return summarise(params, study, target, folder, study.user_attrs.get(PARENT_RUN_ATTR, parent), t0)
