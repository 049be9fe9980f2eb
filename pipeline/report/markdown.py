"""report.md: the three research questions answered with numbers taken from the tables."""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from pipeline.report.analysis import (ADAPTERS, BREAKDOWN, Inputs, band_position, baseline, best_adapter, describe,
                                      most_accurate, per_config, smallest_within, stage_times, time_ratios)
from pipeline.stats import distinguishable


def pct(x: Optional[float], digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def ci_pct(mean: Optional[float], half: Optional[float], digits: int = 1) -> str:
    """A fraction as `96.5% ± 0.8` (the 95% half-width in points); one seed: `96.5% (1 seed)`."""
    if mean is None or math.isnan(mean):
        return "n/a"
    if half is None or math.isnan(half):
        return f"{pct(mean, digits)} (1 seed)"
    return f"{pct(mean, digits)} ± {100 * half:.{digits}f}"


def ci_num(mean: float, half: float, fmt: str = "{:.1f}") -> str:
    if half is None or math.isnan(half) or half == 0:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(half)}"


def pts(a: Optional[float], b: Optional[float]) -> str:
    """Gap a - b in percentage points, signed."""
    if a is None or b is None:
        return "n/a"
    return f"{100 * (a - b):+.1f} pts"


def verdict(a: Optional[pd.Series], b: Optional[pd.Series], split: str = "test") -> str:
    """`+1.2 pts` when the 95% intervals are apart, else `+1.2 pts, not distinguishable`."""
    if a is None or b is None:
        return "n/a"
    gap = pts(a[f"{split}_acc"], b[f"{split}_acc"])
    apart = distinguishable((a[f"{split}_acc"], a[f"{split}_acc_ci"]), (b[f"{split}_acc"], b[f"{split}_acc_ci"]))
    return gap if apart else f"{gap}, not distinguishable"


def ratio(x: Optional[float]) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}x"


def accuracy_section(inputs: Inputs, max_ratio: float) -> tuple[str, pd.DataFrame]:
    cfg = per_config(inputs.results)
    rows, lines = [], []
    for t in inputs.targets:
        best = best_adapter(inputs, t, max_ratio)
        base = {(m, p): baseline(cfg, t, m, p) for m, p in (("full", "binary"), ("full", "fp32"), ("head", "binary"),
                                                            ("bn", "binary"))}
        fb, ff, hd, bn = base[("full", "binary")], base[("full", "fp32")], base[("head", "binary")], base[("bn", "binary")]

        def acc(r):
            return "n/a" if r is None else ci_pct(r.test_acc, r.test_acc_ci)

        rows.append({
            "target": t,
            f"best adapter <= {max_ratio:.0%} (on val)": "none" if best is None else f"{best.method} ({best.source}, {pct(best.memory_ratio)})",
            "adapter test acc": acc(best),
            "binary full": acc(fb), "gap vs binary full": verdict(best, fb),
            "fp32 full": acc(ff), "gap vs fp32 full": verdict(best, ff),
            "head only": acc(hd), "gap vs head": verdict(best, hd),
            "BN thresholds + head": acc(bn), "gap vs BN": verdict(best, bn),
        })
        if best is None:
            lines.append(f"- **{t}**: no adapter configuration reached <= {max_ratio:.0%} of the base's memory.")
        else:
            lines.append(
                f"- **{t}**: the best adapter at <= {max_ratio:.0%} task memory ({best.method}, {best.source}, "
                f"{pct(best.memory_ratio)} of the base, chosen on val) reaches {acc(best)} test accuracy: "
                f"{verdict(best, fb)} vs binary full finetune ({acc(fb)}), "
                f"{verdict(best, ff)} vs fp32 full finetune ({acc(ff)}), "
                f"{verdict(best, hd)} vs head only ({acc(hd)})"
                + ("." if bn is None else f", {verdict(best, bn)} vs BN thresholds + head ({acc(bn)}, "
                                          f"{pct(bn.memory_ratio)} of the base).")
            )
    return "\n".join(lines), pd.DataFrame(rows)


def time_section(inputs: Inputs) -> tuple[str, pd.DataFrame]:
    cfg = per_config(inputs.results)
    rows, lines = [], []
    for t in inputs.targets:
        full = baseline(cfg, t, "full")
        for m in ("head", "bn") + ADAPTERS:
            r, row = time_ratios(inputs, t, m), baseline(cfg, t, m)
            if r is None:
                continue
            rows.append({"target": t, "method": m, "train s": ci_num(row.train_time_s, row.train_time_s_ci),
                         "binary full train s": ci_num(full.train_time_s, full.train_time_s_ci),
                         "train time ratio": ratio(r["train_time"]), "time-to-95% ratio": ratio(r["time_to_95"]),
                         "epoch time ratio": ratio(r["epoch_time"]),
                         "epochs run": f"{row.epochs_run:.1f} vs {full.epochs_run:.1f}"})
            if m in ADAPTERS:
                apart = distinguishable((row.train_time_s, row.train_time_s_ci), (full.train_time_s, full.train_time_s_ci))
                lines.append(f"- **{t}**, {m}: {ratio(r['train_time'])} the training seconds of binary full finetune "
                             f"({ci_num(row.train_time_s, row.train_time_s_ci)} s vs "
                             f"{ci_num(full.train_time_s, full.train_time_s_ci)} s"
                             f"{'' if apart else ', not distinguishable'}), {ratio(r['time_to_95'])} its "
                             f"time to 95% of final val accuracy, {ratio(r['epoch_time'])} its epoch time.")
    return "\n".join(lines), pd.DataFrame(rows)


def breakdown_text(r: pd.Series) -> str:
    """`weights 0.41, scales 0.12, BN 0.50, head 0.65, masks 0.00 KiB` (means over seeds)."""
    parts = [f"{b[4:-6].replace('bn', 'BN')} {r[b] / 1024:.2f}" for b in BREAKDOWN if b in r and not pd.isna(r[b])]
    return ", ".join(parts) + " KiB" if parts else "n/a"


def size_section(inputs: Inputs, band: tuple[float, float]) -> tuple[str, pd.DataFrame]:
    cfg = per_config(inputs.results)
    rows, lines = [], []
    for t in inputs.targets:
        full = baseline(cfg, t, "full")
        hits = {k: smallest_within(inputs, t, k) for k in (1, 3)}
        top = most_accurate(inputs, t)
        row = {"target": t, "binary full (val)": ci_pct(full.val_acc, full.val_acc_ci) if full is not None else "n/a"}
        for k, h in hits.items():
            row[f"smallest within {k} pt (on val)"] = "none" if h is None else f"{h.config} ({h.source})"
            row[f"memory ({k} pt)"] = pct(h.memory_ratio, 2) if h is not None else "n/a"
            row[f"test acc ({k} pt)"] = ci_pct(h.test_acc, h.test_acc_ci) if h is not None else "n/a"
            row[f"breakdown ({k} pt)"] = breakdown_text(h) if h is not None else "n/a"
        rows.append(row)
        if full is None:
            lines.append(f"- **{t}**: binary full finetune was not run (transfer.baselines), so there is no reference accuracy.")
            continue
        if t not in inputs.pareto:
            lines.append(f"- **{t}**: no sweep results (run `dvc repro sweep@{t}`); only the transfer stages' task states count.")
        for k in (1, 3):
            h = hits[k]
            unit = f"{k} point{'s' if k > 1 else ''}"
            if h is None:
                named = "" if top is None else (
                    f" The most accurate task state tried is {top.config} ({top.source}, {pct(top.memory_ratio, 2)} of the "
                    f"base; {breakdown_text(top)}): val {ci_pct(top.val_acc, top.val_acc_ci)}, "
                    f"{pts(top.val_acc, full.val_acc)} vs full; test {ci_pct(top.test_acc, top.test_acc_ci)}, "
                    f"{verdict(top, full)} vs full's {ci_pct(full.test_acc, full.test_acc_ci)}.")
                lines.append(f"- **{t}**: no task state is within {unit} of binary full finetune on val "
                             f"({ci_pct(full.val_acc, full.val_acc_ci)}).{named}")
            else:
                lines.append(f"- **{t}**: the smallest task state within {unit} of binary full finetune (on val: "
                             f"{ci_pct(h.val_acc, h.val_acc_ci)} vs {ci_pct(full.val_acc, full.val_acc_ci)}) is "
                             f"{pct(h.memory_ratio, 2)} of the base: {h.config} ({h.source}, {breakdown_text(h)}). Test "
                             f"{ci_pct(h.test_acc, h.test_acc_ci)} vs {ci_pct(full.test_acc, full.test_acc_ci)} for full "
                             f"finetune ({verdict(h, full)}); {band_position(h.memory_ratio, *band)}.")
    return "\n".join(lines), pd.DataFrame(rows)


def runs_table(inputs: Inputs) -> pd.DataFrame:
    cfg = per_config(inputs.results)
    lr = [("n/a" if pd.isna(v) else f"{v:g}") + (f" of {g}" if isinstance(g, str) else "")
          for v, g in zip(cfg.get("lr", [float("nan")] * len(cfg)), cfg.get("lr_grid", [None] * len(cfg)))]
    return pd.DataFrame({
        "target": cfg.target, "method": cfg.method, "precision": cfg.precision,
        "task state": [describe(r) if r.method != "full" else "" for _, r in cfg.iterrows()],
        "head bits": cfg.head_bits,
        "seeds": cfg.seeds,
        "val acc": [ci_pct(m, h) for m, h in zip(cfg.val_acc, cfg.val_acc_ci)],
        "test acc": [ci_pct(m, h) for m, h in zip(cfg.test_acc, cfg.test_acc_ci)],
        "task memory": [f"{b / 1024:.2f} KiB ({100 * r:.1f}%)" for b, r in zip(cfg.task_memory_bytes, cfg.memory_ratio)],
        "of which": [breakdown_text(r) if r.method != "full" else "" for _, r in cfg.iterrows()],
        "train s": [ci_num(m, h) for m, h in zip(cfg.train_time_s, cfg.train_time_s_ci)],
        "epochs run": [f"{e:.1f}" for e in cfg.epochs_run],
        "lr (chosen on val)": lr,
        "hit cap improving": cfg.hit_cap_improving,
    })


def sweep_table(inputs: Inputs) -> pd.DataFrame:
    rows = []
    for t in sorted(inputs.pareto):
        m = inputs.metrics.get(f"sweep_{t}", {})
        rows.append({"target": t, "complete trials": m.get("complete"), "failed": m.get("failed"),
                     "trials at cap, improving": m.get("trials_hit_cap_improving", "n/a"),
                     "Pareto points": m.get("pareto_size"), "seeds each": m.get("seeds"),
                     "memory range": f"{m.get('memory_pct_min', float('nan')):.1f}-{m.get('memory_pct_max', float('nan')):.1f}%"
                     if m.get("memory_pct_min") is not None else "n/a",
                     "hypervolume (val)": m.get("hypervolume"), "hypervolume (test, reported only)": m.get("hypervolume_test"),
                     "reference point": str(m.get("reference_point"))})
    return pd.DataFrame(rows)


def protocol_lines(inputs: Inputs) -> list[str]:
    """What every arm was trained and tuned by, read from the result files."""
    r = inputs.results
    grids = sorted(set(r.lr_grid.dropna())) if "lr_grid" in r else []
    seeds = sorted(set(r.seed))
    lines = [f"- Seeds: {', '.join(map(str, seeds))}; every number is the mean over seeds ± the 95% Student t "
             f"half-width in points. Intervals that overlap are called not distinguishable."]
    if grids:
        lines.append(f"- Every arm (full binary, full fp32, head, BN thresholds, serial, parallel): lr chosen on val from "
                     f"{{{'; '.join(grids)}}} with the first of the seeds, the other seeds repeat it; "
                     f"up to the cap, early stopping on val accuracy, best-val weights restored.")
    heads = sorted(set(r[r.method != "full"].head_bits)) if "head_bits" in r else []
    if heads:
        lines.append(f"- Every new head (head, BN thresholds, serial, parallel) is stored at {', '.join(f'{h}-bit' for h in heads)} "
                     f"weights (bias float32); full finetuning keeps its float head in its whole copy.")
    for t, p in sorted(inputs.pareto.items()):
        m = inputs.metrics.get(f"sweep_{t}", {})
        lines.append(f"- Sweep on {t}: {m.get('complete')} trials (own lr dimension, single seed, val only; the "
                     f"smallest and largest configuration of each adapter type first); its {len(p)} Pareto points "
                     f"retrained on every seed at the arms' budget"
                     + (f"; trials stopped at their cap still improving (single-seed scores that understate "
                        f"them): {m['trials_hit_cap_improving']}." if m.get("trials_hit_cap_improving") else "."))
    cfg = per_config(r)
    if "lr_grid" in cfg:
        edge = [f"{c.target}/{c.method}" + ("" if c.precision == "binary" else f" ({c.precision})")
                for c in cfg.itertuples() if isinstance(c.lr_grid, str)
                and c.lr in (min(map(float, c.lr_grid.split())), max(map(float, c.lr_grid.split())))
                and len(c.lr_grid.split()) > 2]  # with two values every choice is an end
        if edge:
            lines.append(f"- Chosen lr at an end of its grid (the best lr may lie outside it): {', '.join(edge)}.")
    flagged = int(cfg.hit_cap_improving.sum()) + sum(int(p.get("hit_cap_improving", pd.Series(dtype=int)).sum())
                                                              for p in inputs.pareto.values())
    lines.append(f"- Runs that hit their epoch cap while val accuracy was still rising: {flagged}"
                 + (" (flagged in the tables: their numbers are not converged)." if flagged else "."))
    return lines


def table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True) if len(df) else "_(no rows)_"


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
        "`reports/sweep/*/*.csv` only. Val chooses (lr, best adapter, smallest within k points, Pareto set); test "
        "only reports what val chose. Accuracies are fractions shown as %; memory follows the one "
        "accounting rule (binary weights 1 bit, floats 32, BN 2 values per channel, k-bit weights k bits "
        "(ternary 2) + a scale per output channel, the task state's per-channel floats at its `bn_bits`, pruned "
        f"tensors non-zeros + mask or indices), as % of the binary base ({inputs.base_bytes / 1024:.2f} KiB).",
        "",
        "## Protocol", "", *protocol_lines(inputs), "",
        f"## 1. Accuracy: the best adapter at <= {max_ratio:.0%} task memory vs standard transfer learning",
        "", acc_text, "", table(acc_tab), "",
        "## 2. Training time: adapters vs full finetune (binary)",
        "", time_text, "", table(time_tab), "",
        "## 3. Size: how small can the task state be?",
        "", size_text, "", table(size_tab), "",
        "## All transfer runs (mean ± 95% interval across seeds)", "", table(runs_table(inputs)), "",
        "## Sweeps", "", table(sweep_table(inputs)), "",
        "Hypervolume: area dominated by the Pareto set in (mean val accuracy over seeds x memory % of base) "
        "against the reference point; larger is better; the number to compare sweeps by (`dvc metrics diff`). "
        "The test hypervolume beside it chooses nothing.", "",
        "## Figures", "",
    ]
    for path, caption in figures:
        parts += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    parts += ["## Where the time goes", "", table(times.assign(wall_time_s=times.wall_time_s.round(1))), "",
              f"Total stage wall time: {total:.0f} s.", "",
              "## How this was produced", ""]
    parts += [f"- {k}: `{v}`" for k, v in provenance.items()]
    return "\n".join(parts) + "\n"
