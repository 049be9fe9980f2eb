"""Independent training runs side by side: spawned processes, each with its share of the cores.
On 2 cores, two 1-thread runs beat one 2-thread run by 1.2-1.3x in throughput
(benchmarks/side_by_side.py), which pays off for many runs of similar length (sweep trials and
retrains), not for a stage's 3 + 2 (the lr grid, then the seeds)."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import torch

from pipeline.console import quiet


def threads_each(procs: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, procs))


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def start_worker(threads: int) -> None:
    quiet()  # logging filters do not cross a spawn
    set_threads(threads)


def _call(job: tuple[Callable, dict]) -> Any:
    fn, kwargs = job
    return fn(**kwargs)


def map_runs(fn: Callable, jobs: list[dict], procs: int) -> list:
    """[fn(**job) for job in jobs], in job order, on `procs` processes (1: here, one by one).
    `fn` must be importable (a module-level function); an exception in a job is raised here."""
    if procs <= 1 or len(jobs) <= 1:
        return [fn(**job) for job in jobs]
    with ProcessPoolExecutor(min(procs, len(jobs)), mp_context=mp.get_context("spawn"), initializer=start_worker,
                             initargs=(threads_each(procs),)) as pool:
        return list(pool.map(_call, [(fn, job) for job in jobs]))
