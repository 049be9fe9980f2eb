"""The Optuna sweep: resume, search-space naming, stale-trial recovery, several workers, failing
trials and nested MLflow runs, on a tiny project built once (real `dvc repro` of the base), read
back through optuna, the CSV/JSON reports and MlflowClient."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import BIN, copy_project, tiny_params

pytestmark = pytest.mark.slow

TARGET = "mnist_5to9"
SPACE = {
    "method": ["serial", "parallel"],
    "groups": [2],
    "reduction": [1],
    "placement": ["last:1", "last:2"],
    "bits": [4, 8],
    "prune_amount": [0.0],
    "task_bn": [False],
    "head_bits": [8],
    "lr": {"low": 0.005, "high": 0.01, "log": True},
}
PRINTED = re.compile(r"sweep mnist_5to9 \((?P<name>[^)]+)\): (?P<complete>\d+) complete, (?P<failed>\d+) failed")
PARAM_KEYS = ("method", "groups", "reduction", "placement", "task_bn", "bits", "prune_amount", "head_bits", "lr")


def _journal(root: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(root / "reports/sweep" / TARGET / "optuna.journal")))


def _load(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_journal(root))


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def _snapshot(trials) -> list[tuple]:
    return [(t.number, t.params, t.values, t.datetime_complete) for t in trials]


def _sweep(root: Path, *args: str, params_file: str | None = None, **env: str) -> tuple[str, subprocess.CompletedProcess]:
    pre = ["--params", params_file] if params_file else []
    proc = _run(["pipeline", *pre, "sweep", "--target", TARGET, *args], root, timeout=300, **env)
    match = PRINTED.search(proc.stdout)
    assert match, proc.stdout[-2000:]
    return match["name"], proc


def _env(**extra: str) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(args: list[str], cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """run_cli with a shorter timeout: a hung sweep fails the test instead of stalling the suite."""
    proc = subprocess.Popen(args, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: worker processes included in a kill
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(args)} still running after {timeout} s")
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _write_params(root: Path, file: str, params: dict) -> str:
    (root / file).write_text(yaml.safe_dump(params, sort_keys=False))
    return file


def _non_dominated(points: dict[int, tuple[float, float]]) -> set[int]:
    """Numbers of (val_acc max, memory min) points that no other point dominates (written here,
    independent of pipeline.train.pareto and of optuna's best_trials)."""
    keep = set()
    for i, (a, m) in points.items():
        if not any(a2 >= a and m2 <= m and (a2 > a or m2 < m) for j, (a2, m2) in points.items() if j != i):
            keep.add(i)
    return keep


def _area(points: list[tuple[float, float]], ref_a: float, ref_m: float) -> float:
    """Exact union of boxes [m, ref_m] x [ref_a, a] by a grid over all breakpoints."""
    boxes = [(m, a) for a, m in points if a > ref_a and m < ref_m]
    xs = sorted({m for m, _ in boxes} | {ref_m})
    ys = sorted({a for _, a in boxes} | {ref_a})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            if any(m <= x0 and a >= y1 for m, a in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory) -> dict:
    """A copy of the session's built project (prepared target, binary base) with this file's
    sweep settings in its params.yaml."""
    params = tiny_params(**{"sweep.max_epochs": 1, "transfer.optim.patience": 1, "sweep.stale_after_s": 5,
                            "sweep.space": copy.deepcopy(SPACE)})
    root = copy_project(built_project[0], tmp_path_factory.mktemp("sweep") / "proj")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return {"root": root, "params": params}


@pytest.fixture(scope="module")
def resumed(project) -> dict:
    """Sweep 3 trials, then resume to 5; the reports are read right after (later sweeps overwrite them)."""
    root = project["root"]
    name3, out3 = _sweep(root, "--n-trials", "3")
    first = _snapshot(_complete(_load(root, name3)))
    name5, out5 = _sweep(root, "--n-trials", "5")
    folder = root / "reports/sweep" / TARGET
    return {
        "name3": name3, "name5": name5, "out3": out3.stdout, "out5": out5.stdout, "first": first,
        "trials_csv": pd.read_csv(folder / "trials.csv"),
        "pareto_csv": pd.read_csv(folder / "pareto.csv"),
        "metrics": json.loads((root / f"reports/metrics/sweep_{TARGET}.json").read_text()),
    }


# ------------------------------------------------------------------------------ 1. resume


def test_resume_keeps_first_trials_and_adds_new_ones(project, resumed):
    root = project["root"]
    assert resumed["name3"] == resumed["name5"]  # same settings -> same study: a resume
    assert PRINTED.search(resumed["out3"])["complete"] == "3"
    assert PRINTED.search(resumed["out5"])["complete"] == "5"
    first = resumed["first"]
    assert [n for n, *_ in first] == [0, 1, 2]
    study = _load(root, resumed["name5"])
    complete = _complete(study)
    assert len(complete) == 5
    assert _snapshot(complete)[:3] == first  # numbers, params, values, completion times unchanged
    assert [t.number for t in study.get_trials()] == [0, 1, 2, 3, 4]  # nothing else was started
    # the resumed sampler must not replay the stream that proposed trials 0..2
    assert complete[3].params != complete[0].params
    assert complete[4].params != complete[1].params
    for t in complete:
        assert set(t.params) == set(PARAM_KEYS)
        assert t.params["method"] in SPACE["method"] and t.params["bits"] in SPACE["bits"]
        assert SPACE["lr"]["low"] <= t.params["lr"] <= SPACE["lr"]["high"]
    assert resumed["metrics"]["study"] == resumed["name5"]
    assert resumed["metrics"]["complete"] == 5 and resumed["metrics"]["failed"] == 0


def test_resume_reports_trials_and_pareto(project, resumed):
    root = project["root"]
    complete = {t.number: t for t in _complete(_load(root, resumed["name5"]))}
    trials = resumed["trials_csv"]
    assert (trials.state == "COMPLETE").sum() == 5
    for _, r in trials[trials.state == "COMPLETE"].iterrows():
        t = complete[int(r.number)]
        assert (r.val_acc, r.task_memory_bytes) == tuple(t.values)
        assert r.method == t.params["method"] and int(r.bits) == t.params["bits"]

    pareto = resumed["pareto_csv"]
    assert {"test_acc", "memory_pct"} <= set(pareto.columns)
    numbers = [int(n) for n in pareto.number]
    assert len(set(numbers)) == len(numbers) and set(numbers) <= set(complete)
    front = _non_dominated({n: (t.values[0], t.values[1]) for n, t in complete.items()})
    card = json.loads((root / "models/base/binary/card.json").read_text())
    base_memory = card["metrics"]["memory_bytes"]
    # sweep.min_retrain 1: retrained are the Pareto points below the base's size, and only they
    assert set(numbers) == {n for n in front if complete[n].values[1] < base_memory}
    assert list(pareto.pareto) == [True] * len(pareto)
    runs = pd.read_csv(root / "reports/sweep" / TARGET / "pareto_runs.csv")
    for _, r in pareto.iterrows():
        t = complete[int(r.number)]
        # chosen by the trial's own val; reported from the retrain on every seed (here one)
        assert r.trial_val_acc == t.values[0] and r.task_memory_bytes == t.values[1]
        assert r.memory_pct == pytest.approx(100 * t.values[1] / base_memory, rel=1e-12)
        mine = runs[runs.number == r.number]
        assert list(mine.seed) == [0] and r.seeds == 1
        assert (r.val_acc, r.test_acc) == (mine.val_acc.iloc[0], mine.test_acc.iloc[0])
        assert 0.0 <= r.test_acc <= 1.0 and mine.epochs_run.iloc[0] <= 2  # transfer.optim's cap, not the trial's
    assert resumed["metrics"]["pareto_size"] == len(pareto)
    expected_hv = _area(list(zip(pareto.val_acc, pareto.memory_pct)), 0.0, 100.0)  # on val: test chooses nothing
    assert resumed["metrics"]["hypervolume"] == pytest.approx(round(expected_hv, 4), abs=1e-12)
    # over log10 memory from 1% to 100% of the base: points below 1% count at 1%
    expected_log = _area([(a, math.log10(max(m, 1.0))) for a, m in zip(pareto.val_acc, pareto.memory_pct)], 0.0, 2.0)
    assert resumed["metrics"]["hypervolume_log_memory"] == pytest.approx(round(expected_log, 4), abs=1e-12)
    expected_test = _area(list(zip(pareto.test_acc, pareto.memory_pct)), 0.0, 100.0)
    assert resumed["metrics"]["hypervolume_test"] == pytest.approx(round(expected_test, 4), abs=1e-12)


# ------------------------------------------------------------------------------ 2. search space -> name


def test_changed_search_space_starts_a_new_study(project, resumed):
    root = project["root"]
    before = _snapshot(_complete(_load(root, resumed["name5"])))
    changed = copy.deepcopy(project["params"])
    changed["sweep"]["space"]["bits"] = [2]
    name, _ = _sweep(root, "--n-trials", "1", params_file=_write_params(root, "params_bits2.yaml", changed))
    assert name != resumed["name5"] and name.startswith(f"{TARGET}-")
    new = _complete(_load(root, name))
    assert len(new) == 1 and new[0].number == 0 and new[0].params["bits"] == 2
    names = set(optuna.get_all_study_names(_journal(root)))
    assert {name, resumed["name5"]} <= names
    assert _snapshot(_complete(_load(root, resumed["name5"]))) == before  # old study untouched
    assert len(_load(root, resumed["name5"]).get_trials()) == 5
    assert json.loads((root / f"reports/metrics/sweep_{TARGET}.json").read_text())["study"] == name


# ------------------------------------------------------------------------------ 3. stale RUNNING trials


def test_fail_stale_trials_in_process(tmp_path):
    from pipeline.train.sweep import fail_stale_trials

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="stale", storage=storage, directions=["maximize", "minimize"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    now = time.time()
    setups = {
        "dead_pid": (host, gone.pid, now),
        "old_heartbeat": (host, os.getpid(), now - 120),
        "fresh": (host, os.getpid(), now),
        "other_host_dead_pid": ("elsewhere.invalid", gone.pid, now),  # a pid there says nothing here
    }
    trials = {}
    for key, (h, pid, beat) in setups.items():
        trial = study.ask()
        storage.set_trial_system_attr(trial._trial_id, "worker_host", h)
        storage.set_trial_system_attr(trial._trial_id, "worker_pid", pid)
        storage.set_trial_system_attr(trial._trial_id, "heartbeat", beat)
        trials[key] = trial.number
    failed = fail_stale_trials(study, storage, 60)
    assert sorted(failed) == sorted([trials["dead_pid"], trials["old_heartbeat"]])
    by_number = {t.number: t for t in optuna.load_study(study_name="stale", storage=storage).get_trials()}
    dead = by_number[trials["dead_pid"]]
    assert dead.state == TrialState.FAIL
    assert dead.user_attrs["fail_reason"].startswith("stale") and str(gone.pid) in dead.user_attrs["fail_reason"]
    old = by_number[trials["old_heartbeat"]]
    assert old.state == TrialState.FAIL
    seconds = re.fullmatch(r"stale: no heartbeat for (\d+)s", old.user_attrs["fail_reason"])
    assert seconds and 120 <= int(seconds[1]) <= 180, old.user_attrs["fail_reason"]
    for key in ("fresh", "other_host_dead_pid"):
        assert by_number[trials[key]].state == TrialState.RUNNING
        assert "fail_reason" not in by_number[trials[key]].user_attrs
    assert fail_stale_trials(study, storage, 60) == []  # nothing left to fail


_LOCK_SCRIPT = """
import os, signal, sys
from pathlib import Path
import optuna
from pipeline.train.sweep import DIRECTIONS, open_storage

storage = open_storage(None, Path("reports/sweep/t"))  # relative, as the sweep stage passes it
if sys.argv[1] == "recover":  # only to keep the test short: Optuna's default grace is 30 s
    lock = getattr(getattr(storage, "_backend", None), "_lock", None)
    if lock is not None and hasattr(lock, "grace_period"):
        lock.grace_period = 3
study = optuna.create_study(study_name="locked", storage=storage, directions=DIRECTIONS, load_if_exists=True)
if sys.argv[1] == "die":  # killed in the middle of a journal write, holding the journal lock
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
study.ask()
print("trials", len(study.get_trials()))
"""


def test_lock_left_by_a_killed_worker_is_recovered(tmp_path):
    """A worker SIGKILLed while appending to the journal leaves the journal's lock behind; the
    next worker must take it over (Optuna's grace period), not spin forever."""
    import sys

    died = subprocess.run([sys.executable, "-c", _LOCK_SCRIPT, "die"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert os.path.lexists(tmp_path / "reports/sweep/t/optuna.journal.lock")  # the lock it held is left behind
    try:
        ok = subprocess.run([sys.executable, "-c", _LOCK_SCRIPT, "recover"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the next worker is still waiting for the dead worker's journal lock after 60 s")
    assert ok.returncode == 0, ok.stderr[-2000:]
    made = re.search(r"trials (\d+)", ok.stdout)
    assert made and int(made[1]) >= 1, ok.stdout  # the new worker's trial is in the journal


# ------------------------------------------------------------------------------ 4. two workers, any timing

def _reports(root: Path) -> dict[str, pd.DataFrame]:
    """The sweep's reports without their timings (seconds: the only columns allowed to differ)."""
    folder = root / "reports/sweep" / TARGET
    out = {}
    for f in ("trials.csv", "pareto.csv", "pareto_runs.csv"):
        df = pd.read_csv(folder / f)
        out[f] = df.drop(columns=[c for c in df.columns if re.search(r"_s(_ci)?$|time", c)])
    return out


@pytest.fixture(scope="module")
def timings(project) -> dict:
    """One 2-worker sweep (5 trials: 4 anchors, then the model's proposal 4 from the results of
    0..2 while 3 may run) three ways: worker 1 slowed by 2 s a trial, worker 0 slowed instead, and
    killed with two trials complete and one RUNNING, then resumed. Each in its own study."""
    from pipeline.train.sweep import DELAY_ENV

    root = project["root"]
    params = copy.deepcopy(project["params"])
    params["sweep"].update(n_trials=5, workers=2, in_flight=2, n_startup_trials=0)
    file = _write_params(root, "params_two.yaml", params)
    out = {}
    for name, slowed in (("two-a", "1:2"), ("two-b", "0:2")):
        _sweep(root, "--study-name", name, params_file=file, **{DELAY_ENV: slowed})
        out[name] = {"reports": _reports(root), "study": _load(root, name)}
    lock = root / "reports/sweep" / TARGET / "optuna.journal.lock"
    proc = subprocess.Popen(["pipeline", "--params", file, "sweep", "--target", TARGET, "--study-name", "two-kill"],
                            cwd=root, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before it was caught mid-way"
            try:
                trials = _load(root, "two-kill").get_trials()
            except KeyError:  # not created yet
                time.sleep(0.2)
                continue
            # killed between journal writes: a kill inside a write is test_lock_left_by_a_killed_worker_is_recovered
            running = [t for t in trials if t.state == TrialState.RUNNING and "worker_pid" in t.system_attrs]
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and running and not os.path.lexists(lock):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped: the pids are really gone, not zombies
    victims = _load(root, "two-kill").get_trials(states=(TrialState.RUNNING,))
    _sweep(root, "--study-name", "two-kill", params_file=file)
    out["two-kill"] = {"reports": _reports(root), "study": _load(root, "two-kill"), "victims": victims}
    return out


def test_two_workers_give_the_same_trials_whatever_their_timing(timings):
    """The same params, worker 1 or worker 0 slowed: the same trials (numbers, parameters, values),
    Pareto set and retrained numbers; exactly n_trials COMPLETE, both workers trained."""
    a, b = timings["two-a"], timings["two-b"]
    for f in ("trials.csv", "pareto.csv", "pareto_runs.csv"):
        pd.testing.assert_frame_equal(a["reports"][f], b["reports"][f], obj=f)
    trials = a["reports"]["trials.csv"]
    assert list(trials.number) == [0, 1, 2, 3, 4] and (trials.state == "COMPLETE").all()
    assert list(trials.anchor) == [True] * 4 + [False]
    for run in (a, b):
        complete = _complete(run["study"])
        assert sorted(t.user_attrs["proposal"] for t in complete) == [0, 1, 2, 3, 4]
        assert len({t.system_attrs["worker_pid"] for t in complete}) == 2  # both trained
        assert not run["study"].get_trials(states=(TrialState.RUNNING,))
        for t in run["study"].get_trials(states=(TrialState.FAIL,)):  # only lost attempts, retried
            assert t.user_attrs["fail_reason"].startswith(("lost:", "stale:")), t.user_attrs
    front = _non_dominated({int(r.number): (r.val_acc, r.task_memory_bytes) for _, r in trials.iterrows()})
    assert set(a["reports"]["pareto.csv"].number) == front


def test_a_killed_sweep_resumes_to_the_same_trials(timings):
    """Killed with trials RUNNING, then rerun: each killed attempt is failed as stale (its pid
    gone) and its proposal retried as itself, so the reports equal the uninterrupted runs'."""
    run, victims = timings["two-kill"], timings["two-kill"]["victims"]
    assert victims, "no trial RUNNING when the sweep was killed"
    for f in ("trials.csv", "pareto.csv", "pareto_runs.csv"):
        pd.testing.assert_frame_equal(timings["two-a"]["reports"][f], run["reports"][f], obj=f)
    study = run["study"]
    by_number = {t.number: t for t in study.get_trials()}
    held = {t.user_attrs["proposal"]: t for t in _complete(study)}
    for v in victims:
        killed = by_number[v.number]
        assert killed.state == TrialState.FAIL and killed.user_attrs["fail_reason"].startswith("stale")
        # an attempt the kill caught before its heartbeat recorded a pid is stale by age instead
        if "worker_pid" in v.system_attrs:
            assert str(v.system_attrs["worker_pid"]) in killed.user_attrs["fail_reason"]
        retry = held[v.user_attrs["proposal"]]
        assert retry.number > v.number and retry.params == v.params
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_two_commands_sharing_a_folder_retrain_each_point_once(project, timings):
    """Two `pipeline sweep` commands on one study and one folder (as workers on one filesystem)
    finish their trials together and both reach the retrains: the second waits for the first and
    reuses its runs instead of training the same (point, seed) into the same checkpoint files (that
    race failed a scale-out CI run: one command cleared the best.ckpt the other was loading). Both
    print the same summary, each run is trained and logged once, and the reports equal one 2-worker
    command's."""
    root, name = project["root"], "two-commands"
    cmd = ["pipeline", "--params", "params_two.yaml", "sweep", "--target", TARGET, "--study-name", name, "--workers", "1"]
    procs = [subprocess.Popen(cmd, cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert sum("reusing its runs" in out for out in outs) == 1, outs
    assert not any("resuming" in out for out in outs)  # no run continued from another's checkpoint

    def summary(out: str) -> list[str]:  # the sweep's line and one per retrained point
        lines = out.splitlines()
        i = next(i for i, line in enumerate(lines) if PRINTED.match(line))
        return lines[i:]
    assert summary(outs[0]) == summary(outs[1])
    reports = _reports(root)
    for f in ("trials.csv", "pareto.csv", "pareto_runs.csv"):
        pd.testing.assert_frame_equal(timings["two-a"]["reports"][f], reports[f], obj=f)
    complete = _complete(_load(root, name))
    assert sorted(t.user_attrs["proposal"] for t in complete) == [0, 1, 2, 3, 4]
    assert len({t.system_attrs["worker_pid"] for t in complete}) == 2  # both commands trained trials

    client = MlflowClient("sqlite:///" + str(root / "mlflow.db"))
    exp = client.get_experiment_by_name("bnn-adapters")
    retrains = client.search_runs([exp.experiment_id], max_results=1000,
                                  filter_string=f"tags.stage = 'sweep_retrain' and tags.study = '{name}'")
    trained = sorted((int(r.data.params["trial_number"]), int(r.data.params["seed"])) for r in retrains)
    runs = reports["pareto_runs.csv"]
    assert len(runs) == len(reports["pareto.csv"]) * len(project["params"]["seeds"]) > 0
    assert trained == sorted(zip(runs.number, runs.seed))  # each (point, seed) once


# ------------------------------------------------------------------------------ 5. failing trials, in process


@pytest.fixture
def in_process(project, monkeypatch):
    from pipeline.config import load_params

    root = project["root"]
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(root / "params.yaml")
    params = replace(params, sweep=replace(params.sweep, n_trials=2))
    return root, params


def test_failing_trial_is_recorded_and_skipped(in_process, monkeypatch, tmp_path):
    import pipeline.train.transfer as transfer
    from pipeline.errors import UserError
    from pipeline.train.sweep import create_study, run_worker

    root, params = in_process
    real, calls = transfer.run, []

    def flaky(*args, **kwargs):
        calls.append(kwargs["stem"])
        if len(calls) == 1:
            raise UserError("invalid combination")
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer, "run", flaky)
    folder = tmp_path / "sweep"
    create_study(params, TARGET, "fail-test", None, folder)
    ran = run_worker(params, TARGET, "fail-test", None, folder, 0, None, poll_s=0.1)
    study = optuna.load_study(study_name="fail-test",
                              storage=JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))))
    trials = study.get_trials()
    assert ran == 3 and calls == ["trial_0000", "trial_0001", "trial_0002"]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.user_attrs["proposal"] for t in trials] == [0, 1, 2]  # a failure is a result: not retried
    assert trials[0].user_attrs["fail_reason"] == "invalid combination"
    assert "val_acc" not in trials[0].user_attrs
    for t in trials[1:3]:
        assert "fail_reason" not in t.user_attrs
        assert (folder / "trials" / f"trial_{t.number:04d}.safetensors").exists()


def test_worker_survives_its_trial_being_failed_as_stale(in_process, monkeypatch, tmp_path):
    """Another worker may judge a live trial stale (a late heartbeat: an overloaded machine, a
    suspended VM, clock skew between hosts). The slow worker must give that trial up and go on,
    not crash the sweep when it then tries to record the result."""
    import pipeline.train.transfer as transfer
    from pipeline.train.sweep import create_study, fail_stale_trials, run_worker

    root, params = in_process
    real, calls = transfer.run, []
    folder = tmp_path / "sweep"
    journal = str(folder / "optuna.journal")

    def judged_stale(*args, **kwargs):
        calls.append(kwargs["stem"])
        if len(calls) == 1:  # meanwhile a peer (its own storage handle) fails this trial as stale
            peer_storage = JournalStorage(JournalFileBackend(journal))
            peer = optuna.load_study(study_name="peer-test", storage=peer_storage)
            assert fail_stale_trials(peer, peer_storage, 0.001) == [0]
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer, "run", judged_stale)
    create_study(params, TARGET, "peer-test", None, folder)
    run_worker(params, TARGET, "peer-test", None, folder, 0, None, poll_s=0.1)
    study = optuna.load_study(study_name="peer-test", storage=JournalStorage(JournalFileBackend(journal)))
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"].startswith("stale")
    assert len(_complete(study)) == 2
    # the result of the attempt judged stale is discarded; its proposal is retried as itself
    assert calls == ["trial_0000", "trial_0000", "trial_0001"]
    assert [t.user_attrs["proposal"] for t in _complete(study)] == [0, 1]
    assert _complete(study)[0].params == trials[0].params


def test_only_the_study_creator_makes_the_parent_run(in_process, tmp_path):
    """Two coordinators started together (two machines, one storage): the unique study name makes
    one the creator; the other waits for the creator's parent run instead of making a second one."""
    import threading

    from pipeline.train.sweep import create_study
    from pipeline.train.tracking import PARENT_RUN_ATTR, parent_run_id as parent_run

    root, params = in_process
    folder = tmp_path / "sweep"
    study_a, created_a = create_study(params, TARGET, "coord-test", None, folder)
    study_b, created_b = create_study(params, TARGET, "coord-test", None, folder)
    assert (created_a, created_b) == (True, False)
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("b", parent_run(params, study_b, TARGET, created_b, wait_s=60)))
    waiter.start()
    time.sleep(1.5)  # the non-creator is waiting now, with nothing recorded yet
    assert "b" not in got
    got["a"] = parent_run(params, study_a, TARGET, created_a, wait_s=60)
    waiter.join(timeout=60)
    assert got["a"] == got["b"]
    client = MlflowClient("sqlite:///" + str(root / "mlflow.db"))
    exp = client.get_experiment_by_name("bnn-adapters")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.study = 'coord-test' and tags.stage = 'sweep'")
    assert [r.info.run_id for r in runs] == [got["a"]]
    # A study whose creator died before recording a parent: after the wait, adopt the tagged run.
    orphan, created = create_study(params, TARGET, "coord-test", None, folder)
    orphan.set_user_attr(PARENT_RUN_ATTR, "")
    assert parent_run(params, orphan, TARGET, created, wait_s=0.5) == got["a"]


# ------------------------------------------------------------------------------ 6. MLflow parent / child runs


def test_mlflow_parent_and_child_runs(project, resumed):
    root, name = project["root"], resumed["name5"]
    client = MlflowClient("sqlite:///" + str(root / "mlflow.db"))
    exp = client.get_experiment_by_name("bnn-adapters")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.stage = 'sweep' and tags.study = '{name}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["target"] == TARGET
    assert parent.data.metrics["complete"] == 5.0
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000)
    complete = {t.number: t for t in _complete(_load(root, name))}
    mine = [r for r in children if r.data.tags["stage"] == "sweep_trial" and int(r.data.params["trial_number"]) in complete]
    assert len(mine) == 5
    retrains = [r for r in children if r.data.tags["stage"] == "sweep_retrain"]
    assert retrains and all(int(r.data.params["trial_number"]) in complete and "test_acc" in r.data.metrics
                            for r in retrains)  # the Pareto points, retrained, are the ones test reports
    assert sorted(int(r.data.params["trial_number"]) for r in mine) == sorted(complete)
    params = {"trial_number", "target", "method", "adapter_type", "groups", "placement", "adapter_bits",
              "prune_amount", "seed"}
    for r in mine:
        t = complete[int(r.data.params["trial_number"])]
        assert r.data.tags["stage"] == "sweep_trial" and r.data.tags["study"] == name
        assert params <= set(r.data.params), set(r.data.params)
        assert {"val_acc", "task_memory_bytes", "memory_ratio"} <= set(r.data.metrics)
        assert "test_acc" not in r.data.metrics  # trials never touch the test split
        assert r.data.params["target"] == TARGET
        assert r.data.params["method"] == t.params["method"] == r.data.params["adapter_type"]
        assert int(r.data.params["adapter_bits"]) == t.params["bits"]
        assert r.data.params["placement"] == t.params["placement"]
        assert r.data.metrics["task_memory_bytes"] == t.values[1]
    # every child of this parent belongs to this study
    assert all(r.data.tags.get("study") == name for r in children)
