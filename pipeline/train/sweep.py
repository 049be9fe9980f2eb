"""Optuna sweeps of adapter configurations: maximise val accuracy, minimise task memory.

Resumable (the study name is a hash of the settings; `n_trials` counts COMPLETE trials),
safe for several workers on one storage (exactly `n_trials` complete: a worker only starts a
trial while fewer than `n_trials` are complete or running, and gives a trial back if lower-numbered
ones already fill the quota), and robust to killed workers (RUNNING trials whose process is gone,
or whose heartbeat is older than `stale_after_s`, are failed with a reason).
"""

from __future__ import annotations

import json
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
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, ProgrammingError

from pipeline.config import Params
from pipeline.errors import EnvironmentFailure, TrainingDiverged, UserError, first_line
from pipeline.io import sha256, write_json
from pipeline.nn.binary import storage_bits
from pipeline.nn.memory import BREAKDOWN_COLUMNS
from pipeline.paths import METRICS_DIR
from pipeline.stats import mean_ci
from pipeline.train import protocol, transfer
from pipeline.train.parallel import start_worker, threads_each
from pipeline.train.pareto import hypervolume
from pipeline.train.spec import RunSpec, from_trial
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
           "max_epochs": s.max_epochs, "sampler": s.sampler, "seed": s.seed, "seeds": params.seeds,
           "n_startup_trials": s.n_startup_trials, "anchors": s.anchors,
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


def make_sampler(params: Params, worker: int, existing: int = 0) -> optuna.samplers.BaseSampler:
    # Workers, and a resumed study, must not replay the random stream that proposed earlier trials.
    seed = params.sweep.seed + 1000 * worker + existing
    if params.sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=params.sweep.n_startup_trials)


def _placement_size(p: str) -> float:
    return float("inf") if p == "all" else int(p[5:]) if p.startswith("last:") else len(p.split(","))


def anchors(params: Params) -> list[dict[str, Any]]:
    """The smallest and the largest configuration of each adapter type in the space (every knob at
    its cheapest or dearest end), so the front's two ends are measured, not left to chance."""
    sp = params.sweep.space
    lr = sp.lr.low * (sp.lr.high / sp.lr.low) ** 0.5 if sp.lr.log else (sp.lr.low + sp.lr.high) / 2
    ends = {
        "groups": (max(sp.groups), min(sp.groups)),
        "reduction": (max(sp.reduction), min(sp.reduction)),
        "placement": (min(sp.placement, key=_placement_size), max(sp.placement, key=_placement_size)),
        "bits": (min(sp.bits, key=storage_bits), max(sp.bits, key=storage_bits)),
        "prune_amount": (max(sp.prune_amount), min(sp.prune_amount)),
        "task_bn": (min(sp.task_bn), max(sp.task_bn)),
        "head_bits": (min(sp.head_bits), max(sp.head_bits)),
    }
    return [{"method": m, **{k: v[end] for k, v in ends.items()}, "lr": lr} for m in sp.method for end in (0, 1)]


def suggest(trial: optuna.trial.BaseTrial, params: Params, target: str, seed: int,
            max_epochs: Optional[int] = None) -> RunSpec:
    """The trial's run: its sampled knobs (in a fixed order: the samplers' streams depend on it)
    on top of the adapter section; `max_epochs` caps a trial below the arms' budget."""
    sp = params.sweep.space
    values = {"method": trial.suggest_categorical("method", sp.method)}
    for knob in ("groups", "reduction", "placement", "task_bn", "bits", "prune_amount", "head_bits"):
        values[knob] = trial.suggest_categorical(knob, getattr(sp, knob))
    values["lr"] = trial.suggest_float("lr", sp.lr.low, sp.lr.high, log=sp.lr.log)
    return from_trial(params, target, values, seed, max_epochs)


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


def _counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    return complete, len(trials) - complete


def one_device(params: Params) -> Params:
    """Sweep runs are many and short: one device each, no progress bars (sweeps scale out by
    workers, not by DDP)."""
    t = params.trainer
    return replace(params, trainer=replace(t, progress_bar=False, strategy="auto",
                                           devices=t.devices[:1] if isinstance(t.devices, list) else 1))


def run_trial(params: Params, trial: optuna.trial.BaseTrial, target: str, name: str, folder: Path,
              parent: Optional[str], base_bytes: float) -> dict[str, Any]:
    """One trial on the first seed (val only): the user attrs it records, or its `fail_reason`."""
    s, stem = params.sweep, f"trial_{trial.number:04d}"
    try:
        spec = suggest(trial, params, target, params.seeds[0], s.max_epochs)
        tracking = Tracking(f"sweep-{target}-trial{trial.number}",
                            run_tags("sweep_trial", target=target, method=spec.method, precision="binary", study=name),
                            parent, {"trial_number": trial.number, "study": name})
        row = transfer.run(params, spec, tracking, out=folder / "trials", stem=stem, base_bytes=base_bytes,
                           test=False).row
    except (UserError, TrainingDiverged, RuntimeError, ValueError) as exc:  # invalid combination, diverged
        return {"fail_reason": first_line(exc)}
    shutil.rmtree(folder / "trials" / "checkpoints" / stem, ignore_errors=True)
    result = {key: row[key] for key in ("val_acc", "task_memory_bytes", "adapter_memory_bytes", "memory_ratio",
                                         "sparsity", "train_time_s", "epochs_run", "hit_cap_improving")}
    return {**result, "adapter": str(folder / "trials" / f"{stem}.safetensors")}


def run_worker(params: Params, target: str, name: str, storage_url: Optional[str], folder: Path,
               worker: int, parent_run_id: Optional[str], poll_s: float = 1.0) -> int:
    """Run trials until the study holds `n_trials` COMPLETE trials. Returns trials run here."""
    storage = open_storage(storage_url, folder)
    existing = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(params, worker, existing))
    n, s = params.sweep.n_trials, params.sweep
    params = one_device(params)
    base_bytes = transfer.base_memory_bytes()
    ran, failed_in_a_row = 0, 0
    while True:
        fail_stale_trials(study, storage, s.stale_after_s)
        complete, running = _counts(study)
        if complete >= n:
            return ran
        if complete + running >= n:  # the quota is in flight; wait in case one of them fails
            time.sleep(poll_s)
            continue
        trial = study.ask()
        ahead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                 if t.number < trial.number]
        if len(ahead) >= n:  # another worker took the last slot first
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", "surplus: quota already taken by lower-numbered trials")
            study.tell(trial, state=TrialState.FAIL)
            continue
        beat = Heartbeat(storage, trial._trial_id, interval=max(1.0, s.stale_after_s / 4))
        # Read per trial, so trials nest under the parent the study records even if it changed.
        parent = study.user_attrs.get(PARENT_RUN_ATTR, parent_run_id)
        try:
            result = run_trial(params, trial, target, name, folder, parent, base_bytes)
        finally:
            beat.stop()
        ran += 1
        try:
            if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                raise optuna.exceptions.UpdateFinishedTrialError("failed meanwhile")
            for key, value in result.items():
                storage.set_trial_user_attr(trial._trial_id, key, value)
            if "fail_reason" in result:
                study.tell(trial, state=TrialState.FAIL)
                print(f"trial {trial.number} failed: {result['fail_reason']}")
                failed_in_a_row += 1
                if failed_in_a_row >= s.max_failures_in_a_row:
                    raise UserError(f"sweep: {failed_in_a_row} trials failed in a row (sweep.max_failures_in_a_row); "
                                    f"last reason: {result['fail_reason']}")
            else:
                failed_in_a_row = 0
                study.tell(trial, [result["val_acc"], result["task_memory_bytes"]])
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker judged this trial stale (late heartbeat) and failed it; it counts as
            # failed, and the quota loop runs a replacement.
            print(f"trial {trial.number}: marked failed by another worker meanwhile; its result is discarded")


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
        for config in anchors(params) if params.sweep.anchors else []:
            study.enqueue_trial(config, user_attrs={"anchor": True}, skip_if_exists=True)
    return study, created


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name,
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


def pareto_points(study: optuna.Study, runs: pd.DataFrame) -> pd.DataFrame:
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


def retrain_pareto(params: Params, study: optuna.Study, target: str, folder: Path, parent: str,
                   name: str) -> pd.DataFrame:
    """The non-dominated COMPLETE trials (on val), each retrained on every seed at the arms' budget
    (transfer.optim, the trial's lr), `sweep.workers` runs side by side: one row per (trial, seed),
    the same columns as results.csv."""
    params = one_device(params)
    points = [(t.number, suggest(optuna.trial.FixedTrial(t.params), params, target, params.seeds[0]))
              for t in sorted(study.best_trials, key=lambda t: (t.values[1], t.number))]
    rows = protocol.retrain(params, points, folder / "pareto", {"parent_run_id": parent, "study": name},
                            params.sweep.workers)
    return pd.DataFrame(rows)


def summarise(params: Params, study: optuna.Study, target: str, folder: Path, parent: str, t0: float) -> dict:
    """trials.csv, the Pareto points retrained (pareto_runs.csv) and summarised (pareto.csv), the
    sweep's metrics file and its MLflow parent run's metrics and files."""
    s, name = params.sweep, study.study_name
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
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    write_json(METRICS_DIR / f"sweep_{target}.json", metrics)
    log_to_run(params, parent, {k: metrics[k] for k in ("complete", "failed", "pareto_size", "hypervolume",
                                                         "hypervolume_test")},
               [folder / f for f in ("trials.csv", "pareto.csv", "pareto_runs.csv")])
    print(f"sweep {target} ({name}): {metrics['complete']} complete, {metrics['failed']} failed, "
          f"Pareto set {len(pareto)} retrained on {len(params.seeds)} seeds, hypervolume (val) {hv['val']:.4f}, "
          f"{metrics['trials_hit_cap_improving']} trials stopped at the cap still improving")
    for _, r in pareto.iterrows():
        print(f"  trial {int(r.number):3d} {r.method:8s} memory {r.memory_pct:6.2f}% val {r.val_acc:.4f} "
              f"± {r.val_acc_ci:.4f} test {r.test_acc:.4f} ± {r.test_acc_ci:.4f}")
    return metrics
