"""The numbers behind report.md, computed from the pipeline's result files only (pure pandas,
so tests can check each against a hand calculation on a fixture)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import math

import numpy as np
import pandas as pd

from pipeline import predictions
from pipeline.errors import UserError
from pipeline.nn.memory import BREAKDOWN_COLUMNS
from pipeline.paths import REPORTS
from pipeline.train.spec import ADAPTER_METHODS, CONFIG_COLUMNS
from pipeline.stats import crossed_ci, mean_ci, paired_ci

CONFIG = CONFIG_COLUMNS
ADAPTERS = ADAPTER_METHODS
TASK_STATES = ("head", "bn") + ADAPTERS  # every method that keeps the base and stores a task state
BREAKDOWN = BREAKDOWN_COLUMNS
# per-seed columns averaged with a 95% interval
MEASURES = ("val_acc", "test_acc", "task_memory_bytes", "memory_ratio", "train_time_s", "time_to_95_s",
            "epoch_time_s", "epochs_run", "train_memory_bytes", "train_activation_bytes", *BREAKDOWN)
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
    preds: dict[str, predictions.Predictions] = field(default_factory=dict)  # target -> every reported run's
    _config: Optional[pd.DataFrame] = None

    def config(self) -> pd.DataFrame:
        """per_config of the results, accuracies from the stored predictions (computed once)."""
        if self._config is None:
            self._config = per_config(self.results, self.preds)
        return self._config

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
    results = pd.read_csv(reports / "results.csv", dtype={"lr_searched": str})
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
    preds = {}
    for t in sorted(results.target.unique()):
        _need(reports / "predictions" / f"{t}.npz", "results")
        preds[t] = predictions.Predictions.read(reports / "predictions" / f"{t}.npz")
    return Inputs(results, metrics, curves, trials, pareto, preds)


def prefix(method: str, precision: str = "binary") -> str:
    """The run-key prefix of an arm in the predictions files: its variant."""
    return method if precision == "binary" else f"{method}_{precision}"


def correct(inputs: Inputs, target: str, key: str, split: str, seeds=None) -> np.ndarray:
    """seeds x images correctness of the runs `key/seed<k>` (every reported seed stored, or `seeds`)."""
    p = inputs.preds[target]
    seeds = sorted(seeds if seeds is not None else stored_seeds(p, key))
    return p.correct([predictions.run_key(key, s) for s in seeds], split)


def stored_seeds(p: predictions.Predictions, key: str) -> list[int]:
    return sorted(int(r.rsplit("/seed", 1)[1]) for r in p.runs() if r.rsplit("/seed", 1)[0] == key)


def paired(inputs: Inputs, target: str, a: str, b: str, split: str = "test") -> tuple[float, float, float]:
    """Accuracy of runs `a` minus runs `b` on the seeds both have and the same images:
    (difference, 95% half-width, degrees of freedom), stats.paired_ci."""
    p = inputs.preds[target]
    seeds = sorted(set(stored_seeds(p, a)) & set(stored_seeds(p, b)))
    if not seeds:
        return math.nan, math.nan, math.nan
    return paired_ci(correct(inputs, target, a, split, seeds), correct(inputs, target, b, split, seeds))


def per_config(results: pd.DataFrame, preds: Optional[dict[str, predictions.Predictions]] = None) -> pd.DataFrame:
    """One row per configuration (an arm): mean and 95% Student t half-width (`<key>_ci`) across
    seeds, the chosen lr and the values searched, epochs run, and how many runs hit their cap while
    still improving. With `preds`, val and test accuracy and their intervals come from the stored
    predictions, over seeds x images (stats.crossed_ci: test-image sampling included); `key` is the
    arm's run-key prefix."""
    cols = [c for c in CONFIG if c in results.columns]
    rows = []
    for key, g in results.groupby(cols, dropna=False, sort=True):
        row = dict(zip(cols, key if isinstance(key, tuple) else (key,)))
        row["seeds"] = len(g)
        for m in MEASURES:
            if m in g.columns:
                row[m], row[f"{m}_ci"] = mean_ci(g[m])
        for extra in ("lr", "lr_searched"):
            if extra in g.columns:
                row[extra] = g[extra].iloc[0]
        row["hit_cap_improving"] = int(g["hit_cap_improving"].astype(bool).sum()) if "hit_cap_improving" in g else 0
        row["key"] = prefix(row["method"], row.get("precision", "binary"))
        if preds is not None and row["target"] in preds:
            p = preds[row["target"]]
            keys = [predictions.run_key(row["key"], s) for s in sorted(g.seed)]
            for split in predictions.SPLITS:
                if all(p.has(k, split) for k in keys):
                    row[f"{split}_acc"], row[f"{split}_acc_ci"], _ = crossed_ci(p.correct(keys, split))
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
    cfg = inputs.config()
    a = cfg[(cfg.target == target) & cfg.method.isin(methods) & (cfg.precision == "binary")]
    keep = ["key", "method", "memory_ratio", "val_acc", "val_acc_ci", "test_acc", "test_acc_ci", "seeds"]
    rows = [a[keep + [b for b in BREAKDOWN if b in a]].assign(source="transfer stage", config=[describe(r) for _, r in a.iterrows()])]
    p = inputs.pareto.get(target)
    if p is not None and len(p):
        p = p[p.method.isin(methods)]
        rows.append(p[[k for k in keep if k != "key"] + [b for b in BREAKDOWN if b in p]].assign(
            key="trial" + p.number.astype(str), source="sweep trial " + p.number.astype(str),
            config=[describe(r) for _, r in p.rename(columns={"bits": "adapter_bits"}).iterrows()]))
    return pd.concat(rows, ignore_index=True)


def _with(r: pd.Series, **values) -> pd.Series:
    """A copy of the row `r` with `values` added (a Series has no `assign`)."""
    r = r.copy()
    for k, v in values.items():
        r[k] = v
    return r


def best_adapter(inputs: Inputs, target: str, max_ratio: float) -> list[pd.Series]:
    """The adapter at <= max_ratio of base memory with the best mean *val* accuracy (test only
    reports), then every other candidate not apart from it on val (paired val difference whose
    95% interval holds 0), best first; ties go to the smaller. Empty when none is that small."""
    c = candidates(inputs, target)
    c = c[c.memory_ratio <= max_ratio + 1e-12]
    if c.empty:
        return []
    c = c.assign(_val=c.val_acc.round(9)).sort_values(["_val", "memory_ratio"], ascending=[False, True])
    best = c.iloc[0]
    close = []
    for _, r in c.iloc[1:].iterrows():
        d, h, _ = paired(inputs, target, r.key, best.key, "val")
        if d + h >= 0:  # the interval holds 0 (NaN: no shared seed, never listed)
            close.append(_with(r, val_gap=d, val_gap_ci=h))
    return [best] + close


def smallest_within(inputs: Inputs, target: str, points: float) -> Optional[pd.Series]:
    """The smallest task state below the base's size (adapters, BN thresholds, head, sweep points)
    whose paired *val* difference with binary `full` has its 95% interval's lower end above
    -`points` percentage points (chosen on val; its test difference is then reported). Adds
    val_gap / val_gap_ci."""
    if baseline(inputs.config(), target, "full") is None:
        return None
    c = candidates(inputs, target, TASK_STATES)
    c = c[c.memory_ratio < 1.0].sort_values(["memory_ratio", "val_acc"], ascending=[True, False])
    for _, r in c.iterrows():
        d, h, _ = paired(inputs, target, r.key, "full", "val")
        if d - h > -points / 100:
            return _with(r, val_gap=d, val_gap_ci=h)
    return None


def most_accurate(inputs: Inputs, target: str) -> Optional[pd.Series]:
    """The task state below the base's size with the best mean val accuracy (named where none is close)."""
    c = candidates(inputs, target, TASK_STATES)
    c = c[c.memory_ratio < 1.0]
    if c.empty:
        return None
    c = c.assign(_val=c.val_acc.round(9))
    return c.sort_values(["_val", "memory_ratio"], ascending=[False, True]).iloc[0]


def band_position(ratio: Optional[float], low: float, high: float) -> str:
    if ratio is None:
        return "not reached by any adapter"
    if ratio < low:
        return f"below the prior study's {low:.0%}-{high:.0%} band"
    if ratio <= high:
        return f"inside the prior study's {low:.0%}-{high:.0%} band"
    return f"above the prior study's {low:.0%}-{high:.0%} band"


def time_ratios(inputs: Inputs, target: str, method: str, precision: str = "binary") -> Optional[dict[str, tuple]]:
    """Paired ratios of `method` to binary full finetuning over the seeds both ran: for epoch and
    total training time, exp of the mean log ratio with its 95% Student t interval over seeds
    (ratio, low, high). Runs of one arm and of full were timed alike (same threads, side by side,
    each worker warmed up)."""
    r = inputs.results
    a = r[(r.target == target) & (r.method == method) & (r.precision == precision)].set_index("seed")
    f = r[(r.target == target) & (r.method == "full") & (r.precision == "binary")].set_index("seed")
    seeds = sorted(set(a.index) & set(f.index))
    if not seeds or a.empty:
        return None
    out = {}
    for col in ("epoch_time_s", "train_time_s"):
        logs = [math.log(a.at[s, col] / f.at[s, col]) for s in seeds if a.at[s, col] > 0 and f.at[s, col] > 0]
        m, h = mean_ci(logs)
        out[col] = (math.exp(m), math.exp(m - h) if not math.isnan(h) else math.nan,
                    math.exp(m + h) if not math.isnan(h) else math.nan)
    return out


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
