"""Independent training runs side by side: spawned processes, each with its share of the cores.
On 2 cores, two 1-thread runs beat one 2-thread run by 1.2-1.3x in throughput
(benchmarks/side_by_side.py), which pays off for runs of similar length: an arm's reported seeds,
sweep trials and retrains (an lr search runs one after another: each run's pruning needs the
finished ones)."""

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


def warm_up(steps: int = 30) -> None:
    """A process's first training steps run slower than later ones (lazy kernel and allocator
    set-up): a few steps of a small conv net on random data, so the first timed run of a worker is
    timed like the rest."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.Hardtanh(),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(32 * 14 * 14, 10))
    opt = torch.optim.Adam(net.parameters())
    for _ in range(steps):
        x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def start_worker(threads: int) -> None:
    quiet()  # logging filters do not cross a spawn
    set_threads(threads)
    warm_up()


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
