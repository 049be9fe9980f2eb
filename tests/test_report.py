"""The report stage: a hand-written results set (no training) -> report.md and plots, every number
in report.md checked against a hand calculation on the fixture; selection on val only (test numbers
scrambled must not change any choice); question 3 over every task state (head, BN thresholds, adapters)
with each choice's name and memory breakdown; the "not distinguishable" wording; the protocol section;
missing inputs; PNG sizes; and a real `dvc repro` where a report-only params change reruns only `report`.

Hand arithmetic used throughout. A 95% Student t half-width is t_{0.975,n-1} * sd / sqrt(n) with
  t_{0.975,1} = 12.7062 (two seeds), t_{0.975,2} = 4.3027 (three seeds).
Two seeds a, b: sd = |a - b| / sqrt(2), so half = 12.7062 * |a - b| / 2 = 6.3531 * |a - b|.
Three seeds m - d, m, m + d: sd = d, so half = 4.3027 * d / sqrt(3) = 2.4841 * d.
One seed: half unknown (NaN), printed "(1 seed)", never distinguishable.

Fixture at a glance (base = binary base memory = 10240 bytes = 10.00 KiB; band 7%-12%; budget 12%;
every arm's lr grid "0.002 0.005 0.01"; max_epochs 15; "cap" = hit the cap still improving):

target tA         seeds  val          test         ratio  train s      epoch    t95      epochs   cap  lr
  bn     binary   0,1    .87/.88      .82/.84      .075   2.9/3.1      .6       1.5      9/11     -    .01
  full   binary   0,1    .89/.91      .90/.92      1.00   11.9/12.1    2.0/2.4  4.0/6.0  12/14    -    .005
  full   fp32     0      .93          .94          32.0   20.0         4.0      8.0      10       -    .002
  head   binary   0,1,2  .71/.72/.73  .69/.70/.71  .05    1.8/2.0/2.2  .4       1.0      9/10/11  -    .01
  serial binary   0,1    .8125/.9375  .86/.88      .10    5.0/5.8      1.1      1.5/2.5  11/15    s1   .005
  parallel binary 0      .85          .95          .11    3.0          .55      1.0      8        -    .01
  Pareto (sweep, 2 seeds each; trial val = the single-seed trial's own val accuracy):
    trial 4 serial   .03  trial val .80  val .79/.81    test .90/.91    (test within 1 pt of full, val not)
    trial 2 parallel .08  trial val .87  val .868/.876  test .84/.86    (val within 3 pts of full, test not)
    trial 9 serial   .09  trial val .88  val .87/.88    test .885/.895  (val ties transfer serial's .875)
    trial 5 parallel .20  trial val .95  val .95/.97    test .89/.90    (val within 1 pt, test not; s1 hit cap)
  bn = "BN thresholds + head" (BN at 16 bits): val .875 ties trial 9 and transfer serial, and at 7.5% it is the
  smallest task state within 3 pts of full on val; question 1 (adapters only) must still ignore it.
  Memory breakdown (mem_*_bytes: weights, scales, BN, head, masks; the same on every seed) on a few rows only,
  the others NaN (as per-run CSVs written before the breakdown existed):
    head 0/0/0/512/0 (0.50 KiB); bn 0/0/256/512/0 (0.75 KiB: 64 channels x 2 values x 16 bits = 256 bytes);
    transfer serial 480/32/0/512/0 (1.00 KiB: 960 4-bit weights = 480 bytes, 8 output channels x 32-bit scale);
    trial 5 (parallel g4 r1 all 1-bit +task BN pruned 0.5) 256/256/512/512/512 (2.00 KiB: 4096 1-bit weights,
    half kept -> 2048 bits = 256 bytes + a 4096-bit mask = 512 bytes; 64 scales x 32 bits = 256; BN 64 x 2 x 32
    bits = 512); tB trial 1 (parallel g8 r1 last:2 4-bit) 2400/160/0/512/0 (3.00 KiB: 4800 4-bit weights, 40
    scales).
target tB (one seed each)
  full   binary   0      .78          .80          1.00   8.0          1.6      0.0      9        -    .005
  full   fp32     0      .81          .82          32.0   16.0         3.2      6.0      10       -    .002
  head   binary   0      .58          .60          .05    1.2          .24      0.5      15       s0   .01
  serial binary   0      .74          .77          .15    2.0          .4       1.0      7        -    .01
  parallel binary 0      .70          .75          .10    6.0          1.2      3.0      12       -    .005
  Pareto (sweep, 1 seed each): trial 0 serial .13 val .755 test .785 | trial 1 parallel .30 val .765 test .795
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, ROOT, copy_project, run_cli
from pipeline.config import parse_params
from pipeline.errors import UserError
from pipeline.report import analysis
from pipeline.report.markdown import accuracy_section, breakdown_text, ci_num, ci_pct, runs_table, size_section
from pipeline.stages import report
from pipeline.stats import distinguishable, mean_ci

BASE = 10240.0     # binary base, bytes (10.00 KiB)
FP32 = 327680.0    # fp32 base, bytes (320 KiB)
T1 = 12.7062       # t_{0.975,1}: the 95% quantile factor for two seeds
T2 = 4.3027        # t_{0.975,2}: for three seeds
NAN = float("nan")
LR_GRID = "0.002 0.005 0.01"   # as the transfer stage writes it: the grid, space-separated
MAX_EPOCHS = 15
MEM = ["mem_weights_bytes", "mem_scales_bytes", "mem_bn_bytes", "mem_head_bytes", "mem_masks_bytes"]  # the breakdown
ADAPTER = {"groups": 16, "reduction": 1, "placement": "last:3", "adapter_bits": 4, "learn_scale": False,
           "head_bits": 8, "prune_amount": 0.0, "task_bn": False, "bn_bits": 32}
NONE = {"groups": 0, "reduction": 0, "placement": "none", "adapter_bits": 0, "learn_scale": False, "prune_amount": 0.0}
HEAD_BITS = {"full": 32, "head": 8, "bn": 8}  # full keeps its float head in its copy; every new head is 8-bit
# train_transfer's row, column for column (transfer_keys first), then the transfer stage's lr_grid
COLUMNS = ["target", "method", "precision", "adapter_type", "groups", "reduction", "placement", "adapter_bits",
           "learn_scale", "head_bits", "prune_amount", "task_bn", "bn_bits", "seed", "sparsity", "val_acc", "test_acc",
           "task_memory_bytes", "adapter_memory_bytes", "base_memory_bytes", "memory_ratio", *MEM, "train_time_s",
           "prefix_time_s",
           "epoch_time_s", "time_to_95_s", "trainable_params", "lr", "epochs_run", "max_epochs", "stopped_early",
           "hit_cap_improving", "packed_payload_bytes", "lr_grid"]
# the sweep stage's pareto_points(): number, trial params, trial val, seeds, mean and _ci per measure
PARETO_COLUMNS = ["number", "method", "groups", "reduction", "placement", "task_bn", "bits", "prune_amount", "lr",
                  "trial_val_acc", "seeds", "val_acc", "val_acc_ci", "test_acc", "test_acc_ci", "task_memory_bytes",
                  "task_memory_bytes_ci", "memory_ratio", "memory_ratio_ci", "train_time_s", "train_time_s_ci",
                  "epochs_run", "epochs_run_ci", *[c for m in MEM for c in (m, f"{m}_ci")], "memory_pct",
                  "hit_cap_improving"]
TRIAL_COLUMNS = ["number", "state", "val_acc", "task_memory_bytes", "method", "groups", "reduction", "placement",
                 "task_bn", "bits", "prune_amount", "lr", "memory_ratio", "adapter_memory_bytes", "sparsity",
                 "train_time_s", "epochs_run", "hit_cap_improving", "fail_reason", "adapter", "anchor", "duration_s"]
# (target, method, precision, seed, val, test, task bytes, train s, epoch s, time to 95 s, epochs run,
#  hit the cap still improving)
RUNS = [
    ("tA", "bn", "binary", 0, 0.87, 0.82, 768.0, 2.9, 0.6, 1.5, 9, False),   # 768 / 10240 = 7.5%
    ("tA", "bn", "binary", 1, 0.88, 0.84, 768.0, 3.1, 0.6, 1.5, 11, False),  # val mean .875
    ("tA", "full", "binary", 0, 0.89, 0.90, BASE, 11.9, 2.0, 4.0, 12, False),
    ("tA", "full", "binary", 1, 0.91, 0.92, BASE, 12.1, 2.4, 6.0, 14, False),
    ("tA", "full", "fp32", 0, 0.93, 0.94, FP32, 20.0, 4.0, 8.0, 10, False),
    ("tA", "head", "binary", 0, 0.71, 0.69, 512.0, 1.8, 0.4, 1.0, 9, False),
    ("tA", "head", "binary", 1, 0.72, 0.70, 512.0, 2.0, 0.4, 1.0, 10, False),
    ("tA", "head", "binary", 2, 0.73, 0.71, 512.0, 2.2, 0.4, 1.0, 11, False),
    ("tA", "parallel", "binary", 0, 0.85, 0.95, 1126.4, 3.0, 0.55, 1.0, 8, False),  # best test, but val .85 < .875
    ("tA", "serial", "binary", 0, 0.8125, 0.86, 1024.0, 5.0, 1.1, 1.5, 11, False),
    ("tA", "serial", "binary", 1, 0.9375, 0.88, 1024.0, 5.8, 1.1, 2.5, 15, True),  # val mean .875 (exact in binary)
    ("tB", "full", "binary", 0, 0.78, 0.80, BASE, 8.0, 1.6, 0.0, 9, False),       # never reached 95%: t95 = 0
    ("tB", "full", "fp32", 0, 0.81, 0.82, FP32, 16.0, 3.2, 6.0, 10, False),
    ("tB", "head", "binary", 0, 0.58, 0.60, 512.0, 1.2, 0.24, 0.5, 15, True),
    ("tB", "parallel", "binary", 0, 0.70, 0.75, 1024.0, 6.0, 1.2, 3.0, 12, False),
    ("tB", "serial", "binary", 0, 0.74, 0.77, 1536.0, 2.0, 0.4, 1.0, 7, False),   # best val, but 15% > budget
]
LR = {("tA", "bn", "binary"): 0.01, ("tA", "full", "binary"): 0.005, ("tA", "full", "fp32"): 0.002,
      ("tA", "head", "binary"): 0.01,
      ("tA", "serial", "binary"): 0.005, ("tA", "parallel", "binary"): 0.01,
      ("tB", "full", "binary"): 0.005, ("tB", "full", "fp32"): 0.002, ("tB", "head", "binary"): 0.01,
      ("tB", "serial", "binary"): 0.01, ("tB", "parallel", "binary"): 0.005}
# mem_*_bytes (weights, scales, BN, head, masks) per configuration, as in the docstring; other rows NaN
BREAKDOWN = {("tA", "head", "binary"): (0.0, 0.0, 0.0, 512.0, 0.0),
             ("tA", "bn", "binary"): (0.0, 0.0, 256.0, 512.0, 0.0),
             ("tA", "serial", "binary"): (480.0, 32.0, 0.0, 512.0, 0.0)}
BN_BITS = {("tA", "bn", "binary"): 16}  # every other row: 32
# One row per Pareto trial, as the sweep stage writes it after retraining each on every seed:
# (number, method, memory_ratio, trial val, seeds, val, val_ci, test, test_ci, train s, train_ci, epochs, epochs_ci,
#  runs that hit the cap still improving). Means and half-widths by hand from the per-seed values above:
PARETO = {
    "tA": [
        # val (.79 + .81) / 2 = .80, half 12.7062 * .02 / 2 = .127062; test (.90 + .91) / 2 = .905, half
        # 12.7062 * .01 / 2 = .063531; train 1.0/1.2 -> 1.1 ± 12.7062 * .2 / 2; epochs 10/12 -> 11 ± 12.7062
        (4, "serial", 0.03, 0.80, 2, 0.80, T1 * 0.02 / 2, 0.905, T1 * 0.01 / 2, 1.1, T1 * 0.2 / 2, 11.0, T1 * 2 / 2, 0),
        # val (.868 + .876) / 2 = .872, half 12.7062 * .008 / 2 = .0508248; test (.84 + .86) / 2 = .85 ± .127062
        (2, "parallel", 0.08, 0.87, 2, 0.872, T1 * 0.008 / 2, 0.85, T1 * 0.02 / 2, 2.0, 0.0, 9.0, 0.0, 0),
        # val (.87 + .88) / 2 = .875 ± .063531; test (.885 + .895) / 2 = .89 ± .063531
        (9, "serial", 0.09, 0.88, 2, 0.875, T1 * 0.01 / 2, 0.89, T1 * 0.01 / 2, 2.5, 0.0, 10.0, 0.0, 0),
        # val (.95 + .97) / 2 = .96 ± .127062; test (.89 + .90) / 2 = .895 ± .063531; epochs 14/15 -> 14.5 ±
        # 12.7062 * 1 / 2; seed 1 ran to the cap still improving
        # (its own configuration and breakdown: see the docstring)
        (5, "parallel", 0.20, 0.95, 2, 0.96, T1 * 0.02 / 2, 0.895, T1 * 0.01 / 2, 4.0, 0.0, 14.5, T1 * 1 / 2, 1,
         {"groups": 4, "placement": "all", "task_bn": True, "bits": 1, "prune_amount": 0.5,
          "mem": (256.0, 256.0, 512.0, 512.0, 512.0)}),
    ],
    "tB": [  # one seed: every half-width unknown
        (0, "serial", 0.13, 0.75, 1, 0.755, NAN, 0.785, NAN, 2.0, NAN, 8.0, NAN, 0),
        (1, "parallel", 0.30, 0.77, 1, 0.765, NAN, 0.795, NAN, 5.0, NAN, 12.0, NAN, 0,
         {"mem": (2400.0, 160.0, 0.0, 512.0, 0.0)}),
    ],
}
SWEEP_JSON = {  # hypervolume by hand (ref accuracy 0, memory 100%), strips in memory %, height = best so far
    # val (chooses): (3..8) x .80 + (8..9) x .872 + (9..20) x .875 + (20..100) x .96
    #              = 4.0 + .872 + 9.625 + 76.8 = 91.297
    # test (reported only): .905 (trial 4) stays the best so far everywhere: (100 - 3) x .905 = 87.785
    "tA": {"complete": 9, "failed": 1, "fail_number": 7, "pareto_size": 4, "seeds": 2, "hypervolume": 91.297,
           "hypervolume_test": 87.785, "memory_pct_min": 3.0, "memory_pct_max": 20.0, "hit_cap_improving": 1,
           "trials_hit_cap_improving": 2, "wall_time_s": 40.0},  # trials 3 and 6 (dominated) stopped at their cap
    # val: (13..30) x .755 + (30..100) x .765 = 12.835 + 53.55 = 66.385
    # test: (13..30) x .785 + (30..100) x .795 = 13.345 + 55.65 = 68.995
    "tB": {"complete": 4, "failed": 0, "fail_number": None, "pareto_size": 2, "seeds": 1, "hypervolume": 66.385,
           "hypervolume_test": 68.995, "memory_pct_min": 13.0, "memory_pct_max": 30.0, "hit_cap_improving": 0,
           "trials_hit_cap_improving": 0, "wall_time_s": 35.5},
}
# stage wall times: prepare 1.0 + 1.5 + 2.5 = 5.0; pretrain 30.0 + 25.0 = 55.0;
# transfer tA 12.5 + 20.5 + 2.5 + 6.5 + 3.5 = 45.5, bn tA 4.0; transfer tB 9.0 + 17.0 + 1.5 + 2.5 + 7.0 = 37.0;
# sweep 40.0 + 35.5 = 75.5; total 5.0 + 55.0 + 45.5 + 4.0 + 37.0 + 75.5 = 222.0
PREPARE = {"src": (1.0, "00112233445566aa"), "tA": (1.5, "aabbccddeeff0011"), "tB": (2.5, "0123456789abcdef")}
PRETRAIN = {"binary": (BASE, 30.0), "fp32": (FP32, 25.0)}
TRANSFER_WALL = {("tA", "bn"): 4.0, ("tA", "full"): 12.5, ("tA", "full_fp32"): 20.5, ("tA", "head"): 2.5,
                 ("tA", "serial"): 6.5,
                 ("tA", "parallel"): 3.5, ("tB", "full"): 9.0, ("tB", "full_fp32"): 17.0, ("tB", "head"): 1.5,
                 ("tB", "serial"): 2.5, ("tB", "parallel"): 7.0}
STAGE_TIMES = {"prepare@src": 1.0, "prepare@tA": 1.5, "prepare@tB": 2.5, "pretrain@binary": 30.0,
               "pretrain@fp32": 25.0, "sweep@tA": 40.0, "sweep@tB": 35.5,
               # named as `dvc dag` names the stages that wrote them
               "baseline@tA-full": 12.5, "transfer_fp32@tA": 20.5, "baseline@tA-head": 2.5, "transfer@tA-serial": 6.5,
               "transfer@tA-parallel": 3.5, "baseline@tB-full": 9.0, "transfer_fp32@tB": 17.0, "baseline@tB-head": 1.5,
               "transfer@tB-serial": 2.5, "transfer@tB-parallel": 7.0, "bn@tA": 4.0}
TOTAL_WALL = 222.0
DPI = 110  # params.yaml's report.dpi


def _row(target, method, precision, seed, val, test, task, train, epoch, t95, epochs_run=10, cap=False,
         lr=0.005, mem=None, bn_bits=32) -> dict:
    adapter = method in ("serial", "parallel")
    keys = {"target": target, "method": method, "precision": precision,
            "adapter_type": method if adapter else "none",
            **(ADAPTER if adapter else {**NONE, "head_bits": HEAD_BITS[method]}),
            "task_bn": False if adapter else method in ("full", "bn"), "bn_bits": bn_bits, "seed": seed}
    return {**keys, "sparsity": 0.0, "val_acc": val, "test_acc": test, "task_memory_bytes": task,
            "adapter_memory_bytes": 256.0 if adapter else 0.0, "base_memory_bytes": BASE,
            "memory_ratio": task / BASE, **dict(zip(MEM, mem or [NAN] * len(MEM))), "train_time_s": train,
            "prefix_time_s": 0.2 if adapter else 0.5 if method == "head" else 0.0,
            "epoch_time_s": epoch, "time_to_95_s": t95, "trainable_params": 1234, "lr": lr,
            "epochs_run": epochs_run, "max_epochs": MAX_EPOCHS, "stopped_early": epochs_run < MAX_EPOCHS,
            "hit_cap_improving": cap, "packed_payload_bytes": int(task), "lr_grid": LR_GRID}


def _results(runs, breakdown=None, bn_bits=None) -> pd.DataFrame:
    """Rows as in RUNS; `breakdown` and `bn_bits` keyed by (target, method, precision) (default: the main
    fixture's for the main fixture's runs, none for hand-built ones)."""
    breakdown = BREAKDOWN if breakdown is None else breakdown
    bn_bits = BN_BITS if bn_bits is None else bn_bits
    return pd.DataFrame([_row(*r, lr=LR.get(r[:3], 0.005), mem=breakdown.get(r[:3]), bn_bits=bn_bits.get(r[:3], 32))
                         for r in runs], columns=COLUMNS)


def _pareto_point(n, m, r, tv, s, v, vc, t, tc, tr, trc, e, ec, cap, extra=None) -> dict:
    """One pareto.csv row; `extra` overrides the trial's configuration (groups 8, r1, last:2, 4-bit, no task BN,
    unpruned) and gives its breakdown `mem` (the same on every seed: interval 0, or NaN for one seed)."""
    extra = dict(extra or {})
    mem = extra.pop("mem", None)
    row = {"number": n, "method": m, "groups": 8, "reduction": 1, "placement": "last:2", "task_bn": False, "bits": 4,
           "prune_amount": 0.0, "lr": 0.005, **extra, "trial_val_acc": tv, "seeds": s, "val_acc": v, "val_acc_ci": vc,
           "test_acc": t, "test_acc_ci": tc, "task_memory_bytes": r * BASE, "task_memory_bytes_ci": 0.0 if s > 1 else NAN,
           "memory_ratio": r, "memory_ratio_ci": 0.0 if s > 1 else NAN, "train_time_s": tr, "train_time_s_ci": trc,
           "epochs_run": e, "epochs_run_ci": ec, "memory_pct": 100 * r, "hit_cap_improving": cap}
    for k, b in zip(MEM, mem or [NAN] * len(MEM)):
        row[k], row[f"{k}_ci"] = b, (0.0 if s > 1 and mem else NAN)
    return row


def _pareto_frame(points) -> pd.DataFrame:
    return pd.DataFrame([_pareto_point(*p) for p in points], columns=PARETO_COLUMNS)


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write_results_set(reports: Path) -> Path:
    """A realistic reports/ folder, written by hand (no training)."""
    metrics = reports / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    rows = _results(RUNS)
    rows.sort_values(["target", "method", "precision", "seed"], kind="stable").to_csv(reports / "results.csv", index=False)
    for name, (wall, sha) in PREPARE.items():
        _json(metrics / f"prepare_{name}.json", {"train_images": 140, "val_images": 30, "test_images": 30,
                                                 "num_classes": 5, "train_sha256": sha, "wall_time_s": wall})
    for precision, (mem, wall) in PRETRAIN.items():
        _json(metrics / f"pretrain_{precision}.json", {
            "val_acc": 0.95, "test_acc": 0.94, "memory_bytes": mem, "packed_payload_bytes": int(mem), "params": 20000,
            "epochs_run": 8, "train_time_s": wall - 2.0, "epoch_time_s": (wall - 2.0) / 8, "time_to_95_s": 5.0,
            "dataset_sha256": "00112233445566aa", "wall_time_s": wall})
    for (target, var), wall in TRANSFER_WALL.items():
        method, precision = ("full", "fp32") if var == "full_fp32" else (var, "binary")
        runs = [r for r in RUNS if r[0] == target and r[1] == method and r[2] == precision]
        lr = LR[(target, method, precision)]
        _json(metrics / f"transfer_{target}_{var}.json", {
            "val_acc": sum(r[4] for r in runs) / len(runs), "test_acc": sum(r[5] for r in runs) / len(runs),
            "seeds": len(runs), "lr": lr, "hit_cap_improving": sum(r[11] for r in runs), "wall_time_s": wall})
        curve = [{"seed": r[3], "lr": lr, "epoch": e, "elapsed_train_s": round(r[7] * (e + 1) / 3, 4),
                  "val_acc": round(r[4] * (0.7 + 0.1 * e), 4)} for r in runs for e in range(3)]
        pd.DataFrame(curve).to_csv(metrics / f"transfer_{target}_{var}_curve.csv", index=False)
    for target, points in PARETO.items():
        folder = reports / "sweep" / target
        folder.mkdir(parents=True, exist_ok=True)
        _pareto_frame(points).to_csv(folder / "pareto.csv", index=False)
        s = SWEEP_JSON[target]
        on_front = {p[0]: _pareto_point(*p) for p in points}
        trials = []
        for n in range(s["complete"] + s["failed"]):
            if n in on_front:  # the trial's own configuration and single-seed val accuracy
                front = on_front[n]
                cfg = {k: front[k] for k in ("method", "groups", "reduction", "placement", "task_bn", "bits",
                                             "prune_amount", "lr")}
                r, v = front["memory_ratio"], front["trial_val_acc"]
            else:  # dominated trials: more memory, less val accuracy
                cfg = {"method": "serial" if n % 2 else "parallel", "groups": 8, "reduction": 1, "placement": "last:2",
                       "task_bn": False, "bits": 4, "prune_amount": 0.0, "lr": 0.005}
                r, v = 0.25 + 0.01 * n, 0.5 + 0.01 * n
            failed = n == s["fail_number"]
            trials.append({"number": n, "state": "FAIL" if failed else "COMPLETE",
                           "val_acc": None if failed else v, "task_memory_bytes": None if failed else r * BASE, **cfg,
                           "memory_ratio": None if failed else r, "adapter_memory_bytes": None if failed else 100.0,
                           "sparsity": 0.0, "train_time_s": 1.0, "epochs_run": 3,
                           "hit_cap_improving": target == "tA" and n in (3, 6),
                           "fail_reason": "TrainingDiverged" if failed else None,
                           "adapter": f"reports/sweep/{target}/trials/{n}/adapter.safetensors", "anchor": n < 4,
                           "duration_s": 2.0})
        pd.DataFrame(trials, columns=TRIAL_COLUMNS).to_csv(folder / "trials.csv", index=False)
        _json(metrics / f"sweep_{target}.json", {
            "study": f"{target}-0123abcd", **{k: s[k] for k in (
                "complete", "failed", "pareto_size", "seeds", "hypervolume", "hypervolume_test")},
            "reference_point": {"accuracy": 0.0, "memory_pct": 100.0},
            **{k: s[k] for k in ("memory_pct_min", "memory_pct_max", "hit_cap_improving", "trials_hit_cap_improving",
                                 "wall_time_s")}})
    return reports


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_fixture_hypervolume_is_the_val_one():
    """An independent path to SWEEP_JSON's hand numbers: the sweep stage's own hypervolume function on the
    fixture's Pareto points (val means -> "hypervolume", test means -> "hypervolume_test")."""
    from pipeline.train.pareto import hypervolume

    for target, points in PARETO.items():
        for split, key in ((5, "hypervolume"), (7, "hypervolume_test")):
            got = hypervolume([(p[split], 100 * p[2]) for p in points], 0.0, 100.0)
            assert got == pytest.approx(SWEEP_JSON[target][key], abs=1e-9), (target, key)


# ------------------------------------------------------------------------------- markdown helpers


def section(md: str, heading: str) -> str:
    """The text under the `## heading...` line, up to the next `## `."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("## " + heading))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start + 1:end])


def table(text: str) -> list[dict[str, str]]:
    """The first pipe table in `text` as dicts of stripped cells."""
    rows = [l for l in text.splitlines() if l.startswith("|")]
    assert len(rows) >= 2, f"no table in:\n{text}"
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert set(rows[1].replace("|", "").replace(":", "").replace("-", "").strip()) <= {""}
    return [dict(zip(header, (c.strip() for c in r.strip("|").split("|")))) for r in rows[2:]]


def bullets(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("- ")]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------- intervals, by hand


def test_mean_ci_matches_hand_t_intervals():
    # two seeds .89/.91: mean .90, half 12.7062 * .02 / 2 = .127062
    mean, half = mean_ci([0.89, 0.91])
    assert (mean, half) == (pytest.approx(0.90, abs=1e-12), pytest.approx(T1 * 0.02 / 2, abs=1e-5))
    # three seeds .69/.70/.71: mean .70, sd .01, half 4.3027 * .01 / sqrt(3) = .024841
    mean, half = mean_ci([0.69, 0.70, 0.71])
    assert (mean, half) == (pytest.approx(0.70, abs=1e-12), pytest.approx(T2 * 0.01 / math.sqrt(3), abs=1e-5))
    # one seed: the width is unknown, not zero
    mean, half = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)
    # touching intervals (gap .5 = .25 + .25, exact in binary) overlap; any unknown width never separates
    assert not distinguishable((0.5, 0.25), (1.0, 0.25))
    assert distinguishable((0.5, 0.25), (1.0, 0.2))
    assert not distinguishable((0.5, NAN), (1.0, 0.0))
    # the printed forms: a fraction in % with the half-width in points, seconds with theirs
    assert ci_pct(0.7, NAN) == "70.0% (1 seed)"
    assert ci_pct(0.965, 0.008) == "96.5% ± 0.8"
    assert ci_num(12.0, 25.4124) == "12.0 ± 25.4"
    assert ci_num(12.0, NAN) == "12.0" and ci_num(12.0, 0.0) == "12.0"


# ------------------------------------------------------------------------------- the stage, once


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    reports = write_results_set(tmp / "reports")
    params_file = tmp / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    params = parse_params(yaml.safe_load(params_file.read_text()))
    here = os.getcwd()
    os.chdir(tmp)
    try:
        out = report.run(params, params_file, reports=reports)
    finally:
        os.chdir(here)
    assert out == reports / "report.md"
    return {"tmp": tmp, "reports": reports, "md": out.read_text(), "params_file": params_file}


def test_intro_states_base_memory(rendered):
    # 10240 bytes / 1024 = 10.00 KiB
    assert "as % of the binary base (10.00 KiB)." in rendered["md"]


def test_protocol_lists_seeds_lr_grid_head_bits_sweeps_and_flagged_runs(rendered):
    md = rendered["md"]
    assert md.count("\n## Protocol\n") == 1
    assert md.index("## Protocol") < md.index("## 1. Accuracy")
    # seeds in results.csv: 0, 1 (full, bn, serial) and 2 (tA head); grid "0.002 0.005 0.01" on every row;
    # new heads (head, bn, serial, parallel) all 8-bit (full's 32 is not a new head);
    # sweeps: tA 9 complete trials, 4 Pareto points; tB 4 trials, 2 points;
    # lr chosen at an end of the grid (.002 or .01; the middle .005 is not): tA bn .01, tA full fp32 .002,
    #   tA head .01, tA parallel .01, tB full fp32 .002, tB head .01, tB serial .01 (in the runs table's order)
    # flagged: results rows tA serial seed 1 + tB head seed 0 = 2, plus pareto.csv tA trial 5's 1 = 3
    assert bullets(section(md, "Protocol")) == [
        "- Seeds: 0, 1, 2; every number is the mean over seeds ± the 95% Student t half-width in points. "
        "Intervals that overlap are called not distinguishable.",
        "- Every arm (full binary, full fp32, head, BN thresholds, serial, parallel): lr chosen on val from "
        "{0.002 0.005 0.01} with the first of the seeds, the other seeds repeat it; up to the cap, early stopping on val "
        "accuracy, best-val weights restored.",
        "- Every new head (head, BN thresholds, serial, parallel) is stored at 8-bit weights (bias float32); full "
        "finetuning keeps its float head in its whole copy.",
        "- Sweep on tA: 9 trials (own lr dimension, single seed, val only; the smallest and largest configuration "
        "of each adapter type first); its 4 Pareto points retrained on every seed at the arms' budget; trials "
        "stopped at their cap still improving (single-seed scores that understate them): 2.",
        "- Sweep on tB: 4 trials (own lr dimension, single seed, val only; the smallest and largest configuration "
        "of each adapter type first); its 2 Pareto points retrained on every seed at the arms' budget.",
        "- Chosen lr at an end of its grid (the best lr may lie outside it): tA/bn, tA/full (fp32), tA/head, "
        "tA/parallel, tB/full (fp32), tB/head, tB/serial.",
        "- Runs that hit their epoch cap while val accuracy was still rising: 3 (flagged in the tables: their "
        "numbers are not converged).",
    ]


def test_question1_best_adapter_chosen_on_val_with_gaps(rendered):
    text = section(rendered["md"], "1. Accuracy")
    assert rendered["md"].count(
        "## 1. Accuracy: the best adapter at <= 12% task memory vs standard transfer learning\n") == 1
    # tA candidates <= 12%: transfer serial (.10, val mean (.8125 + .9375) / 2 = .875), transfer parallel
    # (.11, val .85, test .95 = best test), sweep trials 4 (.03, val .80), 2 (.08, val .872), 9 (.09, val .875);
    # trial 5 (.20, val .96) is over budget. Best val .875: trial 9 and transfer serial tie -> smaller .09.
    # Its test .89 ± .063531 -> "89.0% ± 6.4".
    # vs binary full: test (.90 + .92) / 2 = .91 ± 12.7062 * .02 / 2 = .127062 -> "91.0% ± 12.7";
    #   .89 - .91 = -2.0 pts; |gap| .02 < .0635 + .1271 -> not distinguishable
    # vs fp32 full: .94, one seed -> "94.0% (1 seed)"; -5.0 pts; unknown width -> not distinguishable
    # vs head: (.69 + .70 + .71) / 3 = .70 ± 4.3027 * .01 / sqrt(3) = .024841 -> "70.0% ± 2.5";
    #   +19.0 pts; .19 > .0635 + .0248 = .0884 -> distinguishable (no suffix)
    # BN thresholds + head (7.5%, val .875) would tie and win on memory, but question 1 asks for adapters only.
    # vs BN: test (.82 + .84) / 2 = .83 ± .127062 -> "83.0% ± 12.7"; +6.0 pts; .06 < .0635 + .1271 -> not
    #   distinguishable; its memory 768 / 10240 = 7.5% of the base
    # tB candidates <= 12%: transfer parallel only (.10, val .70; serial .15 and trials .13/.30 are over
    # budget). Test .75 (1 seed): vs .80 -> -5.0, vs .82 -> -7.0, vs .60 -> +15.0, all one seed ->
    # not distinguishable. tB has no BN run: its line stops after head, its table cells are n/a.
    assert bullets(text) == [
        "- **tA**: the best adapter at <= 12% task memory (serial, sweep trial 9, 9.0% of the base, chosen on val) "
        "reaches 89.0% ± 6.4 test accuracy: -2.0 pts, not distinguishable vs binary full finetune (91.0% ± 12.7), "
        "-5.0 pts, not distinguishable vs fp32 full finetune (94.0% (1 seed)), +19.0 pts vs head only "
        "(70.0% ± 2.5), +6.0 pts, not distinguishable vs BN thresholds + head (83.0% ± 12.7, 7.5% of the base).",
        "- **tB**: the best adapter at <= 12% task memory (parallel, transfer stage, 10.0% of the base, chosen on "
        "val) reaches 75.0% (1 seed) test accuracy: -5.0 pts, not distinguishable vs binary full finetune "
        "(80.0% (1 seed)), -7.0 pts, not distinguishable vs fp32 full finetune (82.0% (1 seed)), +15.0 pts, "
        "not distinguishable vs head only (60.0% (1 seed)).",
    ]
    assert table(text) == [
        {"target": "tA", "best adapter <= 12% (on val)": "serial (sweep trial 9, 9.0%)",
         "adapter test acc": "89.0% ± 6.4", "binary full": "91.0% ± 12.7",
         "gap vs binary full": "-2.0 pts, not distinguishable", "fp32 full": "94.0% (1 seed)",
         "gap vs fp32 full": "-5.0 pts, not distinguishable", "head only": "70.0% ± 2.5", "gap vs head": "+19.0 pts",
         "BN thresholds + head": "83.0% ± 12.7", "gap vs BN": "+6.0 pts, not distinguishable"},
        {"target": "tB", "best adapter <= 12% (on val)": "parallel (transfer stage, 10.0%)",
         "adapter test acc": "75.0% (1 seed)", "binary full": "80.0% (1 seed)",
         "gap vs binary full": "-5.0 pts, not distinguishable", "fp32 full": "82.0% (1 seed)",
         "gap vs fp32 full": "-7.0 pts, not distinguishable", "head only": "60.0% (1 seed)",
         "gap vs head": "+15.0 pts, not distinguishable", "BN thresholds + head": "n/a", "gap vs BN": "n/a"},
    ]


def test_question2_time_ratios(rendered):
    text = section(rendered["md"], "2. Training time")
    # tA binary full means: train (11.9 + 12.1) / 2 = 12.0 s ± 12.7062 * .2 / 2 = 1.27062 -> "12.0 ± 1.3";
    #   epoch (2.0 + 2.4) / 2 = 2.2 s, t95 (4 + 6) / 2 = 5.0 s, epochs run (12 + 14) / 2 = 13.0
    # serial: train (5.0 + 5.8) / 2 = 5.4 ± 12.7062 * .8 / 2 = 5.08248 -> "5.4 ± 5.1" -> 5.4 / 12 = 0.45x;
    #   t95 (1.5 + 2.5) / 2 = 2.0 -> 2 / 5 = 0.40x; epoch 1.1 / 2.2 = 0.50x; epochs (11 + 15) / 2 = 13.0;
    #   |12.0 - 5.4| = 6.6 > 1.27062 + 5.08248 = 6.3531 -> distinguishable (no suffix)
    # parallel: 3 / 12 = 0.25x; t95 1 / 5 = 0.20x; epoch .55 / 2.2 = 0.25x; one seed -> not distinguishable
    # head (table only): (1.8 + 2.0 + 2.2) / 3 = 2.0 ± 4.3027 * .2 / sqrt(3) = .4968 -> "2.0 ± 0.5";
    #   2 / 12 = 0.1667 -> 0.17x; t95 1 / 5 = 0.20x; epoch .4 / 2.2 = 0.1818 -> 0.18x; epochs (9+10+11)/3 = 10.0
    # bn (table only, after head): (2.9 + 3.1) / 2 = 3.0 ± 12.7062 * .2 / 2 = 1.27062 -> "3.0 ± 1.3";
    #   3 / 12 = 0.25x; t95 1.5 / 5 = 0.30x; epoch .6 / 2.2 = 0.2727 -> 0.27x; epochs (9 + 11) / 2 = 10.0
    # tB binary full (one seed): train 8.0, epoch 1.6, t95 0 (never reached) -> every time-to-95 ratio n/a
    # serial: 2 / 8 = 0.25x, epoch .4 / 1.6 = 0.25x; parallel: 6 / 8 = 0.75x, epoch 1.2 / 1.6 = 0.75x;
    # head: 1.2 / 8 = 0.15x, epoch .24 / 1.6 = 0.15x; all one seed -> not distinguishable
    assert bullets(text) == [
        "- **tA**, serial: 0.45x the training seconds of binary full finetune (5.4 ± 5.1 s vs 12.0 ± 1.3 s), "
        "0.40x its time to 95% of final val accuracy, 0.50x its epoch time.",
        "- **tA**, parallel: 0.25x the training seconds of binary full finetune (3.0 s vs 12.0 ± 1.3 s, not "
        "distinguishable), 0.20x its time to 95% of final val accuracy, 0.25x its epoch time.",
        "- **tB**, serial: 0.25x the training seconds of binary full finetune (2.0 s vs 8.0 s, not "
        "distinguishable), n/a its time to 95% of final val accuracy, 0.25x its epoch time.",
        "- **tB**, parallel: 0.75x the training seconds of binary full finetune (6.0 s vs 8.0 s, not "
        "distinguishable), n/a its time to 95% of final val accuracy, 0.75x its epoch time.",
    ]
    got = [tuple(r.values()) for r in table(text)]
    assert got == [
        ("tA", "head", "2.0 ± 0.5", "12.0 ± 1.3", "0.17x", "0.20x", "0.18x", "10.0 vs 13.0"),
        ("tA", "bn", "3.0 ± 1.3", "12.0 ± 1.3", "0.25x", "0.30x", "0.27x", "10.0 vs 13.0"),
        ("tA", "serial", "5.4 ± 5.1", "12.0 ± 1.3", "0.45x", "0.40x", "0.50x", "13.0 vs 13.0"),
        ("tA", "parallel", "3.0", "12.0 ± 1.3", "0.25x", "0.20x", "0.25x", "8.0 vs 13.0"),
        ("tB", "head", "1.2", "8.0", "0.15x", "n/a", "0.15x", "15.0 vs 9.0"),
        ("tB", "serial", "2.0", "8.0", "0.25x", "n/a", "0.25x", "7.0 vs 9.0"),
        ("tB", "parallel", "6.0", "8.0", "0.75x", "n/a", "0.75x", "12.0 vs 9.0"),
    ]
    assert list(table(text)[0]) == ["target", "method", "train s", "binary full train s", "train time ratio",
                                    "time-to-95% ratio", "epoch time ratio", "epochs run"]


def test_question3_smallest_within_points_on_val_and_band(rendered):
    text = section(rendered["md"], "3. Size")
    # Every task state counts here (head, bn, serial, parallel; question 1 counted adapters only).
    # tA binary full: val (.89 + .91) / 2 = .90 ± .127062 -> "90.0% ± 12.7"; test .91 ± .127062.
    # Within 1 pt on val means val >= .89: only trial 5 (.96, 20%) -> 20.00%, above 7%-12%. Its val .96 ±
    #   .127062 -> "96.0% ± 12.7"; test .895 ± .063531 -> "89.5% ± 6.4"; .895 - .91 = -1.5 pts, overlapping.
    #   Its configuration from pareto.csv: parallel, groups 4, reduction 1, placement all, bits 1, task BN,
    #   pruned 0.5; breakdown 256/256/512/512/512 bytes -> 0.25/0.25/0.50/0.50/0.50 KiB.
    # Within 3 pts: val >= .87: bn (.875, 7.5%), trials 2 (.872, 8%), 9 (.875, 9%), 5, transfer serial
    #   (.875, 10%) -> bn at 768 / 10240 = 7.50%, inside the band (head, val .72, is never close).
    #   bn: val .875 ± 12.7062 * .01 / 2 = .063531 -> "87.5% ± 6.4"; test .83 ± .127062 -> "83.0% ± 12.7";
    #   .83 - .91 = -8.0 pts, .08 < .127062 + .127062 -> overlapping. Breakdown 0/0/256/512/0 bytes ->
    #   BN 256 / 1024 = 0.25, head 512 / 1024 = 0.50 KiB; BN stored at 16 bits.
    # (On test, trial 4 at 3% would have won both: test .905 >= .90 and >= .88; its val .80 is below .87.)
    # tB binary full val .78 (1 seed). Within 1 pt (>= .77): none (trial 1 .765, trial 0 .755, serial .74,
    #   parallel .70, head .58) -> the most accurate task state on val is trial 1 (parallel g8 r1 last:2 4-bit,
    #   30.00%; breakdown 2400/160/0/512/0 bytes -> 2400 / 1024 = 2.34375 -> 2.34, 160 / 1024 = .15625 -> 0.16,
    #   head 0.50 KiB): val .765 -> -1.5 pts vs .78; test .795 vs .80 -> -0.5 pts, one seed -> not
    #   distinguishable. Within 3 pts (>= .75): trial 0 (.755, 13%) and trial 1 -> 13.00%, above the band;
    #   test .785 vs .80 -> -1.5 pts, one seed -> not distinguishable; trial 0 has no breakdown columns -> n/a.
    bd5 = "weights 0.25, scales 0.25, BN 0.50, head 0.50, masks 0.50 KiB"
    bd_bn = "weights 0.00, scales 0.00, BN 0.25, head 0.50, masks 0.00 KiB"
    bd1 = "weights 2.34, scales 0.16, BN 0.00, head 0.50, masks 0.00 KiB"
    assert bullets(text) == [
        "- **tA**: the smallest task state within 1 point of binary full finetune (on val: 96.0% ± 12.7 vs "
        "90.0% ± 12.7) is 20.00% of the base: parallel g4 r1 all 1-bit +task BN pruned 0.5 (sweep trial 5, "
        f"{bd5}). Test 89.5% ± 6.4 vs 91.0% ± 12.7 for full finetune (-1.5 pts, not distinguishable); above the "
        "prior study's 7%-12% band.",
        "- **tA**: the smallest task state within 3 points of binary full finetune (on val: 87.5% ± 6.4 vs "
        "90.0% ± 12.7) is 7.50% of the base: BN thresholds + head, BN 16-bit (transfer stage, "
        f"{bd_bn}). Test 83.0% ± 12.7 vs 91.0% ± 12.7 for full finetune (-8.0 pts, not distinguishable); inside "
        "the prior study's 7%-12% band.",
        "- **tB**: no task state is within 1 point of binary full finetune on val (78.0% (1 seed)). The most "
        "accurate task state tried is parallel g8 r1 last:2 4-bit (sweep trial 1, 30.00% of the base; "
        f"{bd1}): val 76.5% (1 seed), -1.5 pts vs full; test 79.5% (1 seed), -0.5 pts, not distinguishable vs "
        "full's 80.0% (1 seed).",
        "- **tB**: the smallest task state within 3 points of binary full finetune (on val: 75.5% (1 seed) vs "
        "78.0% (1 seed)) is 13.00% of the base: serial g8 r1 last:2 4-bit (sweep trial 0, n/a). Test 78.5% "
        "(1 seed) vs 80.0% (1 seed) for full finetune (-1.5 pts, not distinguishable); above the prior study's "
        "7%-12% band.",
    ]
    assert table(text) == [
        {"target": "tA", "binary full (val)": "90.0% ± 12.7",
         "smallest within 1 pt (on val)": "parallel g4 r1 all 1-bit +task BN pruned 0.5 (sweep trial 5)",
         "memory (1 pt)": "20.00%", "test acc (1 pt)": "89.5% ± 6.4", "breakdown (1 pt)": bd5,
         "smallest within 3 pt (on val)": "BN thresholds + head, BN 16-bit (transfer stage)",
         "memory (3 pt)": "7.50%", "test acc (3 pt)": "83.0% ± 12.7", "breakdown (3 pt)": bd_bn},
        {"target": "tB", "binary full (val)": "78.0% (1 seed)",
         "smallest within 1 pt (on val)": "none", "memory (1 pt)": "n/a", "test acc (1 pt)": "n/a",
         "breakdown (1 pt)": "n/a",
         "smallest within 3 pt (on val)": "serial g8 r1 last:2 4-bit (sweep trial 0)",
         "memory (3 pt)": "13.00%", "test acc (3 pt)": "78.5% (1 seed)", "breakdown (3 pt)": "n/a"},
    ]


def test_runs_table_mean_and_ci_across_seeds(rendered):
    md = rendered["md"]
    assert md.count("\n## All transfer runs (mean ± 95% interval across seeds)\n") == 1
    rows = table(section(md, "All transfer runs"))
    assert list(rows[0]) == ["target", "method", "precision", "task state", "head bits", "seeds", "val acc",
                             "test acc", "task memory", "of which", "train s", "epochs run", "lr (chosen on val)",
                             "hit cap improving"]
    # tabulate prints all-number columns as numbers: compare those as floats
    numeric = ("head bits", "seeds", "epochs run", "hit cap improving")
    got = [{k: float(v) if k in numeric else v for k, v in r.items()} for r in rows]
    grid = " of 0.002 0.005 0.01"
    na = "n/a"  # rows without breakdown columns

    def row(t, m, p, a, hb, n, val, test, mem, of, train, ep, lr, cap):
        return {"target": t, "method": m, "precision": p, "task state": a, "head bits": hb, "seeds": n,
                "val acc": val, "test acc": test, "task memory": mem, "of which": of, "train s": train,
                "epochs run": ep, "lr (chosen on val)": lr + grid, "hit cap improving": cap}

    # 16 runs -> 11 configurations (tA bn, full binary and serial: 2 seeds, tA head: 3), sorted by target,
    # method, precision. Two seeds a, b: half = 12.7062 * |a - b| / 2; three seeds spaced d: half = 4.3027 * d /
    # sqrt(3). Task state: describe() (full: blank); "of which": the breakdown in KiB (full: blank).
    assert got == [
        # val (.87 + .88) / 2 = 87.5 ± 12.7062 * .01 / 2 = 6.4; test (.82 + .84) / 2 = 83.0 ± 12.7;
        # 768 / 1024 = 0.75 KiB (7.5%) = BN 256 / 1024 = 0.25 + head 512 / 1024 = 0.50;
        # train 3.0 ± 12.7062 * .2 / 2 = 1.3; epochs (9 + 11) / 2 = 10
        row("tA", "bn", "binary", "BN thresholds + head, BN 16-bit", 8, 2, "87.5% ± 6.4", "83.0% ± 12.7",
            "0.75 KiB (7.5%)", "weights 0.00, scales 0.00, BN 0.25, head 0.50, masks 0.00 KiB", "3.0 ± 1.3", 10,
            "0.01", 0),
        # val (.89 + .91) / 2 = 90.0 ± 12.7062 * .02 / 2 = 12.7; test 91.0 ± 12.7; 10240 / 1024 = 10.00 KiB
        # (100.0%); train (11.9 + 12.1) / 2 = 12.0 ± 12.7062 * .2 / 2 = 1.3; epochs (12 + 14) / 2 = 13
        row("tA", "full", "binary", "", 32, 2, "90.0% ± 12.7", "91.0% ± 12.7", "10.00 KiB (100.0%)", "",
            "12.0 ± 1.3", 13, "0.005", 0),
        # 327680 / 1024 = 320.00 KiB, 327680 / 10240 = 32 = 3200.0%; one seed
        row("tA", "full", "fp32", "", 32, 1, "93.0% (1 seed)", "94.0% (1 seed)", "320.00 KiB (3200.0%)", "",
            "20.0", 10, "0.002", 0),
        # val .71/.72/.73 -> 72.0 ± 4.3027 * .01 / sqrt(3) = 2.48 -> 2.5; test .69/.70/.71 -> 70.0 ± 2.5;
        # 512 / 1024 = 0.50 KiB, 512 / 10240 = 5.0%; train 1.8/2.0/2.2 -> 2.0 ± 4.3027 * .2 / sqrt(3) = 0.50;
        # epochs (9 + 10 + 11) / 3 = 10; all of it is the head: 512 / 1024 = 0.50 KiB
        row("tA", "head", "binary", "head only", 8, 3, "72.0% ± 2.5", "70.0% ± 2.5", "0.50 KiB (5.0%)",
            "weights 0.00, scales 0.00, BN 0.00, head 0.50, masks 0.00 KiB", "2.0 ± 0.5", 10, "0.01", 0),
        # one seed; 1126.4 / 1024 = 1.10 KiB, 1126.4 / 10240 = 11.0%; no breakdown columns
        row("tA", "parallel", "binary", "parallel g16 r1 last:3 4-bit", 8, 1, "85.0% (1 seed)", "95.0% (1 seed)",
            "1.10 KiB (11.0%)", na, "3.0", 8, "0.01", 0),
        # val (.8125 + .9375) / 2 = 87.5 ± 12.7062 * .125 / 2 = 79.4; test (.86 + .88) / 2 = 87.0 ± 12.7;
        # 1024 / 1024 = 1.00 KiB (10.0%); train 5.4 ± 12.7062 * .8 / 2 = 5.08 -> 5.1; epochs (11 + 15) / 2 = 13;
        # seed 1 hit the cap still improving -> 1; breakdown 480 / 1024 = .46875 -> 0.47 (weights),
        # 32 / 1024 = .03125 -> 0.03 (scales), head 0.50: 480 + 32 + 512 = 1024 bytes
        row("tA", "serial", "binary", "serial g16 r1 last:3 4-bit", 8, 2, "87.5% ± 79.4", "87.0% ± 12.7",
            "1.00 KiB (10.0%)", "weights 0.47, scales 0.03, BN 0.00, head 0.50, masks 0.00 KiB", "5.4 ± 5.1", 13,
            "0.005", 1),
        # tB: one seed each, no breakdown columns
        row("tB", "full", "binary", "", 32, 1, "78.0% (1 seed)", "80.0% (1 seed)", "10.00 KiB (100.0%)", "", "8.0",
            9, "0.005", 0),
        row("tB", "full", "fp32", "", 32, 1, "81.0% (1 seed)", "82.0% (1 seed)", "320.00 KiB (3200.0%)", "", "16.0",
            10, "0.002", 0),
        row("tB", "head", "binary", "head only", 8, 1, "58.0% (1 seed)", "60.0% (1 seed)", "0.50 KiB (5.0%)", na,
            "1.2", 15, "0.01", 1),
        # 1024 bytes = 1.00 KiB (10.0%)
        row("tB", "parallel", "binary", "parallel g16 r1 last:3 4-bit", 8, 1, "70.0% (1 seed)", "75.0% (1 seed)",
            "1.00 KiB (10.0%)", na, "6.0", 12, "0.005", 0),
        # 1536 / 1024 = 1.50 KiB, 1536 / 10240 = 15.0%
        row("tB", "serial", "binary", "serial g16 r1 last:3 4-bit", 8, 1, "74.0% (1 seed)", "77.0% (1 seed)",
            "1.50 KiB (15.0%)", na, "2.0", 7, "0.01", 0),
    ]


def test_sweep_table(rendered):
    rows = table(section(rendered["md"], "Sweeps"))
    got = [(r["target"], int(r["complete trials"]), int(r["failed"]), int(r["trials at cap, improving"]),
            int(r["Pareto points"]), int(r["seeds each"]),
            r["memory range"], float(r["hypervolume (val)"]), float(r["hypervolume (test, reported only)"]),
            r["reference point"]) for r in rows]
    # hypervolumes as derived beside SWEEP_JSON: val is the one that compares sweeps; memory range = the
    # Pareto points' min-max memory %: tA 3-20, tB 13-30
    assert got == [("tA", 9, 1, 2, 4, 2, "3.0-20.0%", 91.297, 87.785, "{'accuracy': 0.0, 'memory_pct': 100.0}"),
                   ("tB", 4, 0, 0, 2, 1, "13.0-30.0%", 66.385, 68.995, "{'accuracy': 0.0, 'memory_pct': 100.0}")]
    assert "(mean val accuracy over seeds x memory % of base)" in section(rendered["md"], "Sweeps")


def test_stage_wall_times_and_total(rendered):
    text = section(rendered["md"], "Where the time goes")
    got = {r["stage"]: float(r["wall_time_s"]) for r in table(text)}
    assert got == STAGE_TIMES
    # 5.0 (prepare) + 55.0 (pretrain) + 45.5 (transfer tA) + 4.0 (bn tA) + 37.0 (transfer tB) + 75.5 (sweeps)
    # = 222.0
    assert sum(STAGE_TIMES.values()) == TOTAL_WALL
    assert "Total stage wall time: 222 s." in text


def test_stage_names_with_underscores_in_dataset_names():
    from pipeline.report.analysis import dvc_stage

    assert [dvc_stage(s) for s in ("prepare_mnist_0to4", "pretrain_fp32", "sweep_uci_digits", "transfer_mnist_5to9_full",
                                   "transfer_uci_digits_full_fp32", "transfer_my_set_parallel")] == \
        ["prepare@mnist_0to4", "pretrain@fp32", "sweep@uci_digits", "baseline@mnist_5to9-full",
         "transfer_fp32@uci_digits", "transfer@my_set-parallel"]
    # the BN-thresholds arm is its own foreach stage (dvc.yaml `bn`), written as transfer_<target>_bn.json;
    # the head arm stays a baseline
    assert [dvc_stage(s) for s in ("transfer_mnist_5to9_bn", "transfer_my_set_bn", "transfer_uci_digits_head")] == \
        ["bn@mnist_5to9", "bn@my_set", "baseline@uci_digits-head"]


def test_provenance(rendered):
    text = section(rendered["md"], "How this was produced")
    sha = hashlib.sha256(rendered["params_file"].read_bytes()).hexdigest()[:16]
    lines = bullets(text)
    assert f"- params.yaml sha256: `{sha}`" in lines
    for name, (_, train_sha) in PREPARE.items():
        assert f"- dataset {name} (train split sha256): `{train_sha}`" in lines
    assert any(l.startswith("- git commit: `") for l in lines)
    assert any(l.startswith("- report stage seconds: `") for l in lines)


def test_plots_exist_with_expected_pixel_size_and_are_embedded(rendered):
    reports, md = rendered["reports"], rendered["md"]
    # pixels = inches x dpi (110): accuracy_vs_memory 7.5 x 5 -> 825 x 550; training_time and
    # storage_for_tasks 7.5 x 4.5 -> 825 x 495; learning_curves (6 per target = 12) x 4.2 -> 1320 x 462;
    # the sweep figures 7 x 4.5 -> 770 x 495
    expected = {"accuracy_vs_memory_tA.png": (825, 550), "accuracy_vs_memory_tB.png": (825, 550),
                "sweep_tA.png": (770, 495), "sweep_tB.png": (770, 495),
                "training_time.png": (825, 495), "learning_curves.png": (1320, 462),
                "storage_for_tasks.png": (825, 495)}
    assert sorted(p.name for p in (reports / "plots").iterdir()) == sorted(expected)
    for name, size in expected.items():
        path = reports / "plots" / name
        assert path.stat().st_size > 1000, name
        assert png_size(path) == size, name
    figures = section(md, "Figures").splitlines()
    embeds = [(i, l) for i, l in enumerate(figures) if l.startswith("![")]
    assert [l[l.index("](") + 2:-1] for _, l in embeds] == [
        "plots/accuracy_vs_memory_tA.png", "plots/accuracy_vs_memory_tB.png", "plots/sweep_tA.png",
        "plots/sweep_tB.png", "plots/training_time.png",
        "plots/learning_curves.png", "plots/storage_for_tasks.png"]
    for i, line in embeds:
        caption = line[2:line.index("](")]
        assert caption and figures[i + 2] == f"*{caption}*"
    assert "the 7%-12% band shaded" in figures[embeds[0][0]]
    assert "The sweep on tB: its trials" in figures[embeds[3][0]]
    assert "N = 1..10 tasks" in figures[embeds[6][0]]


# ------------------------------------------------------------------------------- choices on val only


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return analysis.load_inputs(write_results_set(tmp_path_factory.mktemp("inputs") / "reports"))


def _inputs(runs, pareto: dict, breakdown: dict | None = None, bn_bits: dict | None = None) -> analysis.Inputs:
    """Hand-built inputs (no files): runs as in RUNS, pareto as {target: PARETO-style points}; breakdown and
    bn_bits as BREAKDOWN and BN_BITS (default: none, every bn_bits 32)."""
    return analysis.Inputs(_results(runs, breakdown or {}, bn_bits or {}), {"pretrain_binary": {"memory_bytes": BASE}},
                           {}, {}, {t: _pareto_frame(p) for t, p in pareto.items()})


def _pick(row) -> tuple | None:
    return None if row is None else (row.source, row.method, round(float(row.memory_ratio), 9))


def test_question1_budget_is_inclusive(inputs):
    # max_ratio .08: tA candidates trial 4 (.03, val .80) and trial 2 (.08 exactly, val .872) -> trial 2,
    # test .85 ± .127062 -> "85.0% ± 12.7"; vs full .91 ± .127062: -6.0 pts, overlapping; vs fp32 .94 (1 seed):
    # -9.0 pts; vs head .70 ± .024841: +15.0 pts, and .15 < .127062 + .024841 = .151903 -> still overlapping;
    # vs BN .83 ± .127062: +2.0 pts, overlapping. (BN itself, 7.5% with val .875, is no adapter: not chosen.)
    # tB: nothing <= 8% (parallel .10).
    text, _ = accuracy_section(inputs, 0.08)
    assert bullets(text) == [
        "- **tA**: the best adapter at <= 8% task memory (parallel, sweep trial 2, 8.0% of the base, chosen on val) "
        "reaches 85.0% ± 12.7 test accuracy: -6.0 pts, not distinguishable vs binary full finetune (91.0% ± 12.7), "
        "-9.0 pts, not distinguishable vs fp32 full finetune (94.0% (1 seed)), +15.0 pts, not distinguishable vs "
        "head only (70.0% ± 2.5), +2.0 pts, not distinguishable vs BN thresholds + head (83.0% ± 12.7, 7.5% of the "
        "base).",
        "- **tB**: no adapter configuration reached <= 8% of the base's memory.",
    ]


def test_question1_none_below_budget(inputs):
    # max_ratio .02: the smallest adapter anywhere is tA's trial 4 at 3% -> none for both targets
    # (head at 5% and bn at 7.5% are no adapters and over 2% anyway)
    text, tab = accuracy_section(inputs, 0.02)
    assert bullets(text) == ["- **tA**: no adapter configuration reached <= 2% of the base's memory.",
                             "- **tB**: no adapter configuration reached <= 2% of the base's memory."]
    assert list(tab["best adapter <= 2% (on val)"]) == ["none", "none"]
    assert list(tab["adapter test acc"]) == ["n/a", "n/a"]
    assert list(tab["gap vs binary full"]) == ["n/a", "n/a"]


def test_question1_val_tie_from_seed_mean_goes_to_smaller_memory():
    # Accuracies are k / n fractions of the val split (n = 375 for mnist_5to9). Transfer serial, seeds
    # 320/375 and 322/375: mean 321/375 = .856; sweep trial 1 reaches 321/375 = .856 at 5% < 10%.
    # Equal val -> the smaller one (trial 1) must win. Floating point: (320/375 + 322/375) / 2 is
    # 0.8560000000000001 while 321/375 is 0.856, so an exact comparison picks the 10% transfer run.
    inputs = _inputs([("tC", "serial", "binary", s, k / 375, 0.80, 1024.0, 5.0, 1.0, 2.0)
                      for s, k in ((0, 320), (1, 322))],
                     {"tC": [(1, "parallel", 0.05, 0.86, 2, 321 / 375, 0.01, 0.83, 0.01, 2.0, 0.0, 9.0, 0.0, 0)]})
    best = analysis.best_adapter(inputs, "tC", 0.12)
    assert (best.source, best.memory_ratio, best.test_acc) == ("sweep trial 1", 0.05, 0.83)


def test_question3_chooses_on_val_not_on_test(inputs):
    # Main fixture, tA: binary full val (.89 + .91) / 2 = .90, test (.90 + .92) / 2 = .91.
    # Trial 4 (3%): test .905 >= .91 - .01 (within 1 pt on test) but val .80 < .90 - .03 -> never chosen.
    # Trial 5 (20%): val .96 >= .89, test .895 < .90 -> chosen within 1 pt.
    # bn (7.5%): val .875 >= .87, test .83 < .88 -> chosen within 3 pts (ahead of trial 2 at 8%, val .872).
    assert _pick(analysis.smallest_within(inputs, "tA", 1)) == ("sweep trial 5", "parallel", 0.20)
    assert _pick(analysis.smallest_within(inputs, "tA", 3)) == ("transfer stage", "bn", 0.075)
    # tB: full val .78 / test .80; trial 1 (30%) test .795 >= .79 but val .765 < .77 -> nothing within 1 pt
    assert analysis.smallest_within(inputs, "tB", 1) is None
    assert _pick(analysis.most_accurate(inputs, "tB")) == ("sweep trial 1", "parallel", 0.30)

    # A minimal case. Full (1 seed): val .90, test .90. P1 (2%): val .85, test .90 = full's (within any k on
    # test, within k on val only for k >= 5). P2 (5%): val .895, test .80 (within 1 pt on val, 10 pts
    # below on test).
    case = _inputs([("tE", "full", "binary", 0, 0.90, 0.90, BASE, 8.0, 1.0, 4.0)],
                   {"tE": [(1, "serial", 0.02, 0.85, 1, 0.85, NAN, 0.90, NAN, 1.0, NAN, 5.0, NAN, 0),
                           (2, "parallel", 0.05, 0.895, 1, 0.895, NAN, 0.80, NAN, 1.0, NAN, 5.0, NAN, 0)]})
    # k = 1: val >= .89 -> P2 only (on test it would be P1, the smaller); k = 3: val >= .87 -> P2 again
    assert _pick(analysis.smallest_within(case, "tE", 1)) == ("sweep trial 2", "parallel", 0.05)
    assert _pick(analysis.smallest_within(case, "tE", 3)) == ("sweep trial 2", "parallel", 0.05)
    # k = 6: val >= .84 -> both, the smaller P1 wins; k = 0.4: val >= .896 -> none, though P1's test ties full
    assert _pick(analysis.smallest_within(case, "tE", 6)) == ("sweep trial 1", "serial", 0.02)
    assert analysis.smallest_within(case, "tE", 0.4) is None
    # best at <= 12% and most accurate: P2 (val .895 > .85) although P1 has the better test
    assert _pick(analysis.best_adapter(case, "tE", 0.12)) == ("sweep trial 2", "parallel", 0.05)
    assert _pick(analysis.most_accurate(case, "tE")) == ("sweep trial 2", "parallel", 0.05)
    text, tab = size_section(case, (0.07, 0.12))
    # P2 is a default fixture trial (groups 8, r1, last:2, 4-bit) without breakdown columns
    assert list(tab["smallest within 1 pt (on val)"]) == ["parallel g8 r1 last:2 4-bit (sweep trial 2)"]
    assert list(tab["memory (1 pt)"]) == ["5.00%"]
    assert list(tab["test acc (1 pt)"]) == ["80.0% (1 seed)"]
    assert list(tab["breakdown (1 pt)"]) == ["n/a"]
    assert bullets(text)[0] == (
        "- **tE**: the smallest task state within 1 point of binary full finetune (on val: 89.5% (1 seed) vs "
        "90.0% (1 seed)) is 5.00% of the base: parallel g8 r1 last:2 4-bit (sweep trial 2, n/a). Test 80.0% "
        "(1 seed) vs 90.0% (1 seed) for full finetune (-10.0 pts, not distinguishable); below the prior study's "
        "7%-12% band.")


def test_question3_picks_bn_or_head_when_smallest_within_k_on_val():
    # Hand-built, transfer stage only (no sweep). Full (1 seed): val .90, test .90 (memory 100%).
    #   head      512 bytes = 5.0%    val .88   test .86   breakdown head 512 (0.50 KiB)
    #   bn       1024 bytes = 10.0%   val .895  test .87   BN 32-bit: 64 channels x 2 x 32 bits = 512 (0.50) + head 0.50
    #   parallel 1280 bytes = 12.5%   val .92   test .91   weights 672 (672 / 1024 = .65625 -> 0.66),
    #                                                      scales 96 (.09375 -> 0.09), head 0.50; 672 + 96 + 512 = 1280
    # k = 1 (val >= .89): bn and parallel -> bn, the smaller; k = 3 (val >= .87): head too -> head (5%);
    # k = 0.4 (val >= .896): parallel only. Question 1 (adapters only): nothing <= 12% (head and bn are not
    # adapters), parallel at <= 12.5%. Most accurate on val: parallel (.92).
    # tG: full val .95, test .94; bn (BN 16-bit) 768 bytes = 7.5%, val .90, test .91, breakdown BN 256 (0.25) + head
    #   0.50; serial 1024 bytes = 10%, val .85, test .92 (better test, worse val). Nothing within 1 or 3 pts
    #   (val >= .94 / .92) -> the most accurate task state on val is bn (not serial, whose test is higher):
    #   val .90 - .95 = -5.0 pts; test .91 - .94 = -3.0 pts, one seed -> not distinguishable.
    runs = [("tF", "full", "binary", 0, 0.90, 0.90, BASE, 8.0, 1.0, 4.0),
            ("tF", "head", "binary", 0, 0.88, 0.86, 512.0, 1.0, 0.2, 0.5),
            ("tF", "bn", "binary", 0, 0.895, 0.87, 1024.0, 2.0, 0.3, 1.0),
            ("tF", "parallel", "binary", 0, 0.92, 0.91, 1280.0, 4.0, 0.5, 2.0),
            ("tG", "full", "binary", 0, 0.95, 0.94, BASE, 8.0, 1.0, 4.0),
            ("tG", "bn", "binary", 0, 0.90, 0.91, 768.0, 2.0, 0.3, 1.0),
            ("tG", "serial", "binary", 0, 0.85, 0.92, 1024.0, 3.0, 0.4, 1.5)]
    breakdown = {("tF", "head", "binary"): (0.0, 0.0, 0.0, 512.0, 0.0),
                 ("tF", "bn", "binary"): (0.0, 0.0, 512.0, 512.0, 0.0),
                 ("tF", "parallel", "binary"): (672.0, 96.0, 0.0, 512.0, 0.0),
                 ("tG", "bn", "binary"): (0.0, 0.0, 256.0, 512.0, 0.0)}
    case = _inputs(runs, {}, breakdown, {("tG", "bn", "binary"): 16})
    assert _pick(analysis.smallest_within(case, "tF", 1)) == ("transfer stage", "bn", 0.10)
    assert _pick(analysis.smallest_within(case, "tF", 3)) == ("transfer stage", "head", 0.05)
    assert _pick(analysis.smallest_within(case, "tF", 0.4)) == ("transfer stage", "parallel", 0.125)
    assert analysis.best_adapter(case, "tF", 0.12) is None
    assert _pick(analysis.best_adapter(case, "tF", 0.125)) == ("transfer stage", "parallel", 0.125)
    assert _pick(analysis.most_accurate(case, "tF")) == ("transfer stage", "parallel", 0.125)
    assert analysis.smallest_within(case, "tG", 3) is None
    assert _pick(analysis.most_accurate(case, "tG")) == ("transfer stage", "bn", 0.075)

    text, tab = size_section(case, (0.07, 0.12))
    bd_bn = "weights 0.00, scales 0.00, BN 0.50, head 0.50, masks 0.00 KiB"
    bd_head = "weights 0.00, scales 0.00, BN 0.00, head 0.50, masks 0.00 KiB"
    bd_g = "weights 0.00, scales 0.00, BN 0.25, head 0.50, masks 0.00 KiB"
    top_g = ("The most accurate task state tried is BN thresholds + head, BN 16-bit (transfer stage, 7.50% of the "
             f"base; {bd_g}): val 90.0% (1 seed), -5.0 pts vs full; test 91.0% (1 seed), -3.0 pts, not "
             "distinguishable vs full's 94.0% (1 seed).")
    assert bullets(text) == [
        "- **tF**: no sweep results (run `dvc repro sweep@tF`); only the transfer stages' task states count.",
        # bn: .87 - .90 = -3.0 pts, one seed; 10% is inside 7%-12%
        "- **tF**: the smallest task state within 1 point of binary full finetune (on val: 89.5% (1 seed) vs "
        f"90.0% (1 seed)) is 10.00% of the base: BN thresholds + head, BN 32-bit (transfer stage, {bd_bn}). Test "
        "87.0% (1 seed) vs 90.0% (1 seed) for full finetune (-3.0 pts, not distinguishable); inside the prior "
        "study's 7%-12% band.",
        # head: .86 - .90 = -4.0 pts; 5% is below the band
        "- **tF**: the smallest task state within 3 points of binary full finetune (on val: 88.0% (1 seed) vs "
        f"90.0% (1 seed)) is 5.00% of the base: head only (transfer stage, {bd_head}). Test 86.0% (1 seed) vs "
        "90.0% (1 seed) for full finetune (-4.0 pts, not distinguishable); below the prior study's 7%-12% band.",
        "- **tG**: no sweep results (run `dvc repro sweep@tG`); only the transfer stages' task states count.",
        f"- **tG**: no task state is within 1 point of binary full finetune on val (95.0% (1 seed)). {top_g}",
        f"- **tG**: no task state is within 3 points of binary full finetune on val (95.0% (1 seed)). {top_g}",
    ]
    assert tab.to_dict("records") == [
        {"target": "tF", "binary full (val)": "90.0% (1 seed)",
         "smallest within 1 pt (on val)": "BN thresholds + head, BN 32-bit (transfer stage)", "memory (1 pt)": "10.00%",
         "test acc (1 pt)": "87.0% (1 seed)", "breakdown (1 pt)": bd_bn,
         "smallest within 3 pt (on val)": "head only (transfer stage)", "memory (3 pt)": "5.00%",
         "test acc (3 pt)": "86.0% (1 seed)", "breakdown (3 pt)": bd_head},
        {"target": "tG", "binary full (val)": "95.0% (1 seed)",
         "smallest within 1 pt (on val)": "none", "memory (1 pt)": "n/a", "test acc (1 pt)": "n/a",
         "breakdown (1 pt)": "n/a", "smallest within 3 pt (on val)": "none", "memory (3 pt)": "n/a",
         "test acc (3 pt)": "n/a", "breakdown (3 pt)": "n/a"},
    ]
    # the adapter at k = 0.4 carries its own breakdown through candidates()
    assert breakdown_text(analysis.smallest_within(case, "tF", 0.4)) == \
        "weights 0.66, scales 0.09, BN 0.00, head 0.50, masks 0.00 KiB"


def test_breakdown_text_by_hand():
    # bytes / 1024 at two decimals: 420 -> .41015625 -> 0.41; 120 -> .1171875 -> 0.12; 512 -> 0.50;
    # 665.6 -> .65 -> 0.65; 0 -> 0.00. Order: weights, scales, BN, head, masks, whatever the row's order.
    r = pd.Series({"mem_masks_bytes": 0.0, "mem_head_bytes": 665.6, "mem_bn_bytes": 512.0, "mem_scales_bytes": 120.0,
                   "mem_weights_bytes": 420.0, "method": "parallel"})
    assert breakdown_text(r) == "weights 0.41, scales 0.12, BN 0.50, head 0.65, masks 0.00 KiB"
    # missing or NaN parts are left out; none at all -> n/a
    assert breakdown_text(r.drop(["mem_masks_bytes"]).replace({512.0: NAN})) == \
        "weights 0.41, scales 0.12, head 0.65 KiB"
    assert breakdown_text(pd.Series({"method": "serial", "mem_weights_bytes": NAN})) == "n/a"
    # per_config averages each part over seeds, with its interval. A 1-bit serial adapter pruned at scope
    # "global", so its one 4096-weight tensor keeps a different count on each seed: 400 on seed 0 (indices 400 x
    # ceil(log2 4096) = 4800 bits > a 4096-bit mask -> mask, 512 bytes; values 400 bits = 50 bytes), 300 on seed 1
    # (indices 300 x 12 = 3600 bits = 450 bytes; values 37.5 bytes). Both: 8 scales x 32 bits = 32 bytes, head 512.
    # Task bytes: 50 + 32 + 512 + 512 = 1106 and 37.5 + 32 + 512 + 450 = 1031.5.
    # masks (512 + 450) / 2 = 481 -> 481 / 1024 = .4697 -> 0.47, half 12.7062 * 62 / 2 = 393.89;
    # weights (50 + 37.5) / 2 = 43.75 -> .0427 -> 0.04; scales 32 / 1024 = .03125 -> 0.03
    mem = [(50.0, 32.0, 0.0, 512.0, 512.0), (37.5, 32.0, 0.0, 512.0, 450.0)]
    rows = pd.DataFrame([_row("tH", "serial", "binary", s, 0.8, 0.8, task, 1.0, 0.1, 0.5, mem=m)
                         for s, (task, m) in enumerate(zip((1106.0, 1031.5), mem))], columns=COLUMNS)
    rows["adapter_bits"], rows["prune_amount"] = 1, 0.9
    cfg = analysis.per_config(rows).iloc[0]
    assert (cfg.mem_masks_bytes, cfg.mem_masks_bytes_ci) == (481.0, pytest.approx(T1 * 62 / 2, abs=1e-3))
    assert (cfg.mem_weights_bytes, cfg.mem_weights_bytes_ci) == (43.75, pytest.approx(T1 * 12.5 / 2, abs=1e-3))
    assert breakdown_text(cfg) == "weights 0.04, scales 0.03, BN 0.00, head 0.50, masks 0.47 KiB"
    # (1106 + 1031.5) / 2 = 1068.75 bytes -> 1.0437 -> 1.04 KiB, 1068.75 / 10240 = 10.44%: the runs table
    # prints the same parts beside it
    tab = runs_table(analysis.Inputs(rows, {"pretrain_binary": {"memory_bytes": BASE}}, {}))
    assert list(tab["task memory"]) == ["1.04 KiB (10.4%)"]
    assert list(tab["of which"]) == ["weights 0.04, scales 0.03, BN 0.00, head 0.50, masks 0.47 KiB"]
    assert list(tab["task state"]) == ["serial g16 r1 last:3 1-bit pruned 0.9"]


def test_describe_names_a_configuration():
    d = analysis.describe
    # results.csv style (adapter_bits); task BN and pruning only when on, BN width only when not 32
    assert d(pd.Series({"method": "parallel", "groups": 4, "reduction": 1, "placement": "all", "adapter_bits": 1,
                        "task_bn": True, "prune_amount": 0.5, "bn_bits": 16})) == \
        "parallel g4 r1 all 1-bit BN 16-bit +task BN pruned 0.5"
    assert d(pd.Series({"method": "parallel", "groups": 4, "reduction": 1, "placement": "all", "adapter_bits": "ternary",
                        "learn_scale": True, "task_bn": False, "prune_amount": 0.0, "bn_bits": 32})) == \
        "parallel g4 r1 all ternary LSQ"
    assert d(pd.Series({"method": "serial", "groups": 16, "reduction": 2, "placement": "last:3", "adapter_bits": 8,
                        "task_bn": False, "prune_amount": 0.0})) == "serial g16 r2 last:3 8-bit"
    # pareto.csv style: the trial's own param names (bits, not adapter_bits)
    assert d(pd.Series({"method": "serial", "groups": 2, "reduction": 1, "placement": "last:1", "bits": 2,
                        "task_bn": False, "prune_amount": 0.9})) == "serial g2 r1 last:1 2-bit pruned 0.9"
    # the baselines: BN thresholds name their width (32 when the column predates bn_bits); head only
    assert d(pd.Series({"method": "bn", "bn_bits": 16})) == "BN thresholds + head, BN 16-bit"
    assert d(pd.Series({"method": "bn"})) == "BN thresholds + head, BN 32-bit"
    assert d(pd.Series({"method": "head", "bn_bits": 32})) == "head only"


def test_candidates_name_every_task_state_with_its_breakdown(inputs):
    # Main fixture, tA: the transfer stage's configurations in per_config order (method: bn, head, parallel,
    # serial; full is no task state), then the sweep's Pareto points in pareto.csv order (4, 2, 9, 5).
    # Question 1's default (adapters) drops bn and head.
    c = analysis.candidates(inputs, "tA", analysis.TASK_STATES)
    got = [(r.source, r.config, round(r.memory_ratio, 9)) for r in c.itertuples()]
    sweep = "g8 r1 last:2 4-bit"
    assert got == [("transfer stage", "BN thresholds + head, BN 16-bit", 0.075),
                   ("transfer stage", "head only", 0.05),
                   ("transfer stage", "parallel g16 r1 last:3 4-bit", 0.11),
                   ("transfer stage", "serial g16 r1 last:3 4-bit", 0.10),
                   ("sweep trial 4", f"serial {sweep}", 0.03), ("sweep trial 2", f"parallel {sweep}", 0.08),
                   ("sweep trial 9", f"serial {sweep}", 0.09),
                   ("sweep trial 5", "parallel g4 r1 all 1-bit +task BN pruned 0.5", 0.20)]
    # the breakdown columns ride along: bn 0/0/256/512/0, serial 480/32/0/512/0, trial 5 256/256/512/512/512 bytes
    by = {r.source + " " + r.method: tuple(getattr(r, m) for m in MEM) for r in c.itertuples()}
    assert by["transfer stage bn"] == (0.0, 0.0, 256.0, 512.0, 0.0)
    assert by["transfer stage serial"] == (480.0, 32.0, 0.0, 512.0, 0.0)
    assert by["sweep trial 5 parallel"] == (256.0, 256.0, 512.0, 512.0, 512.0)
    assert all(math.isnan(v) for v in by["sweep trial 4 serial"])
    assert list(analysis.candidates(inputs, "tA").method) == ["parallel", "serial", "serial", "parallel", "serial",
                                                              "parallel"]


def test_plots_draw_the_bn_arm(inputs, monkeypatch, tmp_path):
    """Every figure names the BN-thresholds arm where it was run (tA only)."""
    from pipeline.report import plots

    labels = {}

    def keep(fig, path, dpi):
        labels[path.name] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        plots.plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    for t in ("tA", "tB"):
        plots.accuracy_vs_memory(inputs, t, (0.07, 0.12), tmp_path / f"acc_{t}.png", DPI)
    plots.training_time(inputs, tmp_path / "time.png", DPI)
    plots.learning_curves(inputs, tmp_path / "curves.png", DPI)
    plots.storage_for_tasks(inputs, 10, tmp_path / "storage.png", DPI)
    bn = "BN thresholds + head"
    assert bn in labels["acc_tA.png"] and bn not in labels["acc_tB.png"]
    assert bn in labels["time.png"]
    assert labels["curves.png"].count(bn) == 1  # tA's panel, once for its two seeds
    # bn's task memory: 768 bytes = 0.75 KiB, printed at one decimal (0.75 is exact: half to even -> 0.8)
    assert f"binary base + N x {bn} (0.8 KiB each)" in labels["storage.png"]


# Chosen (source, method, memory_ratio) on the main fixture, as derived in the question 1 and 3 tests
CHOICES = {
    ("tA", "best <= 12%"): ("sweep trial 9", "serial", 0.09),
    ("tA", "within 1 pt"): ("sweep trial 5", "parallel", 0.20),
    ("tA", "within 3 pts"): ("transfer stage", "bn", 0.075),
    ("tB", "best <= 12%"): ("transfer stage", "parallel", 0.10),
    ("tB", "within 1 pt"): None,
    ("tB", "within 3 pts"): ("sweep trial 0", "serial", 0.13),
}


def _choices(inp: analysis.Inputs) -> dict:
    out = {}
    for t in ("tA", "tB"):
        out[(t, "best <= 12%")] = _pick(analysis.best_adapter(inp, t, 0.12))
        out[(t, "within 1 pt")] = _pick(analysis.smallest_within(inp, t, 1))
        out[(t, "within 3 pts")] = _pick(analysis.smallest_within(inp, t, 3))
    return out


def _scrambled(inp: analysis.Inputs, column: str, seed: int) -> tuple[analysis.Inputs, int]:
    """`column` of every results.csv row and every pareto.csv row (all targets) pooled, shuffled and dealt
    back (the pareto rows' `<column>_ci` shuffled among them too). Returns the inputs and how many values moved."""
    rng = random.Random(seed)
    results = inp.results.copy()
    pareto = {t: p.copy() for t, p in inp.pareto.items()}
    pooled = list(results[column]) + [v for t in sorted(pareto) for v in pareto[t][column]]
    dealt = pooled[:]
    rng.shuffle(dealt)
    results[column] = dealt[:len(results)]
    i = len(results)
    cis = [v for t in sorted(pareto) for v in pareto[t][f"{column}_ci"]]
    rng.shuffle(cis)
    j = 0
    for t in sorted(pareto):
        n = len(pareto[t])
        pareto[t][column] = dealt[i:i + n]
        pareto[t][f"{column}_ci"] = cis[j:j + n]
        i, j = i + n, j + n
    moved = sum(a != b for a, b in zip(pooled, dealt))
    return analysis.Inputs(results, inp.metrics, inp.curves, inp.trials, pareto), moved


def test_scrambling_test_numbers_changes_no_choice(inputs):
    assert _choices(inputs) == CHOICES
    before_acc = accuracy_section(inputs, 0.12)[1]["best adapter <= 12% (on val)"].tolist()
    chosen = ["smallest within 1 pt (on val)", "smallest within 3 pt (on val)", "memory (1 pt)", "memory (3 pt)",
              "breakdown (1 pt)", "breakdown (3 pt)"]
    before_size = size_section(inputs, (0.07, 0.12))[1][chosen]
    for seed in range(20):
        scrambled, moved = _scrambled(inputs, "test_acc", seed)
        assert moved >= 10, seed  # 22 pooled values (16 runs + 6 Pareto points): most land elsewhere
        assert _choices(scrambled) == CHOICES, seed
        assert accuracy_section(scrambled, 0.12)[1]["best adapter <= 12% (on val)"].tolist() == before_acc
        assert size_section(scrambled, (0.07, 0.12))[1][chosen].equals(before_size)
    # the same comparison does see a scramble of the numbers that choose: val
    assert any(_choices(_scrambled(inputs, "val_acc", seed)[0]) != CHOICES for seed in range(20))


def test_not_distinguishable_only_when_intervals_overlap():
    # Binary full (2 seeds) test .905/.915: mean .91, half 12.7062 * .01 / 2 = .063531 -> "91.0% ± 6.4".
    # fp32 (1 seed) .93: unknown width -> never distinguishable. Head (2 seeds) .60/.60: half 0 -> "60.0% ± 0.0".
    # Adapter (2 seeds, 5%): tD .84/.84 (half 0): gap .07 > .063531 + 0 -> apart -> "-7.0 pts";
    #                        tE .85/.85 (half 0): gap .06 < .063531     -> overlap -> "-6.0 pts, not distinguishable".
    # (A 1.96 z-quantile, or the sd instead of the half-width, would call both apart; the t quantile decides.)
    runs = []
    for t, a in (("tD", 0.84), ("tE", 0.85)):
        runs += [(t, "full", "binary", 0, 0.90, 0.905, BASE, 10.0, 1.0, 4.0),
                 (t, "full", "binary", 1, 0.90, 0.915, BASE, 10.0, 1.0, 4.0),
                 (t, "full", "fp32", 0, 0.92, 0.93, FP32, 20.0, 2.0, 8.0),
                 (t, "head", "binary", 0, 0.60, 0.60, 512.0, 1.0, 0.2, 0.5),
                 (t, "head", "binary", 1, 0.60, 0.60, 512.0, 1.0, 0.2, 0.5),
                 (t, "serial", "binary", 0, 0.88, a, 512.0, 5.0, 0.5, 2.0),
                 (t, "serial", "binary", 1, 0.88, a, 512.0, 5.0, 0.5, 2.0)]
    text, tab = accuracy_section(_inputs(runs, {}), 0.12)
    # vs fp32: .84 - .93 = -9.0, .85 - .93 = -8.0 pts; vs head: +24.0 / +25.0 pts, gap > 0 + 0 -> apart
    assert bullets(text) == [
        "- **tD**: the best adapter at <= 12% task memory (serial, transfer stage, 5.0% of the base, chosen on val) "
        "reaches 84.0% ± 0.0 test accuracy: -7.0 pts vs binary full finetune (91.0% ± 6.4), -9.0 pts, not "
        "distinguishable vs fp32 full finetune (93.0% (1 seed)), +24.0 pts vs head only (60.0% ± 0.0).",
        "- **tE**: the best adapter at <= 12% task memory (serial, transfer stage, 5.0% of the base, chosen on val) "
        "reaches 85.0% ± 0.0 test accuracy: -6.0 pts, not distinguishable vs binary full finetune (91.0% ± 6.4), "
        "-8.0 pts, not distinguishable vs fp32 full finetune (93.0% (1 seed)), +25.0 pts vs head only (60.0% ± 0.0).",
    ]
    assert list(tab["gap vs binary full"]) == ["-7.0 pts", "-6.0 pts, not distinguishable"]
    assert list(tab["gap vs head"]) == ["+24.0 pts", "+25.0 pts"]


# ------------------------------------------------------------------------------- missing inputs


@pytest.mark.parametrize("rel, maker", [("results.csv", "results"),
                                         ("metrics/pretrain_fp32.json", "pretrain@fp32"),
                                         ("metrics/pretrain_binary.json", "pretrain@binary")])
def test_missing_input_names_file_and_stage(tmp_path, monkeypatch, rel, maker):
    reports = write_results_set(tmp_path / "reports")
    (reports / rel).unlink()
    monkeypatch.chdir(tmp_path)
    params = parse_params(default_raw())
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(UserError) as err:
        report.run(params, tmp_path / "params.yaml", reports=reports)
    msg = str(err.value)
    assert str(reports / rel) in msg
    assert f"written by the {maker} stage" in msg
    assert not (reports / "report.md").exists()
    assert not (reports / "plots").exists()


def test_cli_missing_results_is_one_line_exit_2(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run([str(BIN / "pipeline"), "report"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "reports/results.csv" in lines[0] and "results stage" in lines[0]
    assert not (tmp_path / "reports" / "report.md").exists()


# ------------------------------------------------------------------------------- dvc: report-only rerun


@pytest.mark.slow
def test_report_only_change_reruns_only_report(built_project, tmp_path):
    src, first_stdout, _ = built_project
    root = copy_project(src, tmp_path / "proj")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    dvc = str(BIN / "dvc")
    assert "Running stage 'report'" in first_stdout
    png = root / "reports/plots/accuracy_vs_memory_mnist_5to9.png"
    # 7.5 x 5 inches at the default dpi 110 -> 825 x 550
    assert png_size(png) == (825, 550)

    changed = copy.deepcopy(raw)
    changed["report"]["dpi"] = 80
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    t0 = time.perf_counter()
    second = run_cli([dvc, "repro"], root)
    rerun_s = time.perf_counter() - t0
    stage_line = next((l for l in second.stdout.splitlines() if l.startswith("report: ")), "(no report line)")
    print(f"\nreport-only rerun {rerun_s:.1f}s; the stage itself: {stage_line}")
    running = [l for l in second.stdout.splitlines() if "Running stage" in l]
    assert running == ["Running stage 'report':"], second.stdout
    assert (root / "reports/report.md").exists()
    # 7.5 x 5 inches at dpi 80 -> 600 x 400; learning_curves (one target) 6 x 4.2 -> 480 x 336
    assert png_size(png) == (600, 400)
    assert png_size(root / "reports/plots/learning_curves.png") == (480, 336)
    assert "![" in (root / "reports/report.md").read_text()
