"""Optuna sweeps of adapter configurations: maximise val accuracy, minimise task memory.

A trial's configuration is proposal n of `pipeline.train.proposals`: a function of the settings,
the target, n and the results of a set of earlier proposals fixed by n, so the same params give
the same trials, Pareto set and report whatever the workers' timing, on one machine or many.
Resumable (the study name is a hash of the settings; `n_trials` counts COMPLETE proposals: the
study is proposals 0..Q, Q the n_trials-th to complete); safe for several workers on one storage
(a worker takes the lowest proposal no attempt holds; of two attempts at one proposal the
lower-numbered keeps it); robust to killed workers (RUNNING attempts whose process is gone, or
whose heartbeat is older than `stale_after_s`, are failed as stale, and their proposal is
retried as itself). The Optuna trial number counts attempts; trials.csv numbers proposals.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import optuna
import pandas as pd
from filelock import FileLock
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial
from sqlalchemy.exc import IntegrityError, ProgrammingError

from pipeline import predictions
from pipeline.config import Params
from pipeline.errors import EnvironmentFailure, TrainingDiverged, UserError, first_line
from pipeline.io import sha256, source_sha256, write_json
from pipeline.nn.memory import BREAKDOWN_COLUMNS
from pipeline.paths import METRICS_DIR
from pipeline.stats import crossed_ci, mean_ci
from pipeline.train import protocol, transfer
from pipeline.train.parallel import start_worker, threads_each
from pipeline.train.pareto import hypervolume, pareto_mask
from pipeline.train.proposals import (Earlier, anchors, distributions, needs,
                                       propose)
from pipeline.train.spec import from_trial
from pipeline.train.tracking import PARENT_RUN_ATTR, log_to_run, run_tags
from pipeline.train.transfer import Tracking

DIRECTIONS = ["maximize", "minimize"]  # val accuracy, task memory bytes


# ------------------------------------------------------------------------------ naming & storage


def study_name(params: Params, target: str, base_sha256: str, data_sha256: dict) -> str:
    """Everything that shapes a trial -> the name, so a rerun with the same settings resumes and
    any change (search space, anchors, budget, optimiser, pruning, head, per-channel float width,
    scales, seeds, hardware arithmetic, the target's splits, the base) starts a new study instead of re-scoring an old one."""
    s, t = params.sweep, params.trainer
    key = {"space": asdict(s.space), "target": target, "base": base_sha256, "data": data_sha256,
           "max_epochs": s.max_epochs, "sampler": s.sampler, "seed": s.seed, "selection_seed": params.selection_seed,
           "n_startup_trials": s.n_startup_trials, "anchors": s.anchors, "in_flight": s.in_flight,
           "optim": asdict(params.transfer.optim), "head_bits": params.transfer.head_bits,
           "prune": asdict(params.adapter.prune), "bn_bits": params.adapter.bn_bits,
           "learn_scale": params.adapter.learn_scale,
           "trainer": {k: getattr(t, k) for k in ("accelerator", "precision", "deterministic")}}
    return f"{target}-{sha256(key, length=12)}"


def open_storage(url: Optional[str], folder: Path):
    """An Optuna storage: a journal file in `folder` by default, or any RDB URL."""
    try:
        if url is None:
            folder.mkdir(parents=True, exist_ok=True)
            # Absolute: Optuna's lock is a symlink to this path, and a relative target dangles, so a
            # lock left by a killed worker could never be judged stale.
            return JournalStorage(JournalFileBackend(str((folder / "optuna.journal").resolve())))
        if "://" not in url:
            raise UserError(f"sweep.storage: '{url}' is not a storage URL; allowed: null (journal file) or an RDB URL "
                            f"such as postgresql://user:pass@host/db or sqlite:///sweep.db")
        return _open_rdb(url)
    except UserError:
        raise
    except Exception as exc:  # unreachable server, missing driver, bad credentials
        raise EnvironmentFailure(f"sweep storage {url}: cannot be opened ({first_line(exc, 200)})") from None


def _open_rdb(url: str, attempts: int = 8):
    """Workers started together on an empty database race to create Optuna's tables, and the
    losers get a duplicate-key error from the catalog; on retry they find the tables made."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (IntegrityError, ProgrammingError) as exc:
            text = str(exc).lower()
            if attempt == attempts - 1 or not ("duplicate" in text or "already exists" in text):
                raise
            time.sleep(0.25 * (attempt + 1))


# ------------------------------------------------------------------------------ liveness


class Heartbeat:
    """Marks a RUNNING trial as alive: host, pid and a timestamp refreshed in the background."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        storage.set_trial_system_attr(trial_id, "worker_host", socket.gethostname())
        storage.set_trial_system_attr(trial_id, "worker_pid", os.getpid())
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.storage.set_trial_system_attr(self.trial_id, "heartbeat", time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # finished (stop beating) or a passing storage error (beat again later)
                try:
                    if self.storage.get_trial(self.trial_id).state.is_finished():
                        return
                except Exception:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study, storage, stale_after_s: float) -> list[int]:
    """Fail RUNNING trials whose worker is gone: a dead pid on this host, or no heartbeat for
    `stale_after_s` seconds (any host). Returns the numbers failed."""
    failed = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.system_attrs
        beat = attrs.get("heartbeat")
        reason = None
        if attrs.get("worker_host") == host and "worker_pid" in attrs and not _pid_alive(int(attrs["worker_pid"])):
            reason = f"stale: worker pid {attrs['worker_pid']} on {host} is gone"
        elif beat is not None and time.time() - float(beat) > stale_after_s:
            reason = f"stale: no heartbeat for {time.time() - float(beat):.0f}s"
        elif beat is None and t.datetime_start and time.time() - t.datetime_start.timestamp() > stale_after_s:
            reason = "stale: never reported a heartbeat"
        if reason:
            try:
                storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                failed.append(t.number)
            except Exception:  # finished or failed by another worker meanwhile
                pass
    return failed


# ------------------------------------------------------------------------------ workers


def one_device(params: Params) -> Params:
    """Sweep runs are many and short: one device each, no progress bars (sweeps scale out by
    workers, not by DDP)."""
    t = params.trainer
    return replace(params, trainer=replace(t, progress_bar=False, strategy="auto",
                                           devices=t.devices[:1] if isinstance(t.devices, list) else 1))


LOST = ("stale:", "lost:")  # fail reasons of an attempt that never finished its proposal


def _lost(t: FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith(LOST)


def proposals(study: optuna.Study) -> dict[int, FrozenTrial]:
    """Each proposal's attempt that holds it: the lowest-numbered one not lost."""
    held: dict[int, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        q = t.user_attrs.get("proposal")
        if q is not None and q not in held and not _lost(t):
            held[q] = t
    return held


def counted(held: dict[int, FrozenTrial], n_trials: int) -> list[FrozenTrial]:
    """The study's proposals in order: 0.. up to the n_trials-th COMPLETE one, or up to the first
    proposal not held yet. Attempts beyond (started while an earlier one could still fail) do not
    count: which of them ran depends on timing."""
    out, complete = [], 0
    for q in itertools.count():
        if q not in held or complete >= n_trials:
            return out
        out.append(held[q])
        complete += held[q].state == TrialState.COMPLETE


def next_proposal(params: Params, held: dict[int, FrozenTrial]) -> tuple[bool, Optional[int]]:
    """(done, q): done once n_trials proposals are COMPLETE; else q, the lowest proposal no attempt
    holds, if it may still be needed and the results it is proposed from are in (None: wait)."""
    trials = counted(held, params.sweep.n_trials)
    states = [t.state for t in trials]
    complete, running = states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)
    if complete >= params.sweep.n_trials:
        return running == 0, None  # (a RUNNING one before the last COMPLETE: a race between machines)
    q = len(trials)
    if complete + running >= params.sweep.n_trials or TrialState.RUNNING in states[:needs(params, q)]:
        return False, None  # the quota is in flight (one may fail), or proposal q must wait for results
    return False, q


def _earlier(trials: list[FrozenTrial]) -> list[Earlier]:
    return [Earlier(t.params, t.state.is_finished(), tuple(t.values) if t.state == TrialState.COMPLETE else None)
            for t in trials]


def start_attempt(params: Params, study: optuna.Study, storage, target: str, q: int,
                  held: dict[int, FrozenTrial]) -> Optional[FrozenTrial]:
    """Record an attempt at proposal q, made from `held` (the snapshot next_proposal chose q in,
    which holds 0..q-1), and return it, RUNNING (or FAIL when the proposal repeats an earlier
    configuration: not trained twice); None when another worker's attempt holds q."""
    values, repeats = propose(params, target, q, _earlier([held[i] for i in range(q)]))
    attrs = {"proposal": q, "anchor": params.sweep.anchors and q < len(anchors(params))}
    state = TrialState.RUNNING
    if repeats is not None:
        attrs["fail_reason"], state = f"duplicate: proposal {repeats}'s configuration, not trained twice", TrialState.FAIL
    trial_id = storage.create_new_trial(
        storage.get_study_id_from_name(study.study_name),
        template_trial=create_trial(state=state, params=values, distributions=distributions(params.sweep.space),
                                    user_attrs=attrs))
    holder = proposals(study)[q]
    if holder._trial_id == trial_id:
        return holder
    if state == TrialState.RUNNING:  # a duplicate FAIL attempt is simply not the holder
        storage.set_trial_user_attr(trial_id, "fail_reason", f"lost: proposal {q} is held by trial {holder.number}")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return None


def run_trial(params: Params, q: int, values: dict[str, Any], target: str, name: str, folder: Path,
              parent: Optional[str], base_bytes: float) -> dict[str, Any]:
    """Proposal q on the selection seed (val only): the user attrs it records, or its `fail_reason`."""
    s, stem = params.sweep, f"trial_{q:04d}"
    try:
        spec = from_trial(params, target, values, params.selection_seed, s.max_epochs)
        tracking = Tracking(f"sweep-{target}-trial{q}",
                            run_tags("sweep_trial", target=target, method=spec.method, precision="binary", study=name),
                            parent, {"trial_number": q, "study": name})
        row = transfer.run(params, spec, tracking, out=folder / "trials", stem=stem, base_bytes=base_bytes,
                           test=False).row
    except (UserError, TrainingDiverged, RuntimeError, ValueError) as exc:  # invalid combination, diverged
        return {"fail_reason": first_line(exc)}
    shutil.rmtree(folder / "trials" / "checkpoints" / stem, ignore_errors=True)
    result = {key: row[key] for key in ("val_acc", "task_memory_bytes", "adapter_memory_bytes", "memory_ratio",
                                         "sparsity", "train_time_s", "epochs_run", "hit_cap_improving")}
    return {**result, "adapter": str(folder / "trials" / f"{stem}.safetensors")}


def _finish(study: optuna.Study, storage, attempt: FrozenTrial, result: dict[str, Any]) -> None:
    """Record an attempt's result, unless another worker failed it as stale meanwhile (a late
    heartbeat): then its proposal is retried as itself, and this result is discarded."""
    try:
        if storage.get_trial(attempt._trial_id).state != TrialState.RUNNING:
            raise optuna.exceptions.UpdateFinishedTrialError("failed meanwhile")
        for key, value in result.items():
            storage.set_trial_user_attr(attempt._trial_id, key, value)
        if "fail_reason" in result:
            study.tell(attempt.number, state=TrialState.FAIL)
        else:
            study.tell(attempt.number, [result["val_acc"], result["task_memory_bytes"]])
    except optuna.exceptions.UpdateFinishedTrialError:
        print(f"trial {attempt.user_attrs['proposal']}: marked failed by another worker meanwhile; result discarded")


# Test-only: "<worker>:<seconds>" delays that worker before each trial, so the tests can perturb
# the workers' timing and check that the trials do not depend on it.
DELAY_ENV = "PIPELINE_TEST_SWEEP_DELAY"


def _test_delay(worker: int) -> float:
    w, _, seconds = os.environ.get(DELAY_ENV, "").partition(":")
    return float(seconds) if w and int(w) == worker else 0.0


def run_worker(params: Params, target: str, name: str, storage_url: Optional[str], folder: Path,
               worker: int, parent_run_id: Optional[str], poll_s: float = 0.25) -> int:
    """Run proposals until the study holds `n_trials` COMPLETE ones. Returns trials run here.
    `poll_s`: how often a waiting worker rereads the study (a 1 s poll idled the workers of a
    tiny sweep, 2 s trials, for 13% of its trial phase)."""
    storage = open_storage(storage_url, folder)
    study = optuna.load_study(study_name=name, storage=storage)
    s, params = params.sweep, one_device(params)
    base_bytes = transfer.base_memory_bytes()
    ran, failed_in_a_row = 0, 0
    while True:
        fail_stale_trials(study, storage, s.stale_after_s)
        held = proposals(study)
        done, q = next_proposal(params, held)
        if done:
            return ran
        attempt = None if q is None else start_attempt(params, study, storage, target, q, held)
        if attempt is None:
            time.sleep(poll_s if q is None else 0.0)
            continue
        if attempt.state == TrialState.RUNNING:
            time.sleep(_test_delay(worker))
            beat = Heartbeat(storage, attempt._trial_id, interval=max(1.0, s.stale_after_s / 4))
            try:  # the parent is read per trial, so trials nest under the one the study records
                result = run_trial(params, q, attempt.params, target, name, folder,
                                   study.user_attrs.get(PARENT_RUN_ATTR, parent_run_id), base_bytes)
            finally:
                beat.stop()
            ran += 1
            _finish(study, storage, attempt, result)
        reason = attempt.user_attrs.get("fail_reason") if attempt.state == TrialState.FAIL else result.get("fail_reason")
        failed_in_a_row = failed_in_a_row + 1 if reason else 0
        if reason:
            print(f"trial {q} failed: {reason}")
        if failed_in_a_row >= s.max_failures_in_a_row:
            raise UserError(f"sweep: {failed_in_a_row} trials failed in a row (sweep.max_failures_in_a_row); "
                            f"last reason: {reason}")


def _spawned_worker(params, target, name, storage_url, folder, worker, parent_run_id) -> None:
    start_worker(threads_each(params.sweep.workers))  # workers share the cores instead of oversubscribing them
    try:
        run_worker(params, target, name, storage_url, folder, worker, parent_run_id)
    except (UserError, EnvironmentFailure) as exc:
        print(f"error: worker {worker}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def run_workers(params: Params, target: str, name: str, storage_url: Optional[str], folder: Path,
                workers: int, parent_run_id: Optional[str]) -> None:
    if workers == 1:
        run_worker(params, target, name, storage_url, folder, 0, parent_run_id)
        return
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned_worker, args=(params, target, name, storage_url, folder, i, parent_run_id))
             for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        kind = UserError if set(bad) == {2} else EnvironmentFailure
        raise kind(f"sweep: {len(bad)} of {workers} workers stopped (exit codes {bad}); their messages are above")


def create_study(params: Params, target: str, name: str, storage_url: Optional[str],
                 folder: Path) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it: the storage's unique study name makes exactly
    one of several simultaneous coordinators the creator."""
    storage = open_storage(storage_url, folder)
    try:
        storage.create_new_study([optuna.study.StudyDirection[d.upper()] for d in DIRECTIONS], name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    study = optuna.load_study(study_name=name, storage=storage)
    found = [d.name.lower() for d in study.directions]
    if found != DIRECTIONS:
        raise UserError(f"sweep: study '{name}' exists with directions {found}; "
                        f"allowed: {DIRECTIONS} (val accuracy, task memory); choose another --study-name")
    if created:
        study.set_user_attr("target", target)
        study.set_user_attr("space", json.loads(json.dumps(asdict(params.sweep.space))))
    return study, created


def front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The non-dominated COMPLETE trials on (val accuracy, task memory), by memory then number."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    keep = pareto_mask([(t.values[0], t.values[1]) for t in done])
    return sorted((t for t, k in zip(done, keep) if k), key=lambda t: (t.values[1], t.user_attrs["proposal"]))


def to_retrain(trials: list[FrozenTrial], base_bytes: float, at_least: int) -> list[FrozenTrial]:
    """The trials retrained on the reported seeds: the Pareto set below the base's size (it holds
    the best trial under any memory budget), then the next non-dominated layers below it while
    fewer than `at_least` are chosen (a layer taken whole), by memory then number."""
    left = [t for t in trials if t.state == TrialState.COMPLETE and t.values[1] < base_bytes]
    chosen: list[FrozenTrial] = []
    while left and (not chosen or len(chosen) < at_least):
        layer = front(left)
        chosen += layer
        left = [t for t in left if t not in layer]
    return sorted(chosen, key=lambda t: (t.values[1], t.user_attrs["proposal"]))


def log_hypervolume(points: list[tuple[float, float]], ref_accuracy: float) -> float:
    """Hypervolume of (accuracy, memory % of base) points over log10 memory from 1% to 100% of the
    base: the small-state region weighs as much per decade as the large one. Points below 1% count
    at 1%; at or above 100% add nothing. In accuracy x decades (at most 2)."""
    return hypervolume([(a, math.log10(max(m, 1.0))) for a, m in points], ref_accuracy, 2.0)


def trial_rows(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        row = {"number": t.user_attrs["proposal"], "state": t.state.name,
               "val_acc": t.values[0] if t.values else None,
               "task_memory_bytes": t.values[1] if t.values else None}
        row.update({k: v for k, v in t.params.items()})
        for key in ("memory_ratio", "adapter_memory_bytes", "sparsity", "train_time_s", "epochs_run",
                    "hit_cap_improving", "fail_reason", "adapter"):
            row[key] = t.user_attrs.get(key)
        row["anchor"] = bool(t.user_attrs.get("anchor", False))
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        rows.append(row)
    return rows


def pareto_points(points: list[FrozenTrial], runs: pd.DataFrame, preds: predictions.Predictions,
                  on_front: set[int]) -> pd.DataFrame:
    """One row per retrained trial: its params, whether it is on the trials' Pareto front, the
    trial's own val accuracy, val and test accuracy over the reported seeds with 95% intervals
    over seeds x images (stats.crossed_ci), and memory and training time with Student t intervals
    over seeds."""
    rows = []
    for t in points:
        q = t.user_attrs["proposal"]
        r = runs[runs.number == q]
        row = {"number": q, **t.params, "pareto": q in on_front, "trial_val_acc": t.values[0], "seeds": len(r)}
        keys = [predictions.run_key(f"trial{q}", s) for s in r.seed]
        for split in predictions.SPLITS:
            row[f"{split}_acc"], row[f"{split}_acc_ci"], _ = crossed_ci(preds.correct(keys, split))
        for key in ("task_memory_bytes", "memory_ratio", "train_time_s", "epochs_run", *BREAKDOWN_COLUMNS):
            row[key], row[f"{key}_ci"] = mean_ci(r[key])
        row["memory_pct"] = 100 * row["memory_ratio"]
        row["hit_cap_improving"] = int(r.hit_cap_improving.sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["number", "method", "pareto", "val_acc", "val_acc_ci", "test_acc",
                                                         "test_acc_ci", "task_memory_bytes", "memory_ratio", "memory_pct"])


RETRAINED = "retrained.json"  # what pareto_runs.csv and predictions.npz hold: study, points, seeds, code
LOCK = ".summarise.lock"  # (in .dvcignore) commands sharing the folder summarise one at a time


def retrain_pareto(params: Params, points: list[FrozenTrial], target: str, folder: Path, parent: str,
                   name: str) -> tuple[pd.DataFrame, predictions.Predictions]:
    """The chosen trials, each retrained on every reported seed at the arms' budget
    (transfer.optim, the trial's lr), `sweep.workers` runs side by side: one row per (trial, seed),
    the same columns as results.csv (pareto_runs.csv), and their predictions (predictions.npz).
    Runs a command of the same study, code and seeds already retrained into `folder` (the second
    of two commands sharing a filesystem) are read back, not trained again."""
    params = one_device(params)
    specs = [(t.user_attrs["proposal"], from_trial(params, target, t.params, params.seeds[0])) for t in points]
    key = {"study": name, "points": [n for n, _ in specs], "seeds": list(params.seeds), "code": source_sha256()}
    done, runs_csv, preds_npz = folder / RETRAINED, folder / "pareto_runs.csv", folder / "predictions.npz"
    if specs and done.exists() and json.loads(done.read_text()) == key and runs_csv.exists() and preds_npz.exists():
        print(f"sweep {target}: the {len(specs)} points were retrained by another command of this study; reusing its runs")
        return pd.read_csv(runs_csv), predictions.Predictions.read(preds_npz)
    done.unlink(missing_ok=True)
    rows, preds = protocol.retrain(params, specs, folder / "pareto", {"parent_run_id": parent, "study": name},
                                   params.sweep.workers)
    runs = pd.DataFrame(rows)
    runs.to_csv(runs_csv, index=False)
    written = predictions.write(preds_npz, protocol.labels(target), preds)
    write_json(done, key)
    return runs, written


def summarise(params: Params, study: optuna.Study, target: str, folder: Path, parent: str, t0: float) -> dict:
    """trials.csv, the Pareto points retrained (pareto_runs.csv) and summarised (pareto.csv), the
    sweep's metrics file and its MLflow parent run's metrics and files. Commands that share the
    folder (workers of one study on one filesystem) finish their trials together: one at a time
    here, or both would train the same runs into the same checkpoint files."""
    with FileLock(folder / LOCK):
        return _summarise(params, study, target, folder, parent, t0)


def _summarise(params: Params, study: optuna.Study, target: str, folder: Path, parent: str, t0: float) -> dict:
    s, name = params.sweep, study.study_name
    counted_trials = counted(proposals(study), s.n_trials)
    on_front = {t.user_attrs["proposal"] for t in front(counted_trials)}
    points = to_retrain(counted_trials, transfer.base_memory_bytes(), s.min_retrain)
    trials = pd.DataFrame(trial_rows(counted_trials))
    trials.to_csv(folder / "trials.csv", index=False)
    runs, preds = retrain_pareto(params, points, target, folder, parent, name)
    pareto = pareto_points(points, runs, preds, on_front)
    pareto.to_csv(folder / "pareto.csv", index=False)
    # over the retrained points that are on the trials' front, val and test means over the seeds
    fr = pareto[pareto.pareto] if len(pareto) else pareto
    hv = {split: hypervolume(list(zip(fr[f"{split}_acc"], fr.memory_pct)), s.reference_accuracy,
                             s.reference_memory_pct) if len(fr) else 0.0 for split in ("val", "test")}
    hv_log = {split: log_hypervolume(list(zip(fr[f"{split}_acc"], fr.memory_pct)), s.reference_accuracy)
              if len(fr) else 0.0 for split in ("val", "test")}
    states = trials.state.value_counts().to_dict()
    done = trials[trials.state == "COMPLETE"] if len(trials) else trials
    metrics = {
        "study": name,
        "complete": int(states.get("COMPLETE", 0)),
        "failed": int(states.get("FAIL", 0)),  # duplicates included: proposals not trained twice
        "duplicates": int(trials.fail_reason.astype(str).str.startswith("duplicate").sum()) if len(trials) else 0,
        "pareto_size": int(len(fr)),
        "retrained": len(pareto),
        "seeds": len(params.seeds),
        # the number to compare sweeps by: val (never test), accuracy x decades of memory, 1-100% of base
        "hypervolume_log_memory": round(hv_log["val"], 4),
        "hypervolume_log_memory_test": round(hv_log["test"], 4),  # reported beside it, chooses nothing
        "hypervolume": round(hv["val"], 4),   # linear memory % to reference_memory_pct (kept for comparison)
        "hypervolume_test": round(hv["test"], 4),
        "reference_point": {"accuracy": s.reference_accuracy, "memory_pct": s.reference_memory_pct},
        "memory_pct_min": round(float(pareto.memory_pct.min()), 4) if len(pareto) else None,
        "memory_pct_max": round(float(pareto.memory_pct.max()), 4) if len(pareto) else None,
        "hit_cap_improving": int(runs.hit_cap_improving.sum()) if len(runs) else 0,
        # trials stopped while still improving score low for their budget, not their configuration
        "trials_hit_cap_improving": int(done.hit_cap_improving.fillna(False).astype(bool).sum()) if len(done) else 0,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    write_json(METRICS_DIR / f"sweep_{target}.json", metrics)
    log_to_run(params, parent, {k: metrics[k] for k in ("complete", "failed", "pareto_size", "hypervolume_log_memory",
                                                         "hypervolume_log_memory_test")},
               [folder / f for f in ("trials.csv", "pareto.csv", "pareto_runs.csv")])
    print(f"sweep {target} ({name}): {metrics['complete']} complete, {metrics['failed']} failed, "
          f"{len(pareto)} trials retrained on {len(params.seeds)} seeds ({len(fr)} on the Pareto front), "
          f"hypervolume over log10 memory 1-100% (val) {hv_log['val']:.4f}, "
          f"{metrics['trials_hit_cap_improving']} trials stopped at the cap still improving")
    for _, r in pareto.iterrows():
        print(f"  trial {int(r.number):3d} {r.method:8s} memory {r.memory_pct:6.2f}% val {r.val_acc:.4f} "
              f"± {r.val_acc_ci:.4f} test {r.test_acc:.4f} ± {r.test_acc_ci:.4f}")
    return metrics
