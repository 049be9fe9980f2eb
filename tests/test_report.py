"""The report stage: a hand-written results set (results.csv, per-image predictions, sweep files, metrics;
no training) -> report.md and plots, every number in report.md checked against a hand calculation or an
independent computation on the fixture; every choice on val only; paired comparisons and the "not apart"
marking by the interval; the tally of comparisons; missing inputs; PNG sizes; and a real `dvc repro` where a
report-only params change reruns only `report`.

Accuracies come from the predictions (reports/predictions/<target>.npz, where the results stage merges every
arm's and the sweep's retrained points'): `hits` below builds each run's correctness (k = the first k images
right, the rest wrong; (k, flips) = then the listed images toggled). An interval over seeds x images is the
two-way random-effects ANOVA one (pipeline.stats.crossed_ci); the tests compute it again with `crossed`
(written out from sums of squares; one seed: scipy's one-sample t interval over the images). Two facts used
by hand throughout: identical rows on every seed leave only the image term, so the interval is the one-sample
t interval over the images; and for a 0/1 (or 0/-1) vector with a fraction p of ones on n images that is
t_{0.975,n-1} * sqrt(p (1 - p) / (n - 1)), with t_{0.975,19} = 2.0930 (20 val images) and t_{0.975,39} =
2.0227 (40 test images). E.g. 20 images, one image apart: p = .05 -> +-10.47 pts; 3: +-17.15; 4: +-19.21;
5: +-20.79; one +1 and one -1 (mean 0): sqrt(2/19/20) = .07255 -> +-15.18 pts.

Fixture at a glance (base = 10240 bytes = 10.00 KiB; band 7%-12%; budget 12%; val 20, test 40 images,
5 classes; "right" = images right per seed, in seed order 0, 1, 2):

target tA       seeds  val right      test right   memory  train s        epoch s   epochs    cap  lr searched
  full  binary  0,1    11, 11         34, 36       1.00    11.9, 12.1     2.0, 2.4  12, 14    -    0.002, 0.005*, 0.01
  full  fp32    0      13             39           32.0    20.0           4.0       10        -    0.002*, 0.005, 0.01 (pruned)
  head          0,1,2  5, 5, 5        20, 22, 24   .05     1.8, 2.0, 2.2  .4        9, 10, 11 -    0.003, 0.01*, 0.03 (pruned)
  bn (16-bit)   0,1    full's 11, but #0 wrong and #11 right    32, 32   .075   2.9, 3.1  .6  9, 11  -  0.003, 0.01*
  serial        0,1    19, 19         33, 35       .10     5.0, 5.6       1.1       11, 15    s1   0.002 (pruned), 0.005*, 0.01
  parallel      0      9              39           .11     3.0            .56       8         -    0.005, 0.01*
  sweep points, retrained on 2 seeds (trial val = the trial's own single-seed score; front = on the trials' front):
    trial 4 serial    .03  trial val .80, front          val 7, 7    test 34, 36 (full's test, image for image)
    trial 2 parallel  .08  trial val .78, dominated by 4 val 14, 14  test 28, 30
    trial 9 serial    .09  trial val .88, front          val 18, 18  test 37, 37
    trial 5 parallel  .20  trial val .95, front          val 16, 16  test 36, 36  (g4 r1 all 1-bit +task BN pruned
                                                                                  0.5; seed 1 hit the cap)
target tB (one seed each)   val / test right:  full 16/36, fp32 17/28, head 8/16 (hit the cap), serial (15%) 18/31,
  parallel (10%) 12/26; sweep trial 0 serial 13% 19/35, trial 1 parallel 30% 18/37 (both on the front)
Memory breakdown (mem_*_bytes: weights, scales, BN, head, masks; the same on every seed), other rows NaN:
  head 0/0/0/512/0; bn 0/0/256/512/0 (64 channels x 2 values x 16 bits); serial 480/32/0/512/0 (960 4-bit weights,
  8 scales); trial 9 358.4/51.2/0/512/0 (921.6 bytes = 9%); trial 5 256/256/512/512/512 (4096 1-bit weights, half
  kept, + a 4096-bit mask; 64 scales; BN 64 x 2 x 32 bits); tB trial 1 2400/160/0/512/0 (4800 4-bit weights, 40
  scales).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from conftest import BIN, ROOT, copy_project, run_cli
from pipeline import predictions
from pipeline.config import parse_params
from pipeline.errors import UserError
from pipeline.report import analysis, plots
from pipeline.report.markdown import (Tally, accuracy_section, breakdown_text, ci_num, ci_pct, runs_table,
                                      size_section)
from pipeline.stages import report
from pipeline.stats import mean_ci

BASE = 10240.0     # binary base, bytes (10.00 KiB)
FP32 = 327680.0    # fp32 base, bytes (320 KiB)
T1 = 12.7062       # t_{0.975,1}: two seeds
T2 = 4.3027        # t_{0.975,2}: three seeds
T19 = 2.0930       # 20 val images
T39 = 2.0227       # 40 test images
NAN = float("nan")
N = {"val": 20, "test": 40}
CLASSES = 5
MAX_EPOCHS = 15
MEM = ["mem_weights_bytes", "mem_scales_bytes", "mem_bn_bytes", "mem_head_bytes", "mem_masks_bytes"]
ADAPTER = {"groups": 16, "reduction": 1, "placement": "last:3", "adapter_bits": 4, "learn_scale": False,
           "head_bits": 8, "prune_amount": 0.0, "task_bn": False, "bn_bits": 32}
NONE = {"groups": 0, "reduction": 0, "placement": "none", "adapter_bits": 0, "learn_scale": False, "prune_amount": 0.0}
HEAD_BITS = {"full": 32, "head": 8, "bn": 8}  # full keeps its float head in its copy; every new head is 8-bit
# transfer.measure()'s row, column for column, then the arm's lr_searched
COLUMNS = ["target", "method", "precision", "adapter_type", "groups", "reduction", "placement", "adapter_bits",
           "learn_scale", "head_bits", "prune_amount", "task_bn", "bn_bits", "seed", "sparsity", "val_acc", "test_acc",
           "task_memory_bytes", "adapter_memory_bytes", "base_memory_bytes", "memory_ratio", *MEM, "train_time_s",
           "prefix_time_s", "epoch_time_s", "time_to_95_s", "train_activation_bytes", "train_memory_bytes",
           "trainable_params", "lr", "epochs_run", "max_epochs", "stopped_early", "hit_cap_improving",
           "packed_payload_bytes", "lr_searched"]
TRIAL_COLUMNS = ["number", "state", "val_acc", "task_memory_bytes", "method", "groups", "reduction", "placement",
                 "task_bn", "bits", "prune_amount", "lr", "memory_ratio", "adapter_memory_bytes", "sparsity",
                 "train_time_s", "epochs_run", "hit_cap_improving", "fail_reason", "adapter", "anchor", "duration_s"]

# run-key prefix -> (val right per seed, test right per seed), as in the docstring
ACC = {
    "tA": {"full": ([11, 11], [34, 36]), "full_fp32": ([13], [39]), "head": ([5, 5, 5], [20, 22, 24]),
           "bn": ([(11, (0, 11))] * 2, [32, 32]), "serial": ([19, 19], [33, 35]), "parallel": ([9], [39]),
           "trial4": ([7, 7], [34, 36]), "trial2": ([14, 14], [28, 30]), "trial9": ([18, 18], [37, 37]),
           "trial5": ([16, 16], [36, 36])},
    "tB": {"full": ([16], [36]), "full_fp32": ([17], [28]), "head": ([8], [16]), "serial": ([18], [31]),
           "parallel": ([12], [26]), "trial0": ([19], [35]), "trial1": ([18], [37])},
}
# (target, method, precision, seed, task bytes, train s, epoch s, epochs run, hit the cap still improving)
RUNS = [
    ("tA", "bn", "binary", 0, 768.0, 2.9, 0.6, 9, False),      # 768 / 10240 = 7.5%
    ("tA", "bn", "binary", 1, 768.0, 3.1, 0.6, 11, False),
    ("tA", "full", "binary", 0, BASE, 11.9, 2.0, 12, False),
    ("tA", "full", "binary", 1, BASE, 12.1, 2.4, 14, False),
    ("tA", "full", "fp32", 0, FP32, 20.0, 4.0, 10, False),
    ("tA", "head", "binary", 0, 512.0, 1.8, 0.4, 9, False),
    ("tA", "head", "binary", 1, 512.0, 2.0, 0.4, 10, False),
    ("tA", "head", "binary", 2, 512.0, 2.2, 0.4, 11, False),
    ("tA", "parallel", "binary", 0, 1126.4, 3.0, 0.56, 8, False),  # 11%
    ("tA", "serial", "binary", 0, 1024.0, 5.0, 1.1, 11, False),
    ("tA", "serial", "binary", 1, 1024.0, 5.6, 1.1, 15, True),
    ("tB", "full", "binary", 0, BASE, 8.0, 1.6, 9, False),
    ("tB", "full", "fp32", 0, FP32, 16.0, 3.2, 10, False),
    ("tB", "head", "binary", 0, 512.0, 1.2, 0.24, 15, True),
    ("tB", "parallel", "binary", 0, 1024.0, 6.0, 1.2, 12, False),  # 10%
    ("tB", "serial", "binary", 0, 1536.0, 2.0, 0.4, 7, False),     # 15%: over the budget
]
# (target, method, precision) -> (lr, lr_searched as protocol.searched_text writes it: ascending, chosen starred)
LR = {("tA", "bn", "binary"): (0.01, "0.003, 0.01*"),
      ("tA", "full", "binary"): (0.005, "0.002, 0.005*, 0.01"),
      ("tA", "full", "fp32"): (0.002, "0.002*, 0.005, 0.01 (pruned)"),
      ("tA", "head", "binary"): (0.01, "0.003, 0.01*, 0.03 (pruned)"),
      ("tA", "serial", "binary"): (0.005, "0.002 (pruned), 0.005*, 0.01"),
      ("tA", "parallel", "binary"): (0.01, "0.005, 0.01*"),
      ("tB", "full", "binary"): (0.005, "0.005 (fixed: no search)"),
      ("tB", "full", "fp32"): (0.002, "0.002*, 0.005"),
      ("tB", "head", "binary"): (0.01, "0.003, 0.01*, 0.03"),
      ("tB", "serial", "binary"): (0.01, "0.003, 0.01*, 0.03"),
      ("tB", "parallel", "binary"): (0.005, "0.005*, 0.01, 0.02")}
# peak training memory and its activations, bytes (the same on every seed and target)
TRAIN_MEM = {("full", "binary"): (409600.0, 204800.0), ("full", "fp32"): (1228800.0, 409600.0),
             ("head", "binary"): (20480.0, 4096.0), ("bn", "binary"): (61440.0, 30720.0),
             ("serial", "binary"): (102400.0, 51200.0), ("parallel", "binary"): (81920.0, 40960.0)}
BREAKDOWN = {("tA", "head", "binary"): (0.0, 0.0, 0.0, 512.0, 0.0),
             ("tA", "bn", "binary"): (0.0, 0.0, 256.0, 512.0, 0.0),
             ("tA", "serial", "binary"): (480.0, 32.0, 0.0, 512.0, 0.0)}
BN_BITS = {("tA", "bn", "binary"): 16}  # every other row: 32
# Sweep points as pareto.csv holds them: (number, method, memory ratio, trial val, on the trials' front, seeds,
# train s, epochs run, runs at the cap still improving, configuration overrides and breakdown `mem`)
PARETO = {
    "tA": [(4, "serial", 0.03, 0.80, True, 2, 1.0, 10, 0, {}),
           (2, "parallel", 0.08, 0.78, False, 2, 2.0, 9, 0, {}),
           (9, "serial", 0.09, 0.88, True, 2, 2.5, 10, 0, {"mem": (358.4, 51.2, 0.0, 512.0, 0.0)}),
           (5, "parallel", 0.20, 0.95, True, 2, 4.0, 14, 1,
            {"groups": 4, "placement": "all", "task_bn": True, "bits": 1, "prune_amount": 0.5,
             "mem": (256.0, 256.0, 512.0, 512.0, 512.0)})],
    "tB": [(0, "serial", 0.13, 0.75, True, 1, 2.0, 8, 0, {}),
           (1, "parallel", 0.30, 0.77, True, 1, 5.0, 12, 0, {"mem": (2400.0, 160.0, 0.0, 512.0, 0.0)})],
}
# Hypervolume over log10 memory % (1% to 100%, reference accuracy 0) of the front points (pareto True), by hand,
# heights = best accuracy so far. tA front: trial 4 (3%), 9 (9%), 5 (20%); log10 9 - log10 3 = log10 3 = .4771213:
#   val  (right / 20): .35 on [log 3, log 9], then .90 (trial 9; trial 5's .80 is lower) to 2:
#        .35 x .4771213 + .90 x (2 - .9542425) = .1669924 + .9411817 = 1.1081742 -> 1.1082
#   test (right / 40): .875 (trial 4), then .925 (trial 9) to 2: .4174811 + .9673257 = 1.3848068 -> 1.3848
# tB front: trial 0 (13%), 1 (30%); log10 13 = 1.1139434, log10 30 = 1.4771213:
#   val  .95 (trial 0) all the way: .95 x (2 - 1.1139434) = .8417538 -> .8418
#   test .875 on [log 13, log 30], then .925: .875 x .3631779 + .925 x .5228787 = .3177807 + .4836628 = .8014
SWEEP_JSON = {
    "tA": {"complete": 9, "failed": 1, "fail_number": 7, "pareto_size": 3, "retrained": 4, "seeds": 2,
           "hypervolume_log_memory": 1.1082, "hypervolume_log_memory_test": 1.3848, "memory_pct_min": 3.0,
           "memory_pct_max": 20.0, "hit_cap_improving": 1, "trials_hit_cap_improving": 2, "wall_time_s": 40.0},
    "tB": {"complete": 4, "failed": 0, "fail_number": None, "pareto_size": 2, "retrained": 2, "seeds": 1,
           "hypervolume_log_memory": 0.8418, "hypervolume_log_memory_test": 0.8014, "memory_pct_min": 13.0,
           "memory_pct_max": 30.0, "hit_cap_improving": 0, "trials_hit_cap_improving": 0, "wall_time_s": 35.5},
}
# stage wall times: prepare 1.0 + 1.5 + 2.5 = 5.0; pretrain 30.0 + 25.0 = 55.0;
# transfer tA 12.5 + 20.5 + 2.5 + 6.5 + 3.5 = 45.5, bn tA 4.0; transfer tB 9.0 + 17.0 + 1.5 + 2.5 + 7.0 = 37.0;
# sweep 40.0 + 35.5 = 75.5; total 5.0 + 55.0 + 45.5 + 4.0 + 37.0 + 75.5 = 222.0
PREPARE = {"src": (1.0, "00112233445566aa", (200, 30, 30)), "tA": (1.5, "aabbccddeeff0011", (140, 20, 40)),
           "tB": (2.5, "0123456789abcdef", (100, 20, 40))}  # wall s, train sha, (train, val, test images)
PRETRAIN = {"binary": (BASE, 30.0), "fp32": (FP32, 25.0)}
TRANSFER_WALL = {("tA", "bn"): 4.0, ("tA", "full"): 12.5, ("tA", "full_fp32"): 20.5, ("tA", "head"): 2.5,
                 ("tA", "serial"): 6.5, ("tA", "parallel"): 3.5, ("tB", "full"): 9.0, ("tB", "full_fp32"): 17.0,
                 ("tB", "head"): 1.5, ("tB", "serial"): 2.5, ("tB", "parallel"): 7.0}
STAGE_TIMES = {"prepare@src": 1.0, "prepare@tA": 1.5, "prepare@tB": 2.5, "pretrain@binary": 30.0,
               "pretrain@fp32": 25.0, "sweep@tA": 40.0, "sweep@tB": 35.5,
               # named as `dvc dag` names the stages that wrote them
               "baseline@tA-full": 12.5, "transfer_fp32@tA": 20.5, "baseline@tA-head": 2.5, "transfer@tA-serial": 6.5,
               "transfer@tA-parallel": 3.5, "baseline@tB-full": 9.0, "transfer_fp32@tB": 17.0, "baseline@tB-head": 1.5,
               "transfer@tB-serial": 2.5, "transfer@tB-parallel": 7.0, "bn@tA": 4.0}
TOTAL_WALL = 222.0
DPI = 110  # params.yaml's report.dpi


# ------------------------------------------------------------------------------- predictions and intervals


def hits(n: int, spec) -> np.ndarray:
    """1 where the image is right: `k` = the first k of n, `(k, flips)` = then the images in `flips` toggled."""
    k, flips = (spec, ()) if isinstance(spec, int) else spec
    right = np.arange(n) < k
    right[list(flips)] ^= True
    return right.astype(np.float64)


def images(acc: dict, target: str) -> dict[str, int]:
    """Images per split: N, unless the target's entry says otherwise (`"images": {...}`)."""
    return acc[target].get("images", N)


def labels(n: int) -> np.ndarray:
    return np.arange(n) % CLASSES


def matrix(acc: dict, target: str, key: str, split: str, seeds=None) -> np.ndarray:
    """seeds x images correctness of runs `key` (seeds 0..n-1, or `seeds`)."""
    specs, n = acc[target][key][0 if split == "val" else 1], images(acc, target)[split]
    return np.stack([hits(n, specs[s]) for s in (range(len(specs)) if seeds is None else seeds)])


def crossed(x) -> tuple[float, float]:
    """(mean, 95% half-width) over seeds x images, independently of pipeline.stats: the two-way random-effects
    ANOVA from sums of squares (residual = total - seeds - images), Var(mean) = (MS_seed + MS_image - MS_res)
    / (S I), Satterthwaite df (a sum below 0: the larger of MS_seed, MS_image alone); one seed: scipy's
    one-sample t interval over the images."""
    x = np.asarray(x, dtype=np.float64)
    s, i = x.shape
    if s == 1:
        if x[0].std() == 0:
            return float(x.mean()), 0.0
        ci = sps.ttest_1samp(x[0], 0.0).confidence_interval(0.95)
        return float(x.mean()), float(ci.high - ci.low) / 2
    g = x.mean()
    ss_seed = i * ((x.mean(axis=1) - g) ** 2).sum()
    ss_image = s * ((x.mean(axis=0) - g) ** 2).sum()
    ss_res = ((x - g) ** 2).sum() - ss_seed - ss_image
    ms = [(ss_seed / (s - 1), s - 1), (ss_image / (i - 1), i - 1), (-ss_res / ((s - 1) * (i - 1)), (s - 1) * (i - 1))]
    v = sum(m for m, _ in ms)
    if v <= 0:  # the estimates fell below zero: the larger main effect alone (the rule crossed_ci documents)
        ms = [max(ms[:2])]
        v = ms[0][0]
    if v <= 0:  # identical predictions
        return float(g), 0.0
    df = v ** 2 / sum(m ** 2 / d for m, d in ms)
    return float(g), float(sps.t.ppf(0.975, df) * math.sqrt(v / (s * i)))


def pair(acc: dict, target: str, a: str, b: str, split: str) -> tuple[float, float]:
    """Paired A - B on the seeds both have (every arm's seeds are 0..n-1)."""
    seeds = range(min(len(acc[target][a][0]), len(acc[target][b][0])))
    return crossed(matrix(acc, target, a, split, seeds) - matrix(acc, target, b, split, seeds))


def apart(d: float, h: float) -> bool:
    return d - h > 0 or d + h < 0


def gap(d: float, h: float) -> str:
    """The report's printed form of a paired difference (fractions -> points)."""
    return f"{100 * d:+.1f} pts [{100 * (d - h):+.1f}, {100 * (d + h):+.1f}]" + ("" if apart(d, h) else ", not apart")


def acc_text(acc: dict, target: str, key: str, split: str = "test") -> str:
    m, h = crossed(matrix(acc, target, key, split))
    return f"{100 * m:.1f}% ± {100 * h:.1f}"


# ------------------------------------------------------------------------------- the fixture's files


def key_of(method: str, precision: str) -> str:
    return method if precision == "binary" else f"{method}_{precision}"


def _row(target, method, precision, seed, task, train, epoch, epochs_run, cap, *, acc, lr, searched,
         mem=None, bn_bits=32) -> dict:
    adapter = method in ("serial", "parallel")
    specs, n = acc[target][key_of(method, precision)], images(acc, target)
    keys = {"target": target, "method": method, "precision": precision,
            "adapter_type": method if adapter else "none",
            **(ADAPTER if adapter else {**NONE, "head_bits": HEAD_BITS[method]}),
            "task_bn": False if adapter else method in ("full", "bn"), "bn_bits": bn_bits, "seed": seed}
    peak, activations = TRAIN_MEM[(method, precision)]
    return {**keys, "sparsity": 0.0,
            # the row's own accuracies: the same predictions, this seed alone (the report recomputes them)
            "val_acc": hits(n["val"], specs[0][seed]).mean(), "test_acc": hits(n["test"], specs[1][seed]).mean(),
            "task_memory_bytes": task, "adapter_memory_bytes": 256.0 if adapter else 0.0, "base_memory_bytes": BASE,
            "memory_ratio": task / BASE, **dict(zip(MEM, mem or [NAN] * len(MEM))), "train_time_s": train,
            "prefix_time_s": 0.2 if adapter else 0.5 if method == "head" else 0.0, "epoch_time_s": epoch,
            "time_to_95_s": train / 2, "train_activation_bytes": activations, "train_memory_bytes": peak,
            "trainable_params": 1234, "lr": lr, "epochs_run": epochs_run, "max_epochs": MAX_EPOCHS,
            "stopped_early": epochs_run < MAX_EPOCHS, "hit_cap_improving": cap, "packed_payload_bytes": int(task),
            "lr_searched": searched}


def _results(runs, acc, breakdown=None, bn_bits=None) -> pd.DataFrame:
    """Rows as in RUNS; lr from LR (default 0.005, searched "0.005*, 0.01"); `breakdown` and `bn_bits` keyed
    by (target, method, precision) (default: the main fixture's)."""
    breakdown = BREAKDOWN if breakdown is None else breakdown
    bn_bits = BN_BITS if bn_bits is None else bn_bits
    rows = []
    for r in runs:
        lr, searched = LR.get(r[:3], (0.005, "0.005*, 0.01"))
        rows.append(_row(*r, acc=acc, lr=lr, searched=searched, mem=breakdown.get(r[:3]), bn_bits=bn_bits.get(r[:3], 32)))
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["target", "method", "precision", "seed"], kind="stable")


def _pareto_frame(target: str, points, acc) -> pd.DataFrame:
    """pareto.csv as the sweep writes it: val and test mean and interval over seeds x images of the trial's
    retrained runs (computed here by `crossed`), memory and time over seeds (the same on every seed)."""
    rows = []
    for n, m, r, tv, front, seeds, train, epochs, cap, extra in points:
        extra = dict(extra)
        mem = extra.pop("mem", None)
        zero = 0.0 if seeds > 1 else NAN
        row = {"number": n, "method": m, "groups": 8, "reduction": 1, "placement": "last:2", "task_bn": False,
               "bits": 4, "prune_amount": 0.0, "lr": 0.005, **extra, "pareto": front, "trial_val_acc": tv,
               "seeds": seeds}
        for split in ("val", "test"):
            row[f"{split}_acc"], row[f"{split}_acc_ci"] = crossed(matrix(acc, target, f"trial{n}", split))
        row.update({"task_memory_bytes": r * BASE, "task_memory_bytes_ci": zero, "memory_ratio": r,
                    "memory_ratio_ci": zero, "train_time_s": train, "train_time_s_ci": zero, "epochs_run": epochs,
                    "epochs_run_ci": zero})
        for k, b in zip(MEM, mem or [NAN] * len(MEM)):
            row[k], row[f"{k}_ci"] = b, (zero if mem else NAN)
        row.update({"memory_pct": 100 * r, "hit_cap_improving": cap})
        rows.append(row)
    return pd.DataFrame(rows)


def _runs_of(acc: dict, target: str, keys) -> dict[str, dict[str, np.ndarray]]:
    """Run key -> {split: predicted classes}: the label where `hits` says right, the next class where wrong."""
    out, n = {}, images(acc, target)
    for key in keys:
        for seed in range(len(acc[target][key][0])):
            out[predictions.run_key(key, seed)] = {
                s: np.where(matrix(acc, target, key, s, [seed])[0] == 1, labels(n[s]), (labels(n[s]) + 1) % CLASSES)
                for s in n}
    return out


def _preds(acc: dict, target: str, keys) -> predictions.Predictions:
    arrays = {f"labels/{s}": labels(n).astype(np.uint8) for s, n in images(acc, target).items()}
    for run, by_split in _runs_of(acc, target, keys).items():
        arrays.update({f"{run}/{s}": p.astype(np.uint8) for s, p in by_split.items()})
    return predictions.Predictions(arrays)


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write_results_set(reports: Path) -> Path:
    """A realistic reports/ folder, written by hand (no training)."""
    metrics = reports / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    _results(RUNS, ACC).to_csv(reports / "results.csv", index=False)
    for t in ACC:  # the sweep's file holds its retrained points; the results stage's, every arm's and those
        arms = sorted({key_of(r[1], r[2]) for r in RUNS if r[0] == t})
        trials = _runs_of(ACC, t, [f"trial{p[0]}" for p in PARETO[t]])
        predictions.write(reports / "sweep" / t / "predictions.npz", {s: labels(n) for s, n in N.items()}, trials)
        predictions.write(reports / "predictions" / f"{t}.npz", {s: labels(n) for s, n in N.items()},
                          {**_runs_of(ACC, t, arms), **trials})
    for name, (wall, sha, (train, val, test)) in PREPARE.items():
        _json(metrics / f"prepare_{name}.json", {"train_images": train, "val_images": val, "test_images": test,
                                                 "num_classes": 5, "train_sha256": sha, "wall_time_s": wall})
    for precision, (mem, wall) in PRETRAIN.items():
        _json(metrics / f"pretrain_{precision}.json", {
            "val_acc": 0.95, "test_acc": 0.94, "memory_bytes": mem, "packed_payload_bytes": int(mem), "params": 20000,
            "epochs_run": 8, "train_time_s": wall - 2.0, "epoch_time_s": (wall - 2.0) / 8, "time_to_95_s": 5.0,
            "dataset_sha256": "00112233445566aa", "wall_time_s": wall})
    for (target, var), wall in TRANSFER_WALL.items():
        method, precision = ("full", "fp32") if var == "full_fp32" else (var, "binary")
        runs = [r for r in RUNS if r[:3] == (target, method, precision)]
        lr = LR[(target, method, precision)][0]
        _json(metrics / f"transfer_{target}_{var}.json", {"seeds": len(runs), "lr": lr,
                                                          "hit_cap_improving": sum(r[8] for r in runs),
                                                          "wall_time_s": wall})
        curve = [{"seed": r[3], "lr": lr, "epoch": e, "elapsed_train_s": round(r[5] * (e + 1) / 3, 4),
                  "val_acc": round(0.3 + 0.2 * e, 4)} for r in runs for e in range(3)]
        pd.DataFrame(curve).to_csv(metrics / f"transfer_{target}_{var}_curve.csv", index=False)
    for target, points in PARETO.items():
        folder = reports / "sweep" / target
        _pareto_frame(target, points, ACC).to_csv(folder / "pareto.csv", index=False)
        s = SWEEP_JSON[target]
        on_front = {p[0]: p for p in points}
        trials = []
        for n in range(s["complete"] + s["failed"]):
            if n in on_front:  # the trial's own configuration and single-seed val accuracy
                _, m, r, v, *_, extra = on_front[n]
                cfg = {"method": m, "groups": 8, "reduction": 1, "placement": "last:2", "task_bn": False, "bits": 4,
                       "prune_amount": 0.0, "lr": 0.005, **{k: x for k, x in extra.items() if k != "mem"}}
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
            "study": f"{target}-0123abcd", **{k: v for k, v in s.items() if k != "fail_number"},
            "reference_point": {"accuracy": 0.0, "memory_pct": 100.0}})
    return reports


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _inputs(runs, acc, pareto: dict | None = None, breakdown: dict | None = None,
            bn_bits: dict | None = None) -> analysis.Inputs:
    """Hand-built inputs (no files): runs as in RUNS, accuracies as in ACC, pareto as {target: PARETO-style
    points}; breakdown and bn_bits as BREAKDOWN and BN_BITS (default: none, every bn_bits 32)."""
    pareto = pareto or {}
    results = _results(runs, acc, breakdown or {}, bn_bits or {})
    preds = {t: _preds(acc, t, [key_of(r[1], r[2]) for r in runs if r[0] == t and r[3] == 0]
                       + [f"trial{p[0]}" for p in pareto.get(t, [])]) for t in sorted({r[0] for r in runs})}
    return analysis.Inputs(results, {"pretrain_binary": {"memory_bytes": BASE}}, {}, {},
                           {t: _pareto_frame(t, p, acc) for t, p in pareto.items()}, preds)


def test_fixture_hypervolume_is_the_log_memory_one():
    """An independent path to SWEEP_JSON's hand numbers: the sweep stage's own function on the front points'
    (pareto True) retrained means."""
    from pipeline.train.sweep import log_hypervolume

    for target, points in PARETO.items():
        frame = _pareto_frame(target, points, ACC)
        front = frame[frame.pareto]
        for split, key in (("val", "hypervolume_log_memory"), ("test", "hypervolume_log_memory_test")):
            got = log_hypervolume(list(zip(front[f"{split}_acc"], front.memory_pct)), 0.0)
            assert round(got, 4) == SWEEP_JSON[target][key], (target, key)


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
    """Bullet lines, nested ones (`  - `) included."""
    return [l for l in text.splitlines() if l.startswith("- ") or l.startswith("  - ")]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------- intervals, by hand


def test_the_independent_interval_by_hand():
    """`crossed` (the tests' yardstick) on tA binary full's test matrix, worked by hand: seed 0 right on
    images 0-33, seed 1 on 0-35, 40 images. Mean 70/80 = .875. Seed means .85, .90 -> MS_seed = 40 (2 x
    .025^2) / 1 = .05. Image means: 34 at 1, 2 at .5, 4 at 0 -> SS = 34 x .125^2 + 2 x .375^2 + 4 x .875^2 =
    3.875, MS_image = 2 x 3.875 / 39 = 7.75 / 39. Residuals: +-.025 on the 38 images both seeds agree on,
    -+.475 on images 34 and 35 -> SS = 76 x .025^2 + 4 x .475^2 = .95, MS_res = .95 / 39. Var(mean) =
    (.05 + 7.75/39 - .95/39) / 80 = .22436 / 80; df = .22436^2 / (.05^2 + (7.75/39)^2 / 39 + (.95/39)^2 / 39)
    = 14.269."""
    var = (0.05 + 7.75 / 39 - 0.95 / 39) / 80
    df = (80 * var) ** 2 / (0.05 ** 2 + (7.75 / 39) ** 2 / 39 + (0.95 / 39) ** 2 / 39)
    assert df == pytest.approx(14.269, abs=1e-3)
    assert crossed(matrix(ACC, "tA", "full", "test")) == (0.875, pytest.approx(sps.t.ppf(0.975, df) * math.sqrt(var),
                                                                                rel=1e-12))
    # identical rows leave the images alone: tA serial val, 19 of 20 on both seeds -> 10.47 points
    assert crossed(matrix(ACC, "tA", "serial", "val"))[1] == pytest.approx(T19 * math.sqrt(0.05 * 0.95 / 19), abs=1e-4)


def test_mean_ci_and_the_printed_forms():
    # two seeds .89/.91: mean .90, half 12.7062 * .02 / 2; three seeds spaced .01: half 4.3027 * .01 / sqrt(3)
    assert mean_ci([0.89, 0.91]) == (pytest.approx(0.90, abs=1e-12), pytest.approx(T1 * 0.02 / 2, abs=1e-5))
    assert mean_ci([0.69, 0.70, 0.71]) == (pytest.approx(0.70, abs=1e-12), pytest.approx(T2 * 0.01 / math.sqrt(3), abs=1e-5))
    mean, half = mean_ci([0.7])  # one seed: the width is unknown, not zero
    assert mean == 0.7 and math.isnan(half)
    assert ci_pct(0.7, NAN) == "70.0% (1 seed)"
    assert ci_pct(0.965, 0.008) == "96.5% ± 0.8"
    assert ci_num(12.0, 25.4124) == "12.0 ± 25.4"
    assert ci_num(12.0, NAN) == "12.0" and ci_num(12.0, 0.0) == "12.0"
    # gaps in points with their interval; apart only when the interval excludes 0; only counted ones tallied
    t = Tally()
    assert t.gap(0.012, 0.008) == "+1.2 pts [+0.4, +2.0]"
    assert t.gap(-0.0125, 0.0375) == "-1.2 pts [-5.0, +2.5], not apart"
    assert t.gap(-0.03, 0.01) == "-3.0 pts [-4.0, -2.0]"
    assert t.gap(0.25, 0.0, count=False) == "+25.0 pts [+25.0, +25.0]"
    assert t.gap(0.0, 0.0) == "+0.0 pts [+0.0, +0.0], not apart"  # identical predictions: no difference
    assert t.gap(0.01, NAN) == "+1.0 pts (no interval)" and t.gap(NAN, 0.1) == "n/a"
    assert (t.n, t.apart) == (4, 2)


def test_bars_clip_to_the_quantitys_range():
    # accuracy .99 +- .05: down .05, up only to 1 -> .01; .50 +- .05 both ways; a time 1.0 +- 3.0: down to 0 -> 1.0
    bars = plots._bars([0.99, 0.50], [0.05, 0.05], 0, 1)
    assert bars.shape == (2, 2)
    assert bars[:, 0] == pytest.approx([0.05, 0.01]) and bars[:, 1] == pytest.approx([0.05, 0.05])
    assert plots._bars([1.0], [3.0], 0)[:, 0] == pytest.approx([1.0, 3.0])
    # unknown widths draw no bar (NaN -> 0); none known at all -> no error bars
    assert plots._bars([0.5, 0.6], [NAN, 0.1], 0, 1)[:, 0] == pytest.approx([0.0, 0.0])
    assert plots._bars([0.5], [NAN], 0, 1) is None and plots._bars([0.5], [0.0], 0, 1) is None


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


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return analysis.load_inputs(write_results_set(tmp_path_factory.mktemp("inputs") / "reports"))


def test_intro_and_data(rendered):
    md = rendered["md"]
    assert "as % of the binary base (10.00 KiB)." in md  # 10240 bytes / 1024
    # one row per prepare_*.json, sorted by dataset name
    assert table(section(md, "Data")) == [
        {"dataset": d, "classes": "5", "train": str(tr), "val": str(v), "test": str(te)}
        for d, (_, _, (tr, v, te)) in sorted(PREPARE.items())]


def test_protocol_lists_seeds_heads_sweeps_lr_at_an_end_and_flagged_runs(rendered):
    md = rendered["md"]
    assert md.index("## Data") < md.index("## Protocol") < md.index("## 1. Accuracy")
    lines = bullets(section(md, "Protocol"))
    # seeds in results.csv: 0, 1 and 2 (tA head)
    assert lines[0].startswith("- Reported seeds: 0, 1, 2; none took part in a choice")
    assert "`pipeline.stats.crossed_ci`" in lines[0] and "`paired_ci`" in lines[0]
    # new heads (head, bn, serial, parallel) all 8-bit; full's 32 is its own copy's, not a new head
    assert lines[2].startswith("- Every new head (head, BN thresholds, serial, parallel) is stored at 8-bit weights")
    # sweeps: tA 9 complete trials, 4 retrained (pareto.csv rows); tB 4 and 2
    assert lines[3].startswith("- Sweep on tA: 9 trials (") and "; 4 of them (its Pareto set" in lines[3]
    assert lines[4].startswith("- Sweep on tB: 4 trials (") and "; 2 of them (its Pareto set" in lines[4]
    # starred value first or last of what was searched (runs table order): tA bn "0.003, 0.01*", tA full fp32
    # "0.002*, ...", tA parallel "0.005, 0.01*", tB full fp32 "0.002*, 0.005", tB parallel "0.005*, ...";
    # not: interior stars, and tB full's single fixed value
    assert lines[5] == ("- Chosen lr still at an end of its search (a limit reached): tA/bn, tA/full_fp32, "
                        "tA/parallel, tB/full_fp32, tB/parallel.")
    # flagged: results rows tA serial seed 1 + tB head seed 0 = 2, plus pareto.csv tA trial 5's 1 = 3
    assert lines[6] == ("- Runs that hit their epoch cap while val accuracy was still rising: 3 (flagged in the "
                        "tables: their numbers are not converged).")
    assert len(lines) == 7


# ------------------------------------------------------------------------------- accuracies from predictions


def test_per_config_accuracies_come_from_the_predictions(inputs):
    """Every arm's val and test accuracy and interval are those of its seeds x images correctness matrix, not
    the per-seed numbers of results.csv (set to 0 here: nothing changes)."""
    cfg = inputs.config()
    pd.testing.assert_frame_equal(analysis.per_config(inputs.results.assign(val_acc=0.0, test_acc=0.0), inputs.preds),
                                  cfg)
    assert len(cfg) == 11  # tA: bn, full, full fp32, head, parallel, serial; tB: full, full fp32, head, parallel, serial
    for r in cfg.itertuples():
        assert (r.seeds, r.key) == (len(ACC[r.target][r.key][0]), key_of(r.method, r.precision))
        for split in ("val", "test"):
            m, h = crossed(matrix(ACC, r.target, r.key, split))
            assert getattr(r, f"{split}_acc") == pytest.approx(m, abs=1e-12), (r.target, r.key, split)
            assert getattr(r, f"{split}_acc_ci") == pytest.approx(h, rel=1e-9), (r.target, r.key, split)
    by = cfg.set_index(["target", "key"])
    # by hand: tA full test (34 + 36) / 80 = .875 with the half-width worked out above (11.34 points); tA head
    # val 5 of 20 on three identical seeds: .25 +- 2.0930 sqrt(.25 x .75 / 19) = .2079; tB serial test (one seed)
    # 31 / 40 = .775 +- 2.0227 sqrt(.775 x .225 / 39) = .1353
    assert by.loc[("tA", "full"), "test_acc"] == 0.875
    assert by.loc[("tA", "full"), "test_acc_ci"] == pytest.approx(0.11338, abs=1e-5)
    assert (by.loc[("tA", "head"), "val_acc"], by.loc[("tA", "head"), "val_acc_ci"]) == \
        (0.25, pytest.approx(T19 * math.sqrt(0.25 * 0.75 / 19), abs=1e-4))
    assert (by.loc[("tB", "serial"), "test_acc"], by.loc[("tB", "serial"), "test_acc_ci"]) == \
        (0.775, pytest.approx(T39 * math.sqrt(0.775 * 0.225 / 39), abs=1e-4))
    # the sweep's points carry pareto.csv's numbers through candidates()
    c = analysis.candidates(inputs, "tA").set_index("key")
    assert c.loc["trial9", "val_acc"] == 0.9 and c.loc["trial9", "test_acc"] == 0.925


def test_paired_uses_the_seeds_both_have(inputs):
    # tA head has seeds 0, 1, 2 and full 0, 1: the pair is seeds 0, 1. Head test 20, 22 vs full 34, 36: 14
    # images apart on each seed, images 20-33 and 22-35 -> -28 / 80 = -.35, with the crossed interval.
    d, h, _ = analysis.paired(inputs, "tA", "head", "full", "test")
    assert d == pytest.approx(-0.35, abs=1e-12)
    assert h == pytest.approx(crossed(matrix(ACC, "tA", "head", "test", [0, 1]) - matrix(ACC, "tA", "full", "test"))[1],
                              rel=1e-9)
    # one seed in common (tA parallel): the one-sample t interval over the 40 image differences
    d, h, df = analysis.paired(inputs, "tA", "parallel", "full", "test")
    diff = matrix(ACC, "tA", "parallel", "test") - matrix(ACC, "tA", "full", "test", [0])
    ci = sps.ttest_1samp(diff[0], 0.0).confidence_interval(0.95)
    assert (d, df) == (pytest.approx(5 / 40, abs=1e-12), 39)
    assert h == pytest.approx((ci.high - ci.low) / 2, rel=1e-9)
    # no seed in common: no comparison
    assert all(math.isnan(v) for v in analysis.paired(inputs, "tA", "serial", "no_such_arm", "test"))


# ------------------------------------------------------------------------------- question 1


def _keys(found) -> list[str]:
    return [r.key for r in found]


def test_question1_best_adapter_on_val_and_those_not_apart(inputs):
    # tA adapters <= 12%: trial 4 (3%, val 7/20), trial 2 (8%, 14), trial 9 (9%, 18), serial (10%, 19), parallel
    # (11%, 9); trial 5 (20%) is over. Best mean val: serial. Paired val gaps to serial (identical rows, so the
    # one-sample form on 20 images): trial 9 -1 image: -.05 +- .1047 -> holds 0 -> listed; trial 2 -5 images:
    # -.25 +- .2079 -> [-45.8, -4.2] apart; parallel (seed 0 only) -10: apart; trial 4 -12: apart.
    # On test the order would be parallel (39/40), trial 9 (37), trial 4 (35 mean), serial (34): val chooses.
    found = analysis.best_adapter(inputs, "tA", 0.12)
    assert _keys(found) == ["serial", "trial9"]
    assert found[0].source == "transfer stage" and found[1].source == "sweep trial 9"
    assert found[1].val_gap == pytest.approx(-0.05, abs=1e-12)
    assert found[1].val_gap_ci == pytest.approx(T19 * math.sqrt(0.05 * 0.95 / 19), abs=1e-4)
    tests = analysis.candidates(inputs, "tA").query("memory_ratio <= 0.12").sort_values("test_acc", ascending=False)
    assert list(tests.key) == ["parallel", "trial9", "trial4", "serial", "trial2"]
    for key, right in (("trial2", 14), ("parallel", 9), ("trial4", 7)):
        d, h = pair(ACC, "tA", key, "serial", "val")
        assert d == pytest.approx((right - 19) / 20) and apart(d, h), key
    # tB: only parallel (10%) is <= 12% (serial 15%, trials 13% and 30%)
    assert _keys(analysis.best_adapter(inputs, "tB", 0.12)) == ["parallel"]


def test_question1_budget_is_inclusive(inputs):
    # max_ratio .08: trial 4 (3%, val 7) and trial 2 (8% exactly, val 14) -> trial 2; trial 4 is 7 images
    # below it on val: -.35 +- 2.0930 sqrt(.35 x .65 / 19) = .229 -> apart, not listed. On test trial 4 (full's
    # own 34/36) beats trial 2 (28/30). tB: nothing <= 8% (parallel 10%).
    assert _keys(analysis.best_adapter(inputs, "tA", 0.08)) == ["trial2"]
    assert _keys(analysis.best_adapter(inputs, "tA", 0.0799)) == ["trial4"]
    assert analysis.best_adapter(inputs, "tB", 0.08) == []


def test_question1_none_below_budget(inputs):
    # 2%: the smallest adapter anywhere is tA's trial 4 at 3% (head 5% and bn 7.5% are no adapters)
    text, tab = accuracy_section(inputs, 0.02, Tally())
    assert bullets(text) == ["- **tA**: no adapter configuration reached <= 2% of the base's memory.",
                             "- **tB**: no adapter configuration reached <= 2% of the base's memory."]
    assert tab.empty


def test_question1_val_tie_goes_to_the_smaller_memory():
    # 375 val images. Transfer serial (5%), seeds right on 320 and 322 -> 642 / 750 = .856 from its predictions.
    # Sweep trial 1 (10%) has the same val predictions on both seeds, but its pareto.csv mean is written as the mean of
    # the seed means, (320/375 + 322/375) / 2 = 0.8560000000000001: an exact comparison would pick the 10%
    # trial. Equal val -> the smaller wins; the trial, paired difference 0 +- 0, is listed as not apart.
    acc = {"tC": {"images": {"val": 375, "test": 40}, "serial": ([320, 322], [30, 30]),
                  "trial1": ([320, 322], [32, 32])}}
    case = _inputs([("tC", "serial", "binary", s, 512.0, 5.0, 1.0, 9, False) for s in (0, 1)], acc,
                   {"tC": [(1, "parallel", 0.10, 0.86, True, 2, 2.0, 9, 0, {})]})
    assert case.config().val_acc[0] == 642 / 750
    case.pareto["tC"]["val_acc"] = (320 / 375 + 322 / 375) / 2
    assert case.pareto["tC"].val_acc[0] > case.config().val_acc[0]  # by one unit in the last place
    found = analysis.best_adapter(case, "tC", 0.12)
    assert _keys(found) == ["serial", "trial1"]
    assert (found[1].val_gap, found[1].val_gap_ci) == (0.0, 0.0)


def test_question1_section_paired_gaps(rendered):
    text = section(rendered["md"], "1. Accuracy")
    assert rendered["md"].count(
        "## 1. Accuracy: the best adapter at <= 12% task memory vs standard transfer learning\n") == 1
    refs = [("full", "binary full"), ("full_fp32", "fp32 full"), ("head", "head only"), ("bn", "BN thresholds + head")]
    # Which paired test gaps are apart, by hand (40 test images):
    # serial (33, 35) vs full (34, 36): one image less on each seed (#33, #35), -.025. MS_seed = 0, MS_image =
    #   2 (2 x .475^2 + 38 x .025^2) / 39 = .95/39 < MS_res = 1/39: the components fall below zero, so the image
    #   term alone: 2.0227 sqrt(.95/39/80) = .0353 -> [-6.0, +1.0], not apart
    # serial vs fp32 (seed 0: 33 vs 39): -6/40 = -.15 +- 2.0227 sqrt(.15 x .85 / 39) = .1157 -> apart
    # serial vs head (seeds 0, 1: 20, 22): +13 on each seed, +.325 -> apart
    # serial vs bn (32, 32): +1 and +3 -> +.05 with seed-to-seed spread (df 3.6) -> [-5.1, +15.1], not apart
    # trial 9 (37, 37) vs full: +3 and +1 -> +.05, the same -> not apart
    # trial 9 vs fp32: 37 vs 39 -> -.05 +- 2.0227 sqrt(.05 x .95 / 39) = .0706 -> not apart
    # trial 9 vs head: +17, +15 -> +.40 -> apart; vs bn: +5 on the same images both seeds -> +.125 +- .1071 -> apart
    # tB parallel (26) vs full (36): -.25 +- 2.0227 sqrt(.25 x .75 / 39) = .1403 -> apart; vs fp32 (28): -.05 ->
    #   not apart; vs head (16): +.25 -> apart. tB has no BN arm.
    expect_apart = {("tA", "serial"): [False, True, True, False], ("tA", "trial9"): [False, False, True, True],
                    ("tB", "parallel"): [True, False, True]}
    for (t, key), want in expect_apart.items():
        assert [apart(*pair(ACC, t, key, ref, "test")) for ref, _ in refs[:len(want)]] == want, (t, key)
    assert pair(ACC, "tA", "serial", "full_fp32", "test")[1] == pytest.approx(T39 * math.sqrt(0.15 * 0.85 / 39), abs=1e-4)
    assert pair(ACC, "tA", "serial", "full", "test")[1] == pytest.approx(T39 * math.sqrt(0.95 / 39 / 80), abs=1e-4)

    def said(t, key, n):
        return "; ".join(f"{gap(*pair(ACC, t, key, ref, 'test'))} vs {name} ({acc_text(ACC, t, ref)})"
                         for ref, name in refs[:n])

    # trial 9's val gap to serial: -1 of 20 images, -.05 +- .1047 -> "-5.0 pts [-15.5, +5.5], not apart"
    assert gap(*pair(ACC, "tA", "trial9", "serial", "val")) == "-5.0 pts [-15.5, +5.5], not apart"
    assert bullets(text) == [
        f"- **tA**: the best adapter at <= 12% task memory on val is serial g16 r1 last:3 4-bit (transfer stage, "
        f"10.0% of the base): test {acc_text(ACC, 'tA', 'serial')}; paired test difference {said('tA', 'serial', 4)}.",
        f"  - not apart from it on val (paired val gap -5.0 pts [-15.5, +5.5], not apart): serial g8 r1 last:2 4-bit "
        f"(sweep trial 9, 9.0%): test {acc_text(ACC, 'tA', 'trial9')}; {said('tA', 'trial9', 4)}.",
        f"- **tB**: the best adapter at <= 12% task memory on val is parallel g16 r1 last:3 4-bit (transfer stage, "
        f"10.0% of the base): test {acc_text(ACC, 'tB', 'parallel')}; paired test difference {said('tB', 'parallel', 3)}.",
    ]
    # e.g. serial 85.0% +- 12.0 vs binary full 87.5% +- 11.3: "-2.5 pts [-6.0, +1.0], not apart"
    assert said("tA", "serial", 1) == "-2.5 pts [-6.0, +1.0], not apart vs binary full (87.5% ± 11.3)"
    rows = table(text)
    assert [(r["target"], r["chosen on val"], r["adapter <= 12%"]) for r in rows] == [
        ("tA", "best", "serial g16 r1 last:3 4-bit (transfer stage, 10.0%)"),
        ("tA", "not apart from the best", "serial g8 r1 last:2 4-bit (sweep trial 9, 9.0%)"),
        ("tB", "best", "parallel g16 r1 last:3 4-bit (transfer stage, 10.0%)")]
    for r, (t, key) in zip(rows, expect_apart):
        assert r["adapter test acc"] == acc_text(ACC, t, key)
        for ref, name in refs:
            present = ref in ACC[t]
            assert r[name] == (acc_text(ACC, t, ref) if present else ""), (t, name)
            assert r[f"paired gap vs {name}"] == (gap(*pair(ACC, t, key, ref, "test")) if present else ""), (t, name)


# ------------------------------------------------------------------------------- question 3


def _pick(row) -> tuple | None:
    return None if row is None else (row.source, row.method, round(float(row.memory_ratio), 9))


def test_question3_smallest_within_k_by_the_paired_val_interval(inputs):
    # tA task states by memory, paired val gap to binary full (11 of 20 on both seeds; identical rows):
    #   trial 4 3%  7: -.20 (far below)          head 5%  5: -.30
    #   bn 7.5%     11, but #0 wrong and #11 right: mean 0, yet +-15.18 pts -> lower end -15.2: within on its mean,
    #               not by its interval -> never chosen
    #   trial 2 8%  14: +.15 +- 17.15 -> lower -2.1: within 3 points (> -3), not within 1 -> the 3-point answer
    #   trial 9 9%  18: +.35 +- 2.0930 sqrt(.35 x .65 / 19) = .229 -> lower +12.1: the 1-point answer
    # On test, trial 4 has binary full's own predictions (gap 0 +- 0): it would win both; its val does not.
    assert pair(ACC, "tA", "bn", "full", "val") == (0.0, pytest.approx(T19 * math.sqrt(2 / 19 / 20), abs=1e-4))
    assert pair(ACC, "tA", "trial2", "full", "val")[1] == pytest.approx(T19 * math.sqrt(0.15 * 0.85 / 19), abs=1e-4)
    assert pair(ACC, "tA", "trial4", "full", "test") == (0.0, 0.0)
    one, three = analysis.smallest_within(inputs, "tA", 1), analysis.smallest_within(inputs, "tA", 3)
    assert _pick(one) == ("sweep trial 9", "serial", 0.09)
    assert _pick(three) == ("sweep trial 2", "parallel", 0.08)
    assert (three.val_gap, three.val_gap_ci) == (pytest.approx(0.15), pytest.approx(T19 * math.sqrt(0.15 * 0.85 / 19), abs=1e-4))
    # the bn state's 0-point mean would pass a rule on means alone, at 7.5% (smaller than both answers)
    assert _pick(analysis.smallest_within(inputs, "tA", 16)) == ("transfer stage", "bn", 0.075)
    # tB (one seed; full 16 of 20): parallel 12 (-.20), serial 18 (+.10 +- 14.4: lower -4.4), trial 0 19 (+.15,
    # lower -2.1), trial 1 18 (lower -4.4), head 8 -> nothing within 1 point; within 3: trial 0 (13%)
    assert analysis.smallest_within(inputs, "tB", 1) is None
    assert _pick(analysis.smallest_within(inputs, "tB", 3)) == ("sweep trial 0", "serial", 0.13)
    assert _pick(analysis.most_accurate(inputs, "tB")) == ("sweep trial 0", "serial", 0.13)  # val 19 of 20


def test_question3_never_at_or_above_base_size_and_none():
    # Hand-built, one seed, 20 val images. tF: full right on 10.
    #   head     5%    10, but #0 wrong and #10 right: mean 0, +-15.18 pts -> never within 1 or 3
    #   bn       10%   13: +.15 +- 17.15 -> lower -2.1: within 3, not 1
    #   parallel 12.5% 14: +.20 +- 2.0930 sqrt(.2 x .8 / 19) = .1921 -> lower +.8: within 1
    #   trial 7  100%  20 (all right: +.50, the best of all) at the base's size: never an answer
    # tG: full right on 15; bn 15 with #0 wrong and #15 right (mean 0, +-15.2), serial 14 (-.05), trial 7 at
    #   150% right on 15 like full image for image (0 +- 0, it would qualify for any k): nothing qualifies.
    acc = {"tF": {"full": ([10], [30]), "head": ([(10, (0, 10))], [28]), "bn": ([13], [29]), "parallel": ([14], [31]),
                  "trial7": ([20], [40])},
           "tG": {"full": ([15], [30]), "bn": ([(15, (0, 15))], [30]), "serial": ([14], [29]), "trial7": ([15], [30])}}
    runs = [("tF", "full", "binary", 0, BASE, 8.0, 1.0, 9, False), ("tF", "head", "binary", 0, 512.0, 1.0, 0.2, 9, False),
            ("tF", "bn", "binary", 0, 1024.0, 2.0, 0.3, 9, False),
            ("tF", "parallel", "binary", 0, 1280.0, 4.0, 0.5, 9, False),
            ("tG", "full", "binary", 0, BASE, 8.0, 1.0, 9, False), ("tG", "bn", "binary", 0, 768.0, 2.0, 0.3, 9, False),
            ("tG", "serial", "binary", 0, 1024.0, 3.0, 0.4, 9, False)]
    sweep = {"tF": [(7, "serial", 1.0, 0.99, True, 1, 2.0, 9, 0, {})],
             "tG": [(7, "serial", 1.5, 0.99, True, 1, 2.0, 9, 0, {})]}
    case = _inputs(runs, acc, sweep)
    assert pair(acc, "tF", "parallel", "full", "val")[1] == pytest.approx(T19 * math.sqrt(0.2 * 0.8 / 19), abs=1e-4)
    assert _pick(analysis.smallest_within(case, "tF", 1)) == ("transfer stage", "parallel", 0.125)
    assert _pick(analysis.smallest_within(case, "tF", 3)) == ("transfer stage", "bn", 0.10)
    assert _pick(analysis.smallest_within(case, "tF", 0.5)) == ("transfer stage", "parallel", 0.125)
    assert _pick(analysis.most_accurate(case, "tF")) == ("transfer stage", "parallel", 0.125)  # not trial 7
    for k in (1, 3, 10):  # bn's lower end -15.2 and serial's -15.5 stay below -10 too
        assert analysis.smallest_within(case, "tG", k) is None, k
    assert _pick(analysis.most_accurate(case, "tG")) == ("transfer stage", "bn", 0.075)  # .75 > serial's .70
    # question 1 has no such floor: at a budget of 100% the 100% point (val 20) is the best adapter, and
    # parallel (14: -.30 +- 2.0930 sqrt(.3 x .7 / 19) = .2200) is apart from it
    assert _keys(analysis.best_adapter(case, "tF", 1.0)) == ["trial7"]
    # the size section: tF's answers with their band positions; tG: none, the most accurate named
    text, _ = size_section(case, (0.07, 0.12), Tally())
    lines = bullets(text)
    assert lines[0].startswith("- **tF**, within 1 point: parallel g16 r1 last:3 4-bit (transfer stage), 12.50% of the "
                               "base (n/a); paired val gap to binary full +20.0 pts [+0.8, +39.2];")
    assert lines[0].endswith("; above the prior study's 7%-12% band.")
    assert lines[1].startswith("- **tF**, within 3 points: BN thresholds + head, BN 32-bit (transfer stage), 10.00% ")
    assert lines[1].endswith("; inside the prior study's 7%-12% band.")
    top = (" The most accurate on val is BN thresholds + head, BN 32-bit (transfer stage, 7.50% of the base): val gap "
           "+0.0 pts [-15.2, +15.2], not apart.")
    assert lines[2:] == [
        "- **tG**: no task state below the base's size has a paired val gap to binary full finetuning whose interval "
        f"stays above -1 point.{top}",
        "- **tG**: no task state below the base's size has a paired val gap to binary full finetuning whose interval "
        f"stays above -3 points.{top}"]


def test_question3_section(rendered):
    text = section(rendered["md"], "3. Size")
    bd9 = "weights 0.35, scales 0.05, BN 0.00, head 0.50, masks 0.00 KiB"  # 358.4, 51.2, 0, 512, 0 bytes / 1024
    full_a, full_b = acc_text(ACC, "tA", "full"), acc_text(ACC, "tB", "full")
    g9, g2, g0 = (gap(*pair(ACC, t, k, "full", "test")) for t, k in (("tA", "trial9"), ("tA", "trial2"), ("tB", "trial0")))
    # test gaps to full, by hand: trial 9 +.05 [-5.1, +15.1] not apart (as in question 1); trial 2 (28, 30 vs 34,
    # 36): -6 on each seed, -.15 -> apart; tB trial 0 (35 vs 36): -1/40 -> not apart
    assert [apart(*pair(ACC, t, k, "full", "test")) for t, k in (("tA", "trial9"), ("tA", "trial2"), ("tB", "trial0"))] \
        == [False, True, False]
    # val gaps: trial 9 +7 of 20 (+35.0 [+12.1, +57.9]); trial 2 and tB trial 0 +3 (+15.0 [-2.1, +32.1], not apart)
    v9, v3 = "+35.0 pts [+12.1, +57.9]", "+15.0 pts [-2.1, +32.1], not apart"
    assert bullets(text) == [
        f"- **tA**, within 1 point: serial g8 r1 last:2 4-bit (sweep trial 9), 9.00% of the base ({bd9}); paired val "
        f"gap to binary full {v9}; test {acc_text(ACC, 'tA', 'trial9')} vs full's {full_a}, paired {g9}; inside the "
        "prior study's 7%-12% band.",
        f"- **tA**, within 3 points: parallel g8 r1 last:2 4-bit (sweep trial 2), 8.00% of the base (n/a); paired val "
        f"gap to binary full {v3}; test {acc_text(ACC, 'tA', 'trial2')} vs full's {full_a}, paired {g2}; inside the "
        "prior study's 7%-12% band.",
        "- **tB**: no task state below the base's size has a paired val gap to binary full finetuning whose interval "
        "stays above -1 point. The most accurate on val is serial g8 r1 last:2 4-bit (sweep trial 0, 13.00% of the "
        f"base): val gap {v3}.",
        f"- **tB**, within 3 points: serial g8 r1 last:2 4-bit (sweep trial 0), 13.00% of the base (n/a); paired val "
        f"gap to binary full {v3}; test {acc_text(ACC, 'tB', 'trial0')} vs full's {full_b}, paired {g0}; above the "
        "prior study's 7%-12% band.",
    ]
    assert table(text) == [
        {"target": "tA", "within": "1 pt", "smallest state (on val)": "serial g8 r1 last:2 4-bit (sweep trial 9)",
         "memory": "9.00%", "breakdown": bd9, "val gap vs full": v9, "test acc": acc_text(ACC, "tA", "trial9"),
         "paired test gap vs full": g9},
        {"target": "tA", "within": "3 pt", "smallest state (on val)": "parallel g8 r1 last:2 4-bit (sweep trial 2)",
         "memory": "8.00%", "breakdown": "n/a", "val gap vs full": v3, "test acc": acc_text(ACC, "tA", "trial2"),
         "paired test gap vs full": g2},
        {"target": "tB", "within": "1 pt", "smallest state (on val)": "none", "memory": "", "breakdown": "",
         "val gap vs full": "", "test acc": "", "paired test gap vs full": ""},
        {"target": "tB", "within": "3 pt", "smallest state (on val)": "serial g8 r1 last:2 4-bit (sweep trial 0)",
         "memory": "13.00%", "breakdown": "n/a", "val gap vs full": v3, "test acc": acc_text(ACC, "tB", "trial0"),
         "paired test gap vs full": g0},
    ]


# ------------------------------------------------------------------------------- question 2, tally, in short


def ratio_by_hand(a: list[float], f: list[float]) -> tuple[float, float, float]:
    """exp of the mean of log(a / f) over seeds, with the Student t interval over seeds (one seed: none)."""
    logs = [math.log(x / y) for x, y in zip(a, f)]
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(m), NAN, NAN
    h = sps.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def _times(target, method, precision, col) -> list[float]:
    i = {"train_time_s": 5, "epoch_time_s": 6}[col]
    return [r[i] for r in RUNS if r[:3] == (target, method, precision)]


def _ratio_text(r) -> str:
    m, lo, hi = r
    return f"{m:.2f}x" if math.isnan(lo) else f"{m:.2f}x [{lo:.2f}, {hi:.2f}]"


def test_question2_time_ratios(rendered, inputs):
    # tA serial vs binary full, seeds 0 and 1: train log(5.0/11.9) = -.86710, log(5.6/12.1) = -.77044; mean
    # -.81877 -> .4410; half 12.7062 x .09666 / 2 = .61410 -> [exp(-1.43287), exp(-.20467)] = [.2386, .8149].
    # Epoch: log(1.1/2.0) = -.59784, log(1.1/2.4) = -.78016; mean -.68900 -> .502; half 12.7062 x .18232 / 2 =
    # 1.15831 -> [.158, 1.599].
    r = analysis.time_ratios(inputs, "tA", "serial")
    assert r["train_time_s"] == pytest.approx((0.44098, 0.23863, 0.81492), abs=1e-4)
    assert r["epoch_time_s"] == pytest.approx((0.50208, 0.15765, 1.59890), abs=1e-4)
    # head (3 seeds) pairs with full on seeds 0 and 1 only; tA parallel and every tB arm: one seed, no interval
    assert analysis.time_ratios(inputs, "tA", "head")["train_time_s"] == \
        pytest.approx(ratio_by_hand([1.8, 2.0], [11.9, 12.1]), rel=1e-9)
    assert analysis.time_ratios(inputs, "tB", "parallel")["train_time_s"][0] == pytest.approx(0.75)
    assert math.isnan(analysis.time_ratios(inputs, "tB", "parallel")["train_time_s"][1])

    text = section(rendered["md"], "2. Training time")
    rows = []
    for t in ("tA", "tB"):
        for method, precision in (("full", "fp32"), ("head", "binary"), ("bn", "binary"), ("serial", "binary"),
                                  ("parallel", "binary")):
            if (t, method, precision) not in LR:
                continue
            ratios = {}
            for col in ("epoch_time_s", "train_time_s"):  # the seeds both have: 0..n-1 of the shorter
                a, f = _times(t, method, precision, col), _times(t, "full", "binary", col)
                ratios[col] = ratio_by_hand(a[:len(f)], f[:len(a)])
                got = analysis.time_ratios(inputs, t, method, precision)[col]
                assert got == pytest.approx(ratios[col], rel=1e-9, nan_ok=True), (t, method, precision, col)
            epoch, train = (mean_ci(_times(t, method, precision, c)) for c in ("epoch_time_s", "train_time_s"))
            epochs = [statistics.fmean(r[7] for r in RUNS if r[:3] == (t, m, p)) for m, p in ((method, precision),
                                                                                              ("full", "binary"))]
            peak, act = TRAIN_MEM[(method, precision)]
            rows.append({"target": t, "method": method if precision == "binary" else f"{method} ({precision})",
                         "epoch s": ci_num(*epoch, "{:.2f}"), "epoch time vs binary full": _ratio_text(ratios["epoch_time_s"]),
                         "train s": ci_num(*train), "train time vs binary full": _ratio_text(ratios["train_time_s"]),
                         "epochs run": f"{epochs[0]:.1f} vs {epochs[1]:.1f}", "peak training memory": f"{peak / 1024:,.0f} KiB",
                         "of which activations": f"{act / 1024:,.0f} KiB"})
    assert table(text) == rows
    # spot checks by hand: tA fp32 20 / 11.9 = 1.68x, 1,200 KiB; serial's train 5.3 +- 12.7062 x .3 = 3.8
    assert rows[0]["train time vs binary full"] == "1.68x" and rows[0]["peak training memory"] == "1,200 KiB"
    assert rows[3]["train s"] == "5.3 ± 3.8" and rows[3]["train time vs binary full"] == "0.44x [0.24, 0.81]"
    assert bullets(text) == [
        "- **tA**, serial: epoch time 0.50x [0.16, 1.60] and total training time 0.44x [0.24, 0.81] those of binary "
        "full finetuning (paired over seeds, 95% interval); peak training memory 100 KiB vs 400 KiB.",
        "- **tA**, parallel: epoch time 0.28x and total training time 0.25x those of binary full finetuning (paired "
        "over seeds, 95% interval); peak training memory 80 KiB vs 400 KiB.",
        "- **tB**, serial: epoch time 0.25x and total training time 0.25x those of binary full finetuning (paired "
        "over seeds, 95% interval); peak training memory 100 KiB vs 400 KiB.",
        "- **tB**, parallel: epoch time 0.75x and total training time 0.75x those of binary full finetuning (paired "
        "over seeds, 95% interval); peak training memory 80 KiB vs 400 KiB.",
    ]


def test_tally_counts_the_paired_gaps_of_sections_1_and_3(rendered):
    md = rendered["md"]
    # the counted comparisons are the paired test gaps (section 1: each listed adapter vs each reference;
    # section 3: each answer vs binary full); val gaps are the choosing rule's and are not counted
    gaps = [v for r in table(section(md, "1. Accuracy")) for k, v in r.items() if k.startswith("paired gap vs") and v]
    gaps += [r["paired test gap vs full"] for r in table(section(md, "3. Size")) if r["paired test gap vs full"]]
    # by hand: section 1 tA serial 4 (2 apart), trial 9 4 (2 apart), tB parallel 3 (2 apart); section 3 tA
    # trial 9 (not), trial 2 (apart), tB trial 0 (not): 14 comparisons, 7 apart
    assert len(gaps) == 14 and sum("not apart" not in g for g in gaps) == 7
    assert ("Paired comparisons stated in sections 1 and 3: 14, of which 7 are apart (95% interval excluding 0)."
            in md)


def test_in_short(rendered):
    lines = bullets(section(rendered["md"], "In short"))
    # tA: the best at <= 12% in the 7%-12% band is serial (10%). Its gap to binary full, [-6.0, +1.0], is neither
    # inside [-5, 0] nor clear of it -> "not pinned down"; training time 0.44x [0.24, 0.81] lies below 1 -> faster.
    # tB: parallel (10%): -25.0 [-39.0, -11.0], the whole interval below -5 points -> "more than a few points
    # below"; one seed: no time interval -> "not apart in time".
    def head(t, key):
        return (f"reaches {acc_text(ACC, t, key)} test, {gap(*pair(ACC, t, key, 'full', 'test'))} vs binary full "
                f"finetuning ({acc_text(ACC, t, 'full')}); {gap(*pair(ACC, t, key, 'full_fp32', 'test'))} vs fp32 full "
                f"({acc_text(ACC, t, 'full_fp32')}). Prior claim, point by point: a few points below standard transfer "
                "learning: ")

    assert lines == [
        "- **tA**: the best adapter at <= 12% (serial g16 r1 last:3 4-bit, 10.0% of the base) " + head("tA", "serial")
        + "not pinned down to a few points; faster to train: faster (training time 0.44x [0.24, 0.81] binary full's, "
          "serial arm, paired over seeds).",
        "- **tB**: the best adapter at <= 12% (parallel g16 r1 last:3 4-bit, 10.0% of the base) " + head("tB", "parallel")
        + "more than a few points below; faster to train: not apart in time (training time 0.75x binary full's, "
          "parallel arm, paired over seeds).",
    ]
    assert gap(*pair(ACC, "tB", "parallel", "full", "test")) == "-25.0 pts [-39.0, -11.0]"


# ------------------------------------------------------------------------------- the other tables


def test_runs_table(rendered):
    rows = table(section(rendered["md"], "All transfer runs"))
    assert list(rows[0]) == ["target", "method", "precision", "task state", "seeds", "val acc", "test acc",
                             "task memory", "of which", "train s", "epochs run", "lr",
                             "lr searched (selection seed, * chosen)", "hit cap improving"]
    # per_config order (target, method, precision); memory bytes / 1024 and / 10240; train s mean +- t half over
    # seeds; epochs mean; the breakdown in KiB (full: blank; rows without breakdown columns: n/a)
    arms = [("tA", "bn", "binary", "BN thresholds + head, BN 16-bit", "0.75 KiB (7.5%)",
             "weights 0.00, scales 0.00, BN 0.25, head 0.50, masks 0.00 KiB", "3.0 ± 1.3", "10.0", 0),
            ("tA", "full", "binary", "", "10.00 KiB (100.0%)", "", "12.0 ± 1.3", "13.0", 0),
            ("tA", "full", "fp32", "", "320.00 KiB (3200.0%)", "", "20.0", "10.0", 0),
            ("tA", "head", "binary", "head only", "0.50 KiB (5.0%)",
             "weights 0.00, scales 0.00, BN 0.00, head 0.50, masks 0.00 KiB", "2.0 ± 0.5", "10.0", 0),
            ("tA", "parallel", "binary", "parallel g16 r1 last:3 4-bit", "1.10 KiB (11.0%)", "n/a", "3.0", "8.0", 0),
            ("tA", "serial", "binary", "serial g16 r1 last:3 4-bit", "1.00 KiB (10.0%)",
             "weights 0.47, scales 0.03, BN 0.00, head 0.50, masks 0.00 KiB", "5.3 ± 3.8", "13.0", 1),
            ("tB", "full", "binary", "", "10.00 KiB (100.0%)", "", "8.0", "9.0", 0),
            ("tB", "full", "fp32", "", "320.00 KiB (3200.0%)", "", "16.0", "10.0", 0),
            ("tB", "head", "binary", "head only", "0.50 KiB (5.0%)", "n/a", "1.2", "15.0", 1),
            ("tB", "parallel", "binary", "parallel g16 r1 last:3 4-bit", "1.00 KiB (10.0%)", "n/a", "6.0", "12.0", 0),
            ("tB", "serial", "binary", "serial g16 r1 last:3 4-bit", "1.50 KiB (15.0%)", "n/a", "2.0", "7.0", 0)]
    want = []
    for t, m, p, state, mem, of, train, epochs, cap in arms:
        key = key_of(m, p)
        lr, searched = LR[(t, m, p)]
        want.append({"target": t, "method": m, "precision": p, "task state": state, "seeds": str(len(ACC[t][key][0])),
                     "val acc": acc_text(ACC, t, key, "val"), "test acc": acc_text(ACC, t, key), "task memory": mem,
                     "of which": of, "train s": train, "epochs run": epochs, "lr": f"{lr:g}",
                     "lr searched (selection seed, * chosen)": searched, "hit cap improving": str(cap)})
    assert rows == want
    # e.g. tA serial val 19/20 on both seeds: 95.0% +- 2.0930 sqrt(.05 x .95 / 19) = 10.5 points
    assert rows[5]["val acc"] == "95.0% ± 10.5"


def test_sweep_table(rendered):
    rows = table(section(rendered["md"], "Sweeps"))
    got = [(r["target"], int(r["complete trials"]), int(r["failed"]), int(r["trials at cap, improving"]),
            int(r["Pareto points"]), int(r["retrained"]), int(r["seeds each"]), r["memory range"],
            float(r["hypervolume, log10 memory 1-100% (val)"]), float(r["same (test, reported only)"])) for r in rows]
    # hypervolumes as derived beside SWEEP_JSON; memory range = the retrained points' min-max memory %
    assert got == [("tA", 9, 1, 2, 3, 4, 2, "3.0-20.0%", 1.1082, 1.3848),
                   ("tB", 4, 0, 0, 2, 2, 1, "13.0-30.0%", 0.8418, 0.8014)]


def test_stage_wall_times_and_total(rendered):
    text = section(rendered["md"], "Where the time goes")
    got = {r["stage"]: float(r["wall_time_s"]) for r in table(text)}
    assert got == STAGE_TIMES
    assert sum(STAGE_TIMES.values()) == TOTAL_WALL
    assert "Total stage wall time: 222 s." in text


def test_stage_names_with_underscores_in_dataset_names():
    from pipeline.report.analysis import dvc_stage

    assert [dvc_stage(s) for s in ("prepare_mnist_0to4", "pretrain_fp32", "sweep_uci_digits", "transfer_mnist_5to9_full",
                                   "transfer_uci_digits_full_fp32", "transfer_my_set_parallel")] == \
        ["prepare@mnist_0to4", "pretrain@fp32", "sweep@uci_digits", "baseline@mnist_5to9-full",
         "transfer_fp32@uci_digits", "transfer@my_set-parallel"]
    # the BN-thresholds arm is its own foreach stage (dvc.yaml `bn`); the head arm stays a baseline
    assert [dvc_stage(s) for s in ("transfer_mnist_5to9_bn", "transfer_my_set_bn", "transfer_uci_digits_head")] == \
        ["bn@mnist_5to9", "bn@my_set", "baseline@uci_digits-head"]


def test_provenance(rendered):
    text = section(rendered["md"], "How this was produced")
    sha = hashlib.sha256(rendered["params_file"].read_bytes()).hexdigest()[:16]
    lines = bullets(text)
    assert f"- params.yaml sha256: `{sha}`" in lines
    for name, (_, train_sha, _) in PREPARE.items():
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
        "plots/sweep_tB.png", "plots/training_time.png", "plots/learning_curves.png", "plots/storage_for_tasks.png"]
    for i, line in embeds:
        caption = line[2:line.index("](")]
        assert caption and figures[i + 2] == f"*{caption}*"
    assert "the 7%-12% band shaded" in figures[embeds[0][0]]
    assert "The sweep on tB: its trials" in figures[embeds[3][0]]
    assert "N = 1..10 tasks" in figures[embeds[6][0]]


def test_plots_draw_the_bn_arm(inputs, monkeypatch, tmp_path):
    """Every figure names the BN-thresholds arm where it was run (tA only)."""
    labels_of = {}

    def keep(fig, path, dpi):
        labels_of[path.name] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        plots.plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    for t in ("tA", "tB"):
        plots.accuracy_vs_memory(inputs, t, (0.07, 0.12), tmp_path / f"acc_{t}.png", DPI)
    plots.training_time(inputs, tmp_path / "time.png", DPI)
    plots.learning_curves(inputs, tmp_path / "curves.png", DPI)
    plots.storage_for_tasks(inputs, 10, tmp_path / "storage.png", DPI)
    bn = "BN thresholds + head"
    assert bn in labels_of["acc_tA.png"] and bn not in labels_of["acc_tB.png"]
    assert bn in labels_of["time.png"]
    assert labels_of["curves.png"].count(bn) == 1  # tA's panel, once for its two seeds
    # the binary full line's label: its test accuracy from the predictions, (34 + 36) / 80 = 87.5%
    assert "full finetune (binary): 87.5%" in labels_of["acc_tA.png"]
    # bn's task memory: 768 bytes = 0.75 KiB, printed at one decimal (0.75 is exact: half to even -> 0.8)
    assert f"binary base + N x {bn} (0.8 KiB each)" in labels_of["storage.png"]


# ------------------------------------------------------------------------------- names and breakdowns


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
    acc = {"tH": {"serial": ([16, 16], [32, 32])}}
    rows = _results([("tH", "serial", "binary", s, task, 1.0, 0.1, 9, False) for s, task in enumerate((1106.0, 1031.5))],
                    acc, {}, {})
    for k, m in zip(MEM, zip(*mem)):
        rows[k] = m
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


def test_candidates_name_every_task_state_with_its_breakdown(inputs):
    # tA: the transfer stage's configurations in per_config order (bn, head, parallel, serial; full is no task
    # state), then the sweep's retrained points in pareto.csv order (4, 2, 9, 5), each with its run-key prefix.
    # Question 1's default (adapters) drops bn and head.
    c = analysis.candidates(inputs, "tA", analysis.TASK_STATES)
    got = [(r.key, r.source, r.config, round(r.memory_ratio, 9)) for r in c.itertuples()]
    sweep = "g8 r1 last:2 4-bit"
    assert got == [("bn", "transfer stage", "BN thresholds + head, BN 16-bit", 0.075),
                   ("head", "transfer stage", "head only", 0.05),
                   ("parallel", "transfer stage", "parallel g16 r1 last:3 4-bit", 0.11),
                   ("serial", "transfer stage", "serial g16 r1 last:3 4-bit", 0.10),
                   ("trial4", "sweep trial 4", f"serial {sweep}", 0.03),
                   ("trial2", "sweep trial 2", f"parallel {sweep}", 0.08),
                   ("trial9", "sweep trial 9", f"serial {sweep}", 0.09),
                   ("trial5", "sweep trial 5", "parallel g4 r1 all 1-bit +task BN pruned 0.5", 0.20)]
    by = {r.key: tuple(getattr(r, m) for m in MEM) for r in c.itertuples()}
    assert by["bn"] == (0.0, 0.0, 256.0, 512.0, 0.0)
    assert by["serial"] == (480.0, 32.0, 0.0, 512.0, 0.0)
    assert by["trial5"] == (256.0, 256.0, 512.0, 512.0, 512.0)
    assert all(math.isnan(v) for v in by["trial4"])
    assert list(analysis.candidates(inputs, "tA").key) == ["parallel", "serial", "trial4", "trial2", "trial9", "trial5"]


# ------------------------------------------------------------------------------- missing inputs


@pytest.mark.parametrize("rel, maker", [("results.csv", "results"),
                                         ("predictions/tB.npz", "results"),
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
