"""The report stage: a hand-written results set (no training) -> report.md and plots, every number
in report.md checked against a hand calculation on the fixture; missing inputs; PNG sizes; and a
real `dvc repro` where a report-only params change reruns only `report`.

Fixture at a glance (base = binary base memory = 10240 bytes = 10.00 KiB; band 7%-12%; budget 12%):

target tA                      seeds  val             test          ratio  train s     epoch s     t95 s
  full   binary                2      .89/.91         .90/.92       1.00   10.0/14.0   2.0/2.4     4.0/6.0
  full   fp32                  1      .93             .94           32.0   20.0        4.0         8.0
  head   binary                1      .72             .70           .05    2.0         0.4         1.0
  serial binary                2      .8125/.9375     .86/.88       .10    5.0/5.8     1.1/1.1     1.5/2.5
  parallel binary              1      .85             .95           .11    3.0         0.55        1.0
  Pareto (sweep): trial 4 serial .03 val .80 test .895 | trial 2 parallel .08 val .84 test .905 |
                  trial 9 serial .09 val .875 test .89 | trial 5 parallel .20 val .96 test .93
target tB (one seed each)
  full   binary                1      .78             .80           1.00   8.0         1.6         0.0
  full   fp32                  1      .81             .82           32.0   16.0        3.2         6.0
  head   binary                1      .58             .60           .05    1.2         0.24        0.5
  serial binary                1      .74             .77           .15    2.0         0.4         1.0
  parallel binary              1      .70             .75           .10    6.0         1.2         3.0
  Pareto (sweep): trial 0 serial .13 val .74 test .785 | trial 1 parallel .30 val .78 test .78
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
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
from pipeline.report.markdown import accuracy_section
from pipeline.stages import report

BASE = 10240.0     # binary base, bytes (10.00 KiB)
FP32 = 327680.0    # fp32 base, bytes (320 KiB)
ADAPTER = {"groups": 16, "reduction": 1, "placement": "last:3", "adapter_bits": 4, "head_bits": 8,
           "prune_amount": 0.0, "task_bn": False}
NONE = {"groups": 0, "reduction": 0, "placement": "none", "adapter_bits": 0, "head_bits": 32, "prune_amount": 0.0}
# train_transfer's row, column for column (transfer_keys first)
COLUMNS = ["target", "method", "precision", "adapter_type", "groups", "reduction", "placement", "adapter_bits",
           "head_bits", "prune_amount", "task_bn", "seed", "sparsity", "val_acc", "test_acc", "task_memory_bytes",
           "adapter_memory_bytes", "base_memory_bytes", "memory_ratio", "train_time_s", "epoch_time_s",
           "time_to_95_s", "trainable_params", "epochs", "epochs_run", "packed_payload_bytes"]
PARETO_COLUMNS = ["number", "method", "groups", "reduction", "placement", "task_bn", "bits", "head_bits",
                  "prune_amount", "lr", "val_acc", "test_acc", "task_memory_bytes", "memory_ratio", "memory_pct"]
TRIAL_COLUMNS = ["number", "state", "val_acc", "task_memory_bytes", "method", "groups", "reduction", "placement",
                 "task_bn", "bits", "head_bits", "prune_amount", "lr", "memory_ratio", "adapter_memory_bytes",
                 "sparsity", "train_time_s", "epochs_run", "fail_reason", "adapter", "duration_s"]
# (target, method, precision, seed, val, test, task bytes, train s, epoch s, time to 95 s)
RUNS = [
    ("tA", "full", "binary", 0, 0.89, 0.90, BASE, 10.0, 2.0, 4.0),
    ("tA", "full", "binary", 1, 0.91, 0.92, BASE, 14.0, 2.4, 6.0),
    ("tA", "full", "fp32", 0, 0.93, 0.94, FP32, 20.0, 4.0, 8.0),
    ("tA", "head", "binary", 0, 0.72, 0.70, 512.0, 2.0, 0.4, 1.0),
    ("tA", "parallel", "binary", 0, 0.85, 0.95, 1126.4, 3.0, 0.55, 1.0),    # best test, but val .85 < .875
    ("tA", "serial", "binary", 0, 0.8125, 0.86, 1024.0, 5.0, 1.1, 1.5),
    ("tA", "serial", "binary", 1, 0.9375, 0.88, 1024.0, 5.8, 1.1, 2.5),     # val mean .875 (exact in binary)
    ("tB", "full", "binary", 0, 0.78, 0.80, BASE, 8.0, 1.6, 0.0),           # never reached 95%: t95 = 0
    ("tB", "full", "fp32", 0, 0.81, 0.82, FP32, 16.0, 3.2, 6.0),
    ("tB", "head", "binary", 0, 0.58, 0.60, 512.0, 1.2, 0.24, 0.5),
    ("tB", "parallel", "binary", 0, 0.70, 0.75, 1024.0, 6.0, 1.2, 3.0),
    ("tB", "serial", "binary", 0, 0.74, 0.77, 1536.0, 2.0, 0.4, 1.0),      # best val, but 15% > budget
]
# (number, method, memory_ratio, val, test)
PARETO = {
    "tA": [(4, "serial", 0.03, 0.80, 0.895), (2, "parallel", 0.08, 0.84, 0.905),
           (9, "serial", 0.09, 0.875, 0.89), (5, "parallel", 0.20, 0.96, 0.93)],
    "tB": [(0, "serial", 0.13, 0.74, 0.785), (1, "parallel", 0.30, 0.78, 0.78)],
}
SWEEP_JSON = {  # hypervolume by hand (ref acc 0, memory 100%): non-dominated on test, strips in memory %
    # tA: (3..8) x .895 + (8..20) x .905 + (20..100) x .93 = 4.475 + 10.86 + 74.4 = 89.735
    "tA": {"complete": 9, "failed": 1, "fail_number": 7, "pareto_size": 4, "hypervolume": 89.735, "best_test_acc_le_12pct": 0.905,
           "wall_time_s": 40.0},
    # tB: (13..100) x .785 = 68.295 (trial 1 is dominated on test)
    "tB": {"complete": 4, "failed": 0, "fail_number": None, "pareto_size": 2, "hypervolume": 68.295, "best_test_acc_le_12pct": None,
           "wall_time_s": 35.5},
}
# stage wall times: prepare 1.0 + 1.5 + 2.5 = 5.0; pretrain 30.0 + 25.0 = 55.0;
# transfer tA 12.5 + 20.5 + 2.5 + 6.5 + 3.5 = 45.5; transfer tB 9.0 + 17.0 + 1.5 + 2.5 + 7.0 = 37.0;
# sweep 40.0 + 35.5 = 75.5; total 5.0 + 55.0 + 45.5 + 37.0 + 75.5 = 218.0
PREPARE = {"src": (1.0, "00112233445566aa"), "tA": (1.5, "aabbccddeeff0011"), "tB": (2.5, "0123456789abcdef")}
PRETRAIN = {"binary": (BASE, 30.0), "fp32": (FP32, 25.0)}
TRANSFER_WALL = {("tA", "full"): 12.5, ("tA", "full_fp32"): 20.5, ("tA", "head"): 2.5, ("tA", "serial"): 6.5,
                 ("tA", "parallel"): 3.5, ("tB", "full"): 9.0, ("tB", "full_fp32"): 17.0, ("tB", "head"): 1.5,
                 ("tB", "serial"): 2.5, ("tB", "parallel"): 7.0}
STAGE_TIMES = {"prepare@src": 1.0, "prepare@tA": 1.5, "prepare@tB": 2.5, "pretrain@binary": 30.0,
               "pretrain@fp32": 25.0, "sweep@tA": 40.0, "sweep@tB": 35.5,
               # named as `dvc dag` names the stages that wrote them
               "baseline@tA-full": 12.5, "transfer_fp32@tA": 20.5, "baseline@tA-head": 2.5, "transfer@tA-serial": 6.5,
               "transfer@tA-parallel": 3.5, "baseline@tB-full": 9.0, "transfer_fp32@tB": 17.0, "baseline@tB-head": 1.5,
               "transfer@tB-serial": 2.5, "transfer@tB-parallel": 7.0}
TOTAL_WALL = 218.0
DPI = 110  # params.yaml's report.dpi


def _row(target, method, precision, seed, val, test, task, train, epoch, t95) -> dict:
    adapter = method in ("serial", "parallel")
    keys = {"target": target, "method": method, "precision": precision,
            "adapter_type": method if adapter else "none", **(ADAPTER if adapter else NONE),
            "task_bn": False if adapter else method == "full", "seed": seed}
    return {**keys, "sparsity": 0.0, "val_acc": val, "test_acc": test, "task_memory_bytes": task,
            "adapter_memory_bytes": 256.0 if adapter else 0.0, "base_memory_bytes": BASE,
            "memory_ratio": task / BASE, "train_time_s": train, "epoch_time_s": epoch, "time_to_95_s": t95,
            "trainable_params": 1234, "epochs": 6, "epochs_run": 6, "packed_payload_bytes": int(task)}


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write_results_set(reports: Path) -> Path:
    """A realistic reports/ folder, written by hand (no training)."""
    metrics = reports / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame([_row(*r) for r in RUNS], columns=COLUMNS)
    rows.sort_values(["target", "method", "precision", "seed"], kind="stable").to_csv(reports / "results.csv", index=False)
    for name, (wall, sha) in PREPARE.items():
        _json(metrics / f"prepare_{name}.json", {"train_images": 140, "val_images": 30, "test_images": 30,
                                                 "num_classes": 5, "train_sha256": sha, "wall_time_s": wall})
    for precision, (mem, wall) in PRETRAIN.items():
        _json(metrics / f"pretrain_{precision}.json", {
            "val_acc": 0.95, "test_acc": 0.94, "memory_bytes": mem, "packed_payload_bytes": int(mem), "params": 20000,
            "epochs": 8, "train_time_s": wall - 2.0, "epoch_time_s": (wall - 2.0) / 8, "time_to_95_s": 5.0,
            "dataset_sha256": "00112233445566aa", "wall_time_s": wall})
    for (target, var), wall in TRANSFER_WALL.items():
        method, precision = ("full", "fp32") if var == "full_fp32" else (var, "binary")
        runs = [r for r in RUNS if r[0] == target and r[1] == method and r[2] == precision]
        _json(metrics / f"transfer_{target}_{var}.json", {
            "val_acc": sum(r[4] for r in runs) / len(runs), "test_acc": sum(r[5] for r in runs) / len(runs),
            "seeds": len(runs), "wall_time_s": wall})
        curve = [{"seed": r[3], "epoch": e, "elapsed_train_s": round(r[7] * (e + 1) / 3, 4),
                  "val_acc": round(r[4] * (0.7 + 0.1 * e), 4)} for r in runs for e in range(3)]
        pd.DataFrame(curve).to_csv(metrics / f"transfer_{target}_{var}_curve.csv", index=False)
    for target, points in PARETO.items():
        folder = reports / "sweep" / target
        folder.mkdir(parents=True, exist_ok=True)
        pareto = [{"number": n, "method": m, "groups": 8, "reduction": 1, "placement": "last:2", "task_bn": False,
                   "bits": 4, "head_bits": 8, "prune_amount": 0.0, "lr": 0.005, "val_acc": v, "test_acc": t,
                   "task_memory_bytes": r * BASE, "memory_ratio": r, "memory_pct": 100 * r}
                  for n, m, r, v, t in points]
        pd.DataFrame(pareto, columns=PARETO_COLUMNS).to_csv(folder / "pareto.csv", index=False)
        s = SWEEP_JSON[target]
        on_front = {p[0]: p for p in points}
        trials = []
        for n in range(s["complete"] + s["failed"]):
            if n in on_front:
                _, m, r, v, _ = on_front[n]
            else:  # dominated trials: more memory, less val accuracy
                m, r, v = ("serial" if n % 2 else "parallel"), 0.25 + 0.01 * n, 0.5 + 0.01 * n
            failed = n == s["fail_number"]
            trials.append({"number": n, "state": "FAIL" if failed else "COMPLETE",
                           "val_acc": None if failed else v, "task_memory_bytes": None if failed else r * BASE,
                           "method": m, "groups": 8, "reduction": 1, "placement": "last:2", "task_bn": False,
                           "bits": 4, "head_bits": 8, "prune_amount": 0.0, "lr": 0.005,
                           "memory_ratio": None if failed else r, "adapter_memory_bytes": None if failed else 100.0,
                           "sparsity": 0.0, "train_time_s": 1.0, "epochs_run": 3,
                           "fail_reason": "TrainingDiverged" if failed else None,
                           "adapter": f"reports/sweep/{target}/trials/{n}/adapter.safetensors", "duration_s": 2.0})
        pd.DataFrame(trials, columns=TRIAL_COLUMNS).to_csv(folder / "trials.csv", index=False)
        _json(metrics / f"sweep_{target}.json", {
            "study": f"{target}-0123abcd", "complete": s["complete"], "failed": s["failed"],
            "pareto_size": s["pareto_size"], "hypervolume": s["hypervolume"],
            "reference_point": {"accuracy": 0.0, "memory_pct": 100.0},
            "best_test_acc_le_12pct": s["best_test_acc_le_12pct"], "wall_time_s": s["wall_time_s"]})
    return reports


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


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


def test_question1_best_adapter_chosen_on_val_with_gaps(rendered):
    text = section(rendered["md"], "1. Accuracy")
    assert rendered["md"].count("## 1. Accuracy: the best adapter at <= 12% task memory") == 1
    # tA candidates <= 12%: transfer serial (.10, val mean (.8125 + .9375) / 2 = .875), transfer parallel
    # (.11, val .85, test .95 = best test), sweep trials 4 (.03, val .80), 2 (.08, val .84), 9 (.09, val .875);
    # trial 5 (.20, val .96) is over budget. Best val .875: trial 9 and transfer serial tie -> smaller .09.
    # Test .89; binary full mean (.90 + .92) / 2 = .91 -> .89 - .91 = -2.0 pts; fp32 .94 -> -5.0 pts;
    # head .70 -> +19.0 pts.
    # tB candidates <= 12%: transfer parallel only (.10, val .70; serial .15 and trials .13/.30 are over
    # budget). Test .75: vs .80 -> -5.0 pts, vs .82 -> -7.0 pts, vs .60 -> +15.0 pts.
    assert bullets(text) == [
        "- **tA**: the best adapter at <= 12% task memory (serial, sweep trial 9, 9.0% of the base, chosen on val) "
        "reaches 89.0% test accuracy: -2.0 pts vs binary full finetune (91.0%), -5.0 pts vs fp32 full finetune "
        "(94.0%), +19.0 pts vs head only (70.0%).",
        "- **tB**: the best adapter at <= 12% task memory (parallel, transfer, 10.0% of the base, chosen on val) "
        "reaches 75.0% test accuracy: -5.0 pts vs binary full finetune (80.0%), -7.0 pts vs fp32 full finetune "
        "(82.0%), +15.0 pts vs head only (60.0%).",
    ]
    assert table(text) == [
        {"target": "tA", "best adapter <= 12%": "serial (sweep trial 9, 9.0%)", "adapter test acc": "89.0%",
         "binary full": "91.0%", "gap vs binary full": "-2.0 pts", "fp32 full": "94.0%", "gap vs fp32 full": "-5.0 pts",
         "head only": "70.0%", "gap vs head": "+19.0 pts"},
        {"target": "tB", "best adapter <= 12%": "parallel (transfer, 10.0%)", "adapter test acc": "75.0%",
         "binary full": "80.0%", "gap vs binary full": "-5.0 pts", "fp32 full": "82.0%", "gap vs fp32 full": "-7.0 pts",
         "head only": "60.0%", "gap vs head": "+15.0 pts"},
    ]


def test_question2_time_ratios(rendered):
    text = section(rendered["md"], "2. Training time")
    # tA binary full means: train (10 + 14) / 2 = 12.0 s, epoch (2.0 + 2.4) / 2 = 2.2 s, t95 (4 + 6) / 2 = 5.0 s
    # serial: train (5.0 + 5.8) / 2 = 5.4 -> 5.4 / 12 = 0.45x; t95 (1.5 + 2.5) / 2 = 2.0 -> 2 / 5 = 0.40x;
    #         epoch 1.1 / 2.2 = 0.50x
    # parallel: 3 / 12 = 0.25x; t95 1 / 5 = 0.20x; epoch .55 / 2.2 = 0.25x
    # head (table only): 2 / 12 = 0.1667 -> 0.17x; t95 1 / 5 = 0.20x; epoch .4 / 2.2 = 0.1818 -> 0.18x
    # tB binary full: train 8.0, epoch 1.6, t95 0 (never reached) -> every time-to-95 ratio is n/a
    # serial: 2 / 8 = 0.25x, epoch .4 / 1.6 = 0.25x; parallel: 6 / 8 = 0.75x, epoch 1.2 / 1.6 = 0.75x;
    # head: 1.2 / 8 = 0.15x, epoch .24 / 1.6 = 0.15x
    assert bullets(text) == [
        "- **tA**, serial: 0.45x the training seconds of binary full finetune (5.4 s vs 12.0 s), 0.40x its time "
        "to 95% of final val accuracy, 0.50x its epoch time.",
        "- **tA**, parallel: 0.25x the training seconds of binary full finetune (3.0 s vs 12.0 s), 0.20x its time "
        "to 95% of final val accuracy, 0.25x its epoch time.",
        "- **tB**, serial: 0.25x the training seconds of binary full finetune (2.0 s vs 8.0 s), n/a its time "
        "to 95% of final val accuracy, 0.25x its epoch time.",
        "- **tB**, parallel: 0.75x the training seconds of binary full finetune (6.0 s vs 8.0 s), n/a its time "
        "to 95% of final val accuracy, 0.75x its epoch time.",
    ]
    rows = table(text)
    got = [(r["target"], r["method"], float(r["train s"]), float(r["binary full train s"]), r["train time ratio"],
            r["time-to-95% ratio"], r["epoch time ratio"]) for r in rows]
    assert got == [
        ("tA", "head", 2.0, 12.0, "0.17x", "0.20x", "0.18x"),
        ("tA", "serial", 5.4, 12.0, "0.45x", "0.40x", "0.50x"),
        ("tA", "parallel", 3.0, 12.0, "0.25x", "0.20x", "0.25x"),
        ("tB", "head", 1.2, 8.0, "0.15x", "n/a", "0.15x"),
        ("tB", "serial", 2.0, 8.0, "0.25x", "n/a", "0.25x"),
        ("tB", "parallel", 6.0, 8.0, "0.75x", "n/a", "0.75x"),
    ]


def test_question3_smallest_within_points_and_band(rendered):
    text = section(rendered["md"], "3. Size")
    # tA binary full mean test .91: within 1 pt means test >= .90 -> trials 2 (.905, 8%) and 5 (.93, 20%)
    # -> smallest 8.00%, inside 7%-12%. Within 3 pts: test >= .88 -> trials 4 (.895, 3%), 2, 9 (.89), 5
    # -> smallest 3.00%, below the band.
    # tB binary full .80: within 1 pt (>= .79): none of .785 / .78 -> not reached. Within 3 pts (>= .77):
    # both -> smallest 13.00% (trial 0, test .785), above the band.
    assert bullets(text) == [
        "- **tA**: the smallest task memory within 1 point of binary full finetune is 8.00% of the base "
        "(trial 2, parallel, test 90.5%): inside the prior study's 7%-12% band.",
        "- **tA**: the smallest task memory within 3 points of binary full finetune is 3.00% of the base "
        "(trial 4, serial, test 89.5%): below the prior study's 7%-12% band.",
        "- **tB**: no Pareto point is within 1 point of binary full finetune (80.0%).",
        "- **tB**: the smallest task memory within 3 points of binary full finetune is 13.00% of the base "
        "(trial 0, serial, test 78.5%): above the prior study's 7%-12% band.",
    ]
    assert table(text) == [
        {"target": "tA", "binary full": "91.0%", "smallest within 1 pt": "8.00%",
         "within 1 pt vs band": "inside the prior study's 7%-12% band", "smallest within 3 pts": "3.00%",
         "within 3 pts vs band": "below the prior study's 7%-12% band"},
        {"target": "tB", "binary full": "80.0%", "smallest within 1 pt": "n/a",
         "within 1 pt vs band": "not reached by any Pareto point", "smallest within 3 pts": "13.00%",
         "within 3 pts vs band": "above the prior study's 7%-12% band"},
    ]


def test_runs_table_mean_and_std_across_seeds(rendered):
    rows = table(section(rendered["md"], "All transfer runs"))
    by = {(r["target"], r["method"], r["precision"]): r for r in rows}
    assert len(rows) == 10  # 12 runs, two configs with 2 seeds each
    full = by[("tA", "full", "binary")]
    # test (.90 + .92) / 2 = 91.0%, std |.92 - .90| / sqrt(2) = .01414 -> 1.4%;
    # train (10 + 14) / 2 = 12.0, std 4 / sqrt(2) = 2.83 -> 2.8; memory 10240 / 1024 = 10.00 KiB (100.0%)
    assert (full["seeds"], full["test acc"], full["train s"], full["task memory"], full["adapter"]) == \
        ("2", "91.0% ± 1.4%", "12.0 ± 2.8", "10.00 KiB (100.0%)", "")
    serial = by[("tA", "serial", "binary")]
    # test (.86 + .88) / 2 = 87.0% ± .01414 -> 1.4%; train (5.0 + 5.8) / 2 = 5.4, std .8 / sqrt(2) = .566 -> 0.6;
    # memory 1024 / 1024 = 1.00 KiB, 1024 / 10240 = 10.0%
    assert (serial["seeds"], serial["test acc"], serial["train s"], serial["task memory"], serial["adapter"]) == \
        ("2", "87.0% ± 1.4%", "5.4 ± 0.6", "1.00 KiB (10.0%)", "g16 r1 last:3 4-bit")
    single = by[("tA", "parallel", "binary")]
    # one seed: no "±"; 1126.4 / 1024 = 1.10 KiB, 1126.4 / 10240 = 11.0%
    assert (single["seeds"], single["test acc"], single["train s"], single["task memory"]) == \
        ("1", "95.0%", "3.0", "1.10 KiB (11.0%)")
    fp32 = by[("tB", "full", "fp32")]
    # 327680 / 1024 = 320.00 KiB, 327680 / 10240 = 32 = 3200.0%
    assert (fp32["test acc"], fp32["task memory"]) == ("82.0%", "320.00 KiB (3200.0%)")


def test_sweep_table(rendered):
    rows = table(section(rendered["md"], "Sweeps"))
    got = [(r["target"], int(r["complete trials"]), int(r["failed"]), int(r["Pareto points"]), float(r["hypervolume"]),
            r["reference point"]) for r in rows]
    assert got == [("tA", 9, 1, 4, 89.735, "{'accuracy': 0.0, 'memory_pct': 100.0}"),
                   ("tB", 4, 0, 2, 68.295, "{'accuracy': 0.0, 'memory_pct': 100.0}")]


def test_stage_wall_times_and_total(rendered):
    text = section(rendered["md"], "Where the time goes")
    got = {r["stage"]: float(r["wall_time_s"]) for r in table(text)}
    assert got == STAGE_TIMES
    # 5.0 (prepare) + 55.0 (pretrain) + 45.5 (transfer tA) + 37.0 (transfer tB) + 75.5 (sweeps) = 218.0
    assert sum(STAGE_TIMES.values()) == TOTAL_WALL
    assert "Total stage wall time: 218 s." in text


def test_stage_names_with_underscores_in_dataset_names():
    from pipeline.report.analysis import dvc_stage

    assert [dvc_stage(s) for s in ("prepare_mnist_0to4", "pretrain_fp32", "sweep_uci_digits", "transfer_mnist_5to9_full",
                                   "transfer_uci_digits_full_fp32", "transfer_my_set_parallel")] == \
        ["prepare@mnist_0to4", "pretrain@fp32", "sweep@uci_digits", "baseline@mnist_5to9-full",
         "transfer_fp32@uci_digits", "transfer@my_set-parallel"]


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
    # storage_for_tasks 7.5 x 4.5 -> 825 x 495; learning_curves (6 per target = 12) x 4.2 -> 1320 x 462
    expected = {"accuracy_vs_memory_tA.png": (825, 550), "accuracy_vs_memory_tB.png": (825, 550),
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
        "plots/accuracy_vs_memory_tA.png", "plots/accuracy_vs_memory_tB.png", "plots/training_time.png",
        "plots/learning_curves.png", "plots/storage_for_tasks.png"]
    for i, line in embeds:
        caption = line[2:line.index("](")]
        assert caption and figures[i + 2] == f"*{caption}*"
    assert "the 7%-12% band shaded" in figures[embeds[0][0]]
    assert "N = 1..10 tasks" in figures[embeds[4][0]]


# ------------------------------------------------------------------------------- question 1 variants


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return analysis.load_inputs(write_results_set(tmp_path_factory.mktemp("inputs") / "reports"))


def test_question1_budget_is_inclusive(inputs):
    # max_ratio .08: tA candidates trial 4 (.03, val .80) and trial 2 (.08 exactly, val .84) -> trial 2,
    # test .905 -> 90.5%; .905 - .91 = -0.5 pts. tB: nothing <= 8% (parallel .10).
    text, _ = accuracy_section(inputs, 0.08)
    assert bullets(text)[0].startswith(
        "- **tA**: the best adapter at <= 8% task memory (parallel, sweep trial 2, 8.0% of the base, chosen on val) "
        "reaches 90.5% test accuracy: -0.5 pts vs binary full finetune (91.0%)")
    assert bullets(text)[1] == "- **tB**: no adapter configuration reached <= 8% of the base's memory."


def test_question1_none_below_budget(inputs):
    # max_ratio .02: the smallest adapter anywhere is tA's trial 4 at 3% -> none for both targets
    text, tab = accuracy_section(inputs, 0.02)
    assert bullets(text) == ["- **tA**: no adapter configuration reached <= 2% of the base's memory.",
                             "- **tB**: no adapter configuration reached <= 2% of the base's memory."]
    assert list(tab["best adapter <= 2%"]) == ["none", "none"]
    assert list(tab["gap vs binary full"]) == ["n/a", "n/a"]


def test_question1_val_tie_from_seed_mean_goes_to_smaller_memory():
    # Accuracies are k / n fractions of the val split (n = 375 for mnist_5to9). Transfer serial, seeds
    # 320/375 and 322/375: mean 321/375 = .856; sweep trial 1 reaches 321/375 = .856 at 5% < 10%.
    # Equal val -> the smaller one (trial 1) must win. Floating point: (320/375 + 322/375) / 2 is
    # 0.8560000000000001 while 321/375 is 0.856, so an exact comparison picks the 10% transfer run.
    results = pd.DataFrame([_row("tC", "serial", "binary", s, k / 375, 0.80, 1024.0, 5.0, 1.0, 2.0)
                            for s, k in ((0, 320), (1, 322))], columns=COLUMNS)
    pareto = pd.DataFrame([{"number": 1, "method": "parallel", "val_acc": 321 / 375, "test_acc": 0.83,
                            "task_memory_bytes": 512.0, "memory_ratio": 0.05, "memory_pct": 5.0}])
    inputs = analysis.Inputs(results, {"pretrain_binary": {"memory_bytes": BASE}}, {}, {}, {"tC": pareto})
    best = analysis.best_adapter(inputs, "tC", 0.12)
    assert (best.source, best.memory_ratio, best.test_acc) == ("sweep trial 1", 0.05, 0.83)


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
