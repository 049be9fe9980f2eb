"""The numbers behind report.md, computed from the pipeline's result files only (pure pandas,
so tests can check each against a hand calculation on a fixture)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.errors import UserError
from pipeline.nn.memory import BREAKDOWN_COLUMNS
from pipeline.paths import REPORTS
from pipeline.train.spec import ADAPTER_METHODS, CONFIG_COLUMNS
from pipeline.stats import mean_ci

CONFIG = CONFIG_COLUMNS
ADAPTERS = ADAPTER_METHODS
TASK_STATES = ("head", "bn") + ADAPTERS  # every method that keeps the base and stores a task state
BREAKDOWN = BREAKDOWN_COLUMNS
# per-seed columns averaged with a 95% interval
MEASURES = ("val_acc", "test_acc", "task_memory_bytes", "memory_ratio", "train_time_s", "time_to_95_s",
            "epoch_time_s", "epochs_run", *BREAKDOWN)
MAKERS = {  # input (relative to the reports folder) -> the stage that writes it
    "results.csv": "results",
    "metrics/pretrain_binary.json": "pretrain@binary",
    "metrics/pretrain_fp32.json": "pretrain@fp32",
}


@dataclass
class Inputs:
    results: pd.DataFrame
    metrics: dict[str, dict]                      # file stem -> JSON
    curves: dict[str, pd.DataFrame]               # "<target>_<variant>" -> curve
    trials: dict[str, pd.DataFrame] = field(default_factory=dict)   # target -> trials.csv
    pareto: dict[str, pd.DataFrame] = field(default_factory=dict)   # target -> pareto.csv

    @property
    def base_bytes(self) -> float:
        return float(self.metrics["pretrain_binary"]["memory_bytes"])

    @property
    def fp32_bytes(self) -> float:
        return float(self.metrics["pretrain_fp32"]["memory_bytes"])

    @property
    def targets(self) -> list[str]:
        return sorted(self.results.target.unique())


def _need(path: Path, maker: str) -> None:
    if not path.exists():
        raise UserError(f"report: {path} is missing; it is written by the {maker} stage (run `dvc repro`)")


def load_inputs(reports: Path = REPORTS) -> Inputs:
    for rel, maker in MAKERS.items():
        _need(reports / rel, maker)
    results = pd.read_csv(reports / "results.csv", dtype={"lr_grid": str})  # "0.005" stays the grid's text
    metrics = {}
    for f in sorted((reports / "metrics").glob("*.json")):
        try:
            metrics[f.stem] = json.loads(f.read_text())
        except json.JSONDecodeError:
            raise UserError(f"report: {f} is not valid JSON; rerun the stage that writes it") from None
    curves = {f.stem[len("transfer_"):-len("_curve")]: pd.read_csv(f)
              for f in sorted((reports / "metrics").glob("transfer_*_curve.csv"))}
    trials, pareto = {}, {}
    for folder in sorted((reports / "sweep").glob("*")) if (reports / "sweep").exists() else []:
        if (folder / "trials.csv").exists():
            trials[folder.name] = pd.read_csv(folder / "trials.csv")
        if (folder / "pareto.csv").exists():
            pareto[folder.name] = pd.read_csv(folder / "pareto.csv")
    return Inputs(results, metrics, curves, trials, pareto)


def per_config(results: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: mean and 95% Student t half-width (`<key>_ci`) across seeds,
    the chosen lr and what it was chosen from, epochs run, and how many runs hit their cap while
    still improving."""
    cols = [c for c in CONFIG if c in results.columns]
    rows = []
    for key, g in results.groupby(cols, dropna=False, sort=True):
        row = dict(zip(cols, key if isinstance(key, tuple) else (key,)))
        row["seeds"] = len(g)
        for m in MEASURES:
            if m in g.columns:
                row[m], row[f"{m}_ci"] = mean_ci(g[m])
        for extra in ("lr", "lr_grid"):
            if extra in g.columns:
                row[extra] = g[extra].iloc[0]
        row["hit_cap_improving"] = int(g["hit_cap_improving"].astype(bool).sum()) if "hit_cap_improving" in g else 0
        rows.append(row)
    return pd.DataFrame(rows)


def baseline(cfg: pd.DataFrame, target: str, method: str, precision: str = "binary") -> Optional[pd.Series]:
    rows = cfg[(cfg.target == target) & (cfg.method == method) & (cfg.precision == precision)]
    return rows.iloc[0] if len(rows) else None


def describe(r) -> str:
    """A configuration in a few words: `parallel g4 r1 all 1-bit LSQ BN 16-bit +task BN head 4-bit
    pruned 0.5` (BN at its default 32 bits and the default 8-bit head are not named for adapters)."""
    bn = int(r["bn_bits"]) if "bn_bits" in r and not pd.isna(r["bn_bits"]) else None
    if r.method not in ADAPTERS:
        return {"bn": f"BN thresholds + head, BN {bn or 32}-bit", "head": "head only"}.get(r.method, r.method)
    bits = str(r.get("adapter_bits", r.get("bits", "?")))
    text = f"{r.method} g{r.get('groups', '?')} r{r.get('reduction', 1)} {r.get('placement', '?')} " \
           f"{bits if bits == 'ternary' else bits + '-bit'}"
    text += " LSQ" if str(r.get("learn_scale", False)) == "True" else ""
    text += f" BN {bn}-bit" if bn and bn != 32 else ""
    text += " +task BN" if str(r.get("task_bn", False)) == "True" else ""
    head = r.get("head_bits")
    text += f" head {int(head)}-bit" if head is not None and not pd.isna(head) and int(head) != 8 else ""
    if float(r.get("prune_amount", 0) or 0) > 0:
        text += f" pruned {float(r.prune_amount):g}"
    return text


def candidates(inputs: Inputs, target: str, methods: tuple[str, ...] = ADAPTERS) -> pd.DataFrame:
    """Task-state configurations measured on every seed: the transfer stages' and the sweep's Pareto
    points (retrained on the seeds), as (source, method, config, memory_ratio and its breakdown,
    val/test mean and interval)."""
    cfg = per_config(inputs.results)
    a = cfg[(cfg.target == target) & cfg.method.isin(methods) & (cfg.precision == "binary")]
    keep = ["method", "memory_ratio", "val_acc", "val_acc_ci", "test_acc", "test_acc_ci", "seeds"]
    rows = [a[keep + [b for b in BREAKDOWN if b in a]].assign(source="transfer stage", config=[describe(r) for _, r in a.iterrows()])]
    p = inputs.pareto.get(target)
    if p is not None and len(p):
        rows.append(p[keep + [b for b in BREAKDOWN if b in p]].assign(
            source="sweep trial " + p.number.astype(str),
            config=[describe(r) for _, r in p.rename(columns={"bits": "adapter_bits"}).iterrows()]))
    return pd.concat(rows, ignore_index=True)


def best_adapter(inputs: Inputs, target: str, max_ratio: float) -> Optional[pd.Series]:
    """The adapter at <= max_ratio of base memory with the best mean *val* accuracy (test is only
    reported, never used to choose); ties go to the smaller one."""
    c = candidates(inputs, target)
    c = c[c.memory_ratio <= max_ratio + 1e-12]
    if c.empty:
        return None
    # Rounded: a 2-seed mean (320/375 + 322/375)/2 must tie with a single 321/375.
    c = c.assign(_val=c.val_acc.round(9))
    return c.sort_values(["_val", "memory_ratio"], ascending=[False, True]).iloc[0]


def smallest_within(inputs: Inputs, target: str, points: float) -> Optional[pd.Series]:
    """The smallest task state (adapters, BN thresholds, head) whose mean *val* accuracy is within
    `points` percentage points of binary `full`'s mean val accuracy (chosen on val; its test
    accuracy is then reported)."""
    full = baseline(per_config(inputs.results), target, "full")
    if full is None:
        return None
    c = candidates(inputs, target, TASK_STATES)
    ok = c[c.val_acc.round(9) >= round(full.val_acc - points / 100, 9)]
    return ok.sort_values(["memory_ratio", "val_acc"], ascending=[True, False]).iloc[0] if len(ok) else None


def most_accurate(inputs: Inputs, target: str) -> Optional[pd.Series]:
    """The task state with the best mean val accuracy, whatever its size (named where none is close)."""
    c = candidates(inputs, target, TASK_STATES)
    if c.empty:
        return None
    c = c.assign(_val=c.val_acc.round(9))  # ties as in best_adapter
    return c.sort_values(["_val", "memory_ratio"], ascending=[False, True]).iloc[0]


def band_position(ratio: Optional[float], low: float, high: float) -> str:
    if ratio is None:
        return "not reached by any adapter"
    if ratio < low:
        return f"below the prior study's {low:.0%}-{high:.0%} band"
    if ratio <= high:
        return f"inside the prior study's {low:.0%}-{high:.0%} band"
    return f"above the prior study's {low:.0%}-{high:.0%} band"


def time_ratios(inputs: Inputs, target: str, method: str) -> Optional[dict[str, float]]:
    cfg = per_config(inputs.results)
    full, a = baseline(cfg, target, "full"), baseline(cfg, target, method)
    if full is None or a is None:
        return None
    return {"train_time": a.train_time_s / full.train_time_s,
            "time_to_95": a.time_to_95_s / full.time_to_95_s if full.time_to_95_s > 0 else float("nan"),
            "epoch_time": a.epoch_time_s / full.epoch_time_s}


def dvc_stage(stem: str) -> str:
    """The DVC stage that wrote reports/metrics/<stem>.json (dataset and target names may hold '_')."""
    kind, _, rest = stem.partition("_")
    if kind != "transfer":
        return f"{kind}@{rest}" if rest else kind
    if rest.endswith("_full_fp32"):
        return f"transfer_fp32@{rest[:-len('_full_fp32')]}"
    target, _, method = rest.rpartition("_")
    if method == "bn":
        return f"bn@{target}"
    return f"{'baseline' if method in ('full', 'head') else 'transfer'}@{target}-{method}"


def stage_times(metrics: dict[str, dict]) -> pd.DataFrame:
    rows = [{"stage": dvc_stage(stem), "wall_time_s": m["wall_time_s"]} for stem, m in metrics.items() if "wall_time_s" in m]
    return pd.DataFrame(rows, columns=["stage", "wall_time_s"])
