"""The report's figures, drawn from `Inputs` alone."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from pipeline.report.analysis import ADAPTERS, Inputs, baseline  # noqa: E402

STYLE = {  # (method, precision) -> marker, colour, label
    ("full", "binary"): ("s", "tab:blue", "full finetune (binary)"),
    ("full", "fp32"): ("D", "tab:purple", "full finetune (fp32)"),
    ("head", "binary"): ("v", "tab:gray", "head only"),
    ("bn", "binary"): ("P", "tab:brown", "BN thresholds + head"),
    ("serial", "binary"): ("o", "tab:green", "serial adapter"),
    ("parallel", "binary"): ("^", "tab:orange", "parallel adapter"),
}


def _bars(means, half_widths, low: float = 0.0, high: float = math.inf):
    """95% half-widths as error bars clipped to the quantity's range [low, high] (no accuracy
    above 100%, no time below 0); unknown (one seed) draws none."""
    m = np.asarray(means, dtype=float)
    h = np.nan_to_num(np.asarray(half_widths, dtype=float), nan=0.0)
    if not (h > 0).any():
        return None
    return np.vstack([np.minimum(h, np.maximum(m - low, 0)), np.minimum(h, np.maximum(high - m, 0))])


def _save(fig, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def accuracy_vs_memory(inputs: Inputs, target: str, band: tuple[float, float], out: Path, dpi: int) -> Path:
    cfg = inputs.config()
    cfg = cfg[cfg.target == target]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axvspan(100 * band[0], 100 * band[1], color="gold", alpha=0.25, label=f"prior study's {band[0]:.0%}-{band[1]:.0%} band")
    trials = inputs.trials.get(target)
    if trials is not None and len(trials):
        done = trials[trials.state == "COMPLETE"]
        ax.scatter(100 * done.memory_ratio, done.val_acc, s=14, color="black", alpha=0.18,
                   label="sweep trials (val accuracy)")
    pareto = inputs.pareto.get(target)
    if pareto is not None and len(pareto):
        p = pareto.sort_values("memory_pct")
        ax.errorbar(p.memory_pct, p.test_acc, yerr=_bars(p.test_acc, p.test_acc_ci, 0, 1), fmt=".-", color="tab:red", lw=1.5, capsize=3,
                    label="sweep Pareto set (chosen on val; test, retrained on every seed)")
    for (method, precision), (marker, colour, label) in STYLE.items():
        rows = cfg[(cfg.method == method) & (cfg.precision == precision)]
        if len(rows):
            ax.errorbar(100 * rows.memory_ratio, rows.test_acc, yerr=_bars(rows.test_acc, rows.test_acc_ci, 0, 1), fmt=marker, color=colour,
                        ms=8, capsize=3, label=label, zorder=5)
    for precision, ls in (("binary", "--"), ("fp32", ":")):
        full = baseline(inputs.config(), target, "full", precision)
        if full is not None:
            ax.axhline(full.test_acc, color="tab:blue" if precision == "binary" else "tab:purple", ls=ls, lw=1,
                       label=f"full finetune ({precision}): {full.test_acc:.1%}")
    return _memory_axes(fig, ax, out, dpi, "test accuracy (mean over seeds, 95% interval)",
                        f"Accuracy vs task memory on target '{target}'", 7.5)


def _memory_axes(fig, ax, out: Path, dpi: int, ylabel: str, title: str, legend_size: float) -> Path:
    """The accuracy-vs-memory figures' shared frame: memory in % of the base on a log axis."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel("task-specific memory (% of the binary base, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower right")
    return _save(fig, out, dpi)


def training_time(inputs: Inputs, out: Path, dpi: int) -> Path:
    cfg = inputs.config()
    targets = inputs.targets
    keys = [k for k in STYLE if len(cfg[(cfg.method == k[0]) & (cfg.precision == k[1])])]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        marker, colour, label = STYLE[key]
        means, cis = [], []
        for t in targets:
            rows = cfg[(cfg.target == t) & (cfg.method == key[0]) & (cfg.precision == key[1])]
            means.append(rows.train_time_s.mean() if len(rows) else np.nan)
            cis.append(rows.train_time_s_ci.mean() if len(rows) else np.nan)
        ax.bar(np.arange(len(targets)) + i * width, means, width, yerr=_bars(means, cis, 0), capsize=3, color=colour, label=label)
    ax.set_xticks(np.arange(len(targets)) + width * (len(keys) - 1) / 2, targets)
    ax.set_ylabel("training time (s, frozen-prefix pass included)")
    ax.set_title("Training time per method and target (error bars: 95% interval over seeds)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out, dpi)


def learning_curves(inputs: Inputs, out: Path, dpi: int) -> Path:
    targets = inputs.targets
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.2), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for (method, precision), (marker, colour, label) in STYLE.items():
            name = method if precision == "binary" else f"{method}_{precision}"
            curve = inputs.curves.get(f"{target}_{name}")
            if curve is None or curve.empty:
                continue
            for seed, c in curve.groupby("seed"):
                ax.plot(c.elapsed_train_s, c.val_acc, marker=marker, color=colour, ms=4,
                        label=label if seed == curve.seed.min() else None)
        ax.set_xlabel("training time (s, cumulative, excluding validation)")
        ax.set_ylabel("validation accuracy (fraction)")
        ax.set_title(f"Learning curves on target '{target}'")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out, dpi)


def storage_for_tasks(inputs: Inputs, n_max: int, out: Path, dpi: int) -> Path:
    """Base + N task states vs N full copies; task state per adapter method = its mean task
    memory over targets (as run by the transfer stage)."""
    cfg = inputs.config()
    n = np.arange(1, n_max + 1)
    kib = 1024
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(n, n * inputs.base_bytes / kib, "s-", color="tab:blue", label="N full copies (binary)")
    ax.plot(n, n * inputs.fp32_bytes / kib, "D-", color="tab:purple", label="N full copies (fp32)")
    for method in ("head", "bn") + ADAPTERS:
        rows = cfg[(cfg.method == method) & (cfg.precision == "binary")]
        if len(rows):
            task = rows.task_memory_bytes.mean()
            marker, colour, label = STYLE[(method, "binary")]
            ax.plot(n, (inputs.base_bytes + n * task) / kib, marker + "-", color=colour,
                    label=f"binary base + N x {label} ({task / kib:.1f} KiB each)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("number of target tasks N")
    ax.set_ylabel("storage (KiB, log scale)")
    ax.set_title("Storage for N tasks: one shared binary base + task states vs full copies")
    ax.set_xticks(n)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5)
    return _save(fig, out, dpi)


def sweep_front(inputs: Inputs, target: str, out: Path, dpi: int) -> Path:
    """One sweep's trials (val, single seed) and its Pareto set retrained on every seed (val and
    test, 95% intervals)."""
    trials, pareto = inputs.trials.get(target), inputs.pareto.get(target)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = trials[trials.state == "COMPLETE"] if trials is not None and len(trials) else None
    if done is not None and len(done):
        ax.scatter(100 * done.memory_ratio, done.val_acc, s=16, color="black", alpha=0.3, label="trials (val, one seed)")
    if pareto is not None and len(pareto):
        p = pareto.sort_values("memory_pct")
        for split, colour in (("val", "tab:green"), ("test", "tab:red")):
            ax.errorbar(p.memory_pct, p[f"{split}_acc"], yerr=_bars(p[f"{split}_acc"], p[f"{split}_acc_ci"], 0, 1), fmt=".-", color=colour,
                        capsize=3, label=f"Pareto set, {split} (retrained, every seed)")
    return _memory_axes(fig, ax, out, dpi, "accuracy", f"Sweep on '{target}': accuracy vs task memory", 8)
