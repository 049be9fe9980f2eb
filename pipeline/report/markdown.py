"""report.md: the three research questions answered with numbers taken from the tables."""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from pipeline.report.analysis import (ADAPTERS, Inputs, band_position, baseline, best_adapter, per_config,
                                      smallest_within, stage_times, time_ratios)


def pct(x: Optional[float], digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def pts(a: Optional[float], b: Optional[float]) -> str:
    """Gap a - b in percentage points, signed."""
    if a is None or b is None:
        return "n/a"
    return f"{100 * (a - b):+.1f} pts"


def ratio(x: Optional[float]) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}x"


def accuracy_section(inputs: Inputs, max_ratio: float) -> tuple[str, pd.DataFrame]:
    cfg = per_config(inputs.results)
    rows, lines = [], []
    for t in inputs.targets:
        best = best_adapter(inputs, t, max_ratio)
        base = {(m, p): baseline(cfg, t, m, p) for m, p in (("full", "binary"), ("full", "fp32"), ("head", "binary"))}
        acc = {k: (v.test_acc if v is not None else None) for k, v in base.items()}
        b = best.test_acc if best is not None else None
        rows.append({
            "target": t,
            f"best adapter <= {max_ratio:.0%}": "none" if best is None else f"{best.method} ({best.source}, {pct(best.memory_ratio)})",
            "adapter test acc": pct(b),
            "binary full": pct(acc[("full", "binary")]), "gap vs binary full": pts(b, acc[("full", "binary")]),
            "fp32 full": pct(acc[("full", "fp32")]), "gap vs fp32 full": pts(b, acc[("full", "fp32")]),
            "head only": pct(acc[("head", "binary")]), "gap vs head": pts(b, acc[("head", "binary")]),
        })
        if best is None:
            lines.append(f"- **{t}**: no adapter configuration reached <= {max_ratio:.0%} of the base's memory.")
        else:
            lines.append(
                f"- **{t}**: the best adapter at <= {max_ratio:.0%} task memory ({best.method}, {best.source}, "
                f"{pct(best.memory_ratio)} of the base, chosen on val) reaches {pct(b)} test accuracy: "
                f"{pts(b, acc[('full', 'binary')])} vs binary full finetune ({pct(acc[('full', 'binary')])}), "
                f"{pts(b, acc[('full', 'fp32')])} vs fp32 full finetune ({pct(acc[('full', 'fp32')])}), "
                f"{pts(b, acc[('head', 'binary')])} vs head only ({pct(acc[('head', 'binary')])})."
            )
    return "\n".join(lines), pd.DataFrame(rows)


def time_section(inputs: Inputs) -> tuple[str, pd.DataFrame]:
    cfg = per_config(inputs.results)
    rows, lines = [], []
    for t in inputs.targets:
        full = baseline(cfg, t, "full")
        for m in ("head",) + ADAPTERS:
            r, row = time_ratios(inputs, t, m), baseline(cfg, t, m)
            if r is None:
                continue
            rows.append({"target": t, "method": m, "train s": f"{row.train_time_s:.1f}",
                         "binary full train s": f"{full.train_time_s:.1f}",
                         "train time ratio": ratio(r["train_time"]), "time-to-95% ratio": ratio(r["time_to_95"]),
                         "epoch time ratio": ratio(r["epoch_time"])})
            if m in ADAPTERS:
                lines.append(f"- **{t}**, {m}: {ratio(r['train_time'])} the training seconds of binary full finetune "
                             f"({row.train_time_s:.1f} s vs {full.train_time_s:.1f} s), {ratio(r['time_to_95'])} its "
                             f"time to 95% of final val accuracy, {ratio(r['epoch_time'])} its epoch time.")
    return "\n".join(lines), pd.DataFrame(rows)


def size_section(inputs: Inputs, band: tuple[float, float]) -> tuple[str, pd.DataFrame]:
    cfg = per_config(inputs.results)
    rows, lines = [], []
    for t in inputs.targets:
        full = baseline(cfg, t, "full")
        hits = {k: smallest_within(inputs, t, k) for k in (1, 3)}
        r = {k: (v.memory_ratio if v is not None else None) for k, v in hits.items()}
        rows.append({"target": t, "binary full": pct(full.test_acc if full is not None else None),
                     "smallest within 1 pt": pct(r[1], 2), "within 1 pt vs band": band_position(r[1], *band),
                     "smallest within 3 pts": pct(r[3], 2), "within 3 pts vs band": band_position(r[3], *band)})
        if t not in inputs.pareto:
            lines.append(f"- **{t}**: no sweep results (run `dvc repro sweep@{t}`).")
            continue
        if full is None:
            lines.append(f"- **{t}**: binary full finetune was not run (transfer.baselines), so there is no reference accuracy.")
            continue
        for k in (1, 3):
            h = hits[k]
            if h is None:
                lines.append(f"- **{t}**: no Pareto point is within {k} point{'s' if k > 1 else ''} of binary full "
                             f"finetune ({pct(full.test_acc if full is not None else None)}).")
            else:
                lines.append(f"- **{t}**: the smallest task memory within {k} point{'s' if k > 1 else ''} of binary "
                             f"full finetune is {pct(h.memory_ratio, 2)} of the base (trial {int(h.number)}, "
                             f"{h.method}, test {pct(h.test_acc)}): {band_position(h.memory_ratio, *band)}.")
    return "\n".join(lines), pd.DataFrame(rows)


def runs_table(inputs: Inputs) -> pd.DataFrame:
    cfg = per_config(inputs.results)

    def pm(m, s, fmt):
        return fmt(m) + (f" ± {fmt(s)}" if s and not math.isnan(s) and s > 0 else "")

    return pd.DataFrame({
        "target": cfg.target, "method": cfg.method, "precision": cfg.precision,
        "adapter": [f"g{g} r{r} {p} {b}-bit" if m in ADAPTERS else "" for m, g, r, p, b in
                    zip(cfg.method, cfg.groups, cfg.reduction, cfg.placement, cfg.adapter_bits)],
        "seeds": cfg.seeds,
        "test acc": [pm(m, s, lambda v: f"{100 * v:.1f}%") for m, s in zip(cfg.test_acc, cfg.test_acc_std)],
        "task memory": [f"{b / 1024:.2f} KiB ({100 * r:.1f}%)" for b, r in zip(cfg.task_memory_bytes, cfg.memory_ratio)],
        "train s": [pm(m, s, lambda v: f"{v:.1f}") for m, s in zip(cfg.train_time_s, cfg.train_time_s_std)],
    })


def sweep_table(inputs: Inputs) -> pd.DataFrame:
    rows = []
    for t in sorted(inputs.pareto):
        m = inputs.metrics.get(f"sweep_{t}", {})
        rows.append({"target": t, "complete trials": m.get("complete"), "failed": m.get("failed"),
                     "Pareto points": m.get("pareto_size"), "hypervolume": m.get("hypervolume"),
                     "reference point": str(m.get("reference_point"))})
    return pd.DataFrame(rows)


def table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False) if len(df) else "_(no rows)_"


def render(inputs: Inputs, figures: list[tuple[str, str]], band: tuple[float, float], max_ratio: float,
           provenance: dict[str, str]) -> str:
    acc_text, acc_tab = accuracy_section(inputs, max_ratio)
    time_text, time_tab = time_section(inputs)
    size_text, size_tab = size_section(inputs, band)
    times = stage_times(inputs.metrics)
    total = times.wall_time_s.sum() if len(times) else 0.0
    parts = [
        "# Adapters on a frozen binary network: results",
        "",
        "Written by `pipeline report` from `reports/results.csv`, `reports/metrics/*.json` and "
        "`reports/sweep/*/*.csv` only. Accuracies are test-set fractions shown as %; memory follows the one "
        "accounting rule (binary weights 1 bit, floats 32, BN 2 x 32 bits per channel, k-bit weights k bits + "
        f"a scale, pruned tensors non-zeros + mask or indices), as % of the binary base ({inputs.base_bytes / 1024:.2f} KiB).",
        "",
        f"## 1. Accuracy: the best adapter at <= {max_ratio:.0%} task memory vs standard transfer learning",
        "", acc_text, "", table(acc_tab), "",
        "## 2. Training time: adapters vs full finetune (binary)",
        "", time_text, "", table(time_tab), "",
        "## 3. Size: how small can the task state be?",
        "", size_text, "", table(size_tab), "",
        "## All transfer runs (mean ± std across seeds)", "", table(runs_table(inputs)), "",
        "## Sweeps", "", table(sweep_table(inputs)), "",
        "Hypervolume: area dominated by the Pareto set in (test accuracy x memory % of base) against the "
        "reference point; larger is better; one number for `dvc metrics diff`.", "",
        "## Figures", "",
    ]
    for path, caption in figures:
        parts += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    parts += ["## Where the time goes", "", table(times.assign(wall_time_s=times.wall_time_s.round(1))), "",
              f"Total stage wall time: {total:.0f} s.", "",
              "## How this was produced", ""]
    parts += [f"- {k}: `{v}`" for k, v in provenance.items()]
    return "\n".join(parts) + "\n"
