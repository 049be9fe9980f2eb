"""The numbers behind report.md, computed from the pipeline's result files only (pure pandas,
so tests can check each against a hand calculation on a fixture)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.errors import UserError

CONFIG = ["target", "method", "precision", "adapter_type", "groups", "reduction", "placement",
          "adapter_bits", "head_bits", "prune_amount", "task_bn"]
ADAPTERS = ("serial", "parallel")
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


def load_inputs(reports: Path = Path("reports")) -> Inputs:
    for rel, maker in MAKERS.items():
        _need(reports / rel, maker)
    results = pd.read_csv(reports / "results.csv")
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


def mean_std(values: pd.Series) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def per_config(results: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: means and standard deviations across seeds."""
    cols = [c for c in CONFIG if c in results.columns]
    agg = results.groupby(cols, dropna=False).agg(
        seeds=("seed", "count"),
        val_acc=("val_acc", "mean"),
        test_acc=("test_acc", "mean"), test_acc_std=("test_acc", "std"),
        memory_ratio=("memory_ratio", "mean"),
        task_memory_bytes=("task_memory_bytes", "mean"),
        train_time_s=("train_time_s", "mean"), train_time_s_std=("train_time_s", "std"),
        time_to_95_s=("time_to_95_s", "mean"),
        epoch_time_s=("epoch_time_s", "mean"),
    ).reset_index()
    return agg.fillna({"test_acc_std": 0.0, "train_time_s_std": 0.0})


def baseline(cfg: pd.DataFrame, target: str, method: str, precision: str = "binary") -> Optional[pd.Series]:
    rows = cfg[(cfg.target == target) & (cfg.method == method) & (cfg.precision == precision)]
    return rows.iloc[0] if len(rows) else None


def candidates(inputs: Inputs, target: str) -> pd.DataFrame:
    """Adapter configurations with test accuracy: transfer runs and Pareto points of the sweep,
    as (source, method, memory_ratio, val_acc, test_acc)."""
    cfg = per_config(inputs.results)
    a = cfg[(cfg.target == target) & cfg.method.isin(ADAPTERS)]
    rows = [pd.DataFrame({"source": "transfer", "method": a.method, "memory_ratio": a.memory_ratio,
                          "val_acc": a.val_acc, "test_acc": a.test_acc})]
    if target in inputs.pareto and len(inputs.pareto[target]):
        p = inputs.pareto[target]
        rows.append(pd.DataFrame({"source": "sweep trial " + p.number.astype(str), "method": p.method,
                                  "memory_ratio": p.memory_ratio, "val_acc": p.val_acc, "test_acc": p.test_acc}))
    return pd.concat(rows, ignore_index=True)


def best_adapter(inputs: Inputs, target: str, max_ratio: float) -> Optional[pd.Series]:
    """The adapter at <= max_ratio of base memory with the best *val* accuracy (test is only
    reported, never used to choose); ties go to the smaller one."""
    c = candidates(inputs, target)
    c = c[c.memory_ratio <= max_ratio + 1e-12]
    if c.empty:
        return None
    # Rounded: a 2-seed mean (320/375 + 322/375)/2 must tie with a single 321/375.
    c = c.assign(_val=c.val_acc.round(9))
    return c.sort_values(["_val", "memory_ratio"], ascending=[False, True]).iloc[0]


def smallest_within(inputs: Inputs, target: str, points: float) -> Optional[pd.Series]:
    """The smallest-memory point of the Pareto set whose test accuracy is within `points`
    percentage points of binary `full`."""
    full = baseline(per_config(inputs.results), target, "full")
    p = inputs.pareto.get(target)
    if full is None or p is None or p.empty:
        return None
    ok = p[p.test_acc >= full.test_acc - points / 100 - 1e-12]
    return ok.sort_values("memory_ratio").iloc[0] if len(ok) else None


def band_position(ratio: Optional[float], low: float, high: float) -> str:
    if ratio is None:
        return "not reached by any Pareto point"
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
    return f"{'baseline' if method in ('full', 'head') else 'transfer'}@{target}-{method}"


def stage_times(metrics: dict[str, dict]) -> pd.DataFrame:
    rows = [{"stage": dvc_stage(stem), "wall_time_s": m["wall_time_s"]} for stem, m in metrics.items() if "wall_time_s" in m]
    return pd.DataFrame(rows, columns=["stage", "wall_time_s"])
