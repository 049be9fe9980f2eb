"""report.md: the three research questions answered with numbers taken from the tables."""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from pipeline.report.analysis import (ADAPTERS, BREAKDOWN, Inputs, band_position, baseline, best_adapter, describe,
                                      most_accurate, paired, smallest_within, stage_times, time_ratios)


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


class Tally:
    """Every paired comparison the report states, and how many of them are apart (95% interval
    excluding 0): the report's own measure of how decisive it is."""

    def __init__(self):
        self.n = self.apart = 0

    def gap(self, d: float, h: float, count: bool = True) -> str:
        """`+1.2 pts [+0.4, +2.0]`, `apart` or `not apart` by the interval."""
        if d is None or math.isnan(d):
            return "n/a"
        if math.isnan(h):
            return f"{100 * d:+.1f} pts (no interval)"
        apart = d - h > 0 or d + h < 0
        if count:
            self.n += 1
            self.apart += apart
        return f"{100 * d:+.1f} pts [{100 * (d - h):+.1f}, {100 * (d + h):+.1f}]{'' if apart else ', not apart'}"


def ratio(x: Optional[float]) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}x"


def ratio_ci(r: tuple[float, float, float]) -> str:
    m, lo, hi = r
    return "n/a" if math.isnan(m) else f"{m:.2f}x [{lo:.2f}, {hi:.2f}]" if not math.isnan(lo) else f"{m:.2f}x"


def acc(r: Optional[pd.Series]) -> str:
    return "n/a" if r is None else ci_pct(r.test_acc, r.test_acc_ci)


REFERENCES = (("full", "binary", "binary full"), ("full", "fp32", "fp32 full"), ("head", "binary", "head only"),
              ("bn", "binary", "BN thresholds + head"))


def accuracy_section(inputs: Inputs, max_ratio: float, tally: Tally) -> tuple[str, pd.DataFrame]:
    cfg = inputs.config()
    rows, lines = [], []
    for t in inputs.targets:
        found = best_adapter(inputs, t, max_ratio)
        if not found:
            lines.append(f"- **{t}**: no adapter configuration reached <= {max_ratio:.0%} of the base's memory.")
            continue
        for i, best in enumerate(found):
            row = {"target": t, "chosen on val": "best" if i == 0 else "not apart from the best",
                   f"adapter <= {max_ratio:.0%}": f"{best.config} ({best.source}, {pct(best.memory_ratio)})",
                   "adapter test acc": acc(best)}
            said = []
            for method, precision, name in REFERENCES:
                ref = baseline(cfg, t, method, precision)
                if ref is None:
                    continue
                g = tally.gap(*paired(inputs, t, best.key, ref.key, "test")[:2])
                row[name] = acc(ref)
                row[f"paired gap vs {name}"] = g
                said.append(f"{g} vs {name} ({acc(ref)})")
            rows.append(row)
            if i == 0:
                lines.append(f"- **{t}**: the best adapter at <= {max_ratio:.0%} task memory on val is {best.config} "
                             f"({best.source}, {pct(best.memory_ratio)} of the base): test {acc(best)}; paired test "
                             f"difference " + "; ".join(said) + ".")
            else:
                lines.append(f"  - not apart from it on val (paired val gap "
                             f"{tally.gap(best.val_gap, best.val_gap_ci, count=False)}): {best.config} ({best.source}, "
                             f"{pct(best.memory_ratio)}): test {acc(best)}; " + "; ".join(said) + ".")
    return "\n".join(lines), pd.DataFrame(rows)


def time_section(inputs: Inputs) -> tuple[str, pd.DataFrame]:
    cfg = inputs.config()
    rows, lines = [], []
    for t in inputs.targets:
        full = baseline(cfg, t, "full")
        if full is None:
            continue
        for method, precision in (("full", "fp32"), ("head", "binary"), ("bn", "binary")) + tuple((a, "binary") for a in ADAPTERS):
            r, row = time_ratios(inputs, t, method, precision), baseline(cfg, t, method, precision)
            if r is None or row is None:
                continue
            name = f"{method} ({precision})" if precision != "binary" else method
            rows.append({"target": t, "method": name, "epoch s": ci_num(row.epoch_time_s, row.epoch_time_s_ci, "{:.2f}"),
                         "epoch time vs binary full": ratio_ci(r["epoch_time_s"]),
                         "train s": ci_num(row.train_time_s, row.train_time_s_ci),
                         "train time vs binary full": ratio_ci(r["train_time_s"]),
                         "epochs run": f"{row.epochs_run:.1f} vs {full.epochs_run:.1f}",
                         "peak training memory": kib(row.get("train_memory_bytes")),
                         "of which activations": kib(row.get("train_activation_bytes"))})
            if method in ADAPTERS:
                lines.append(f"- **{t}**, {method}: epoch time {ratio_ci(r['epoch_time_s'])} and total training time "
                             f"{ratio_ci(r['train_time_s'])} those of binary full finetuning (paired over seeds, 95% "
                             f"interval); peak training memory {kib(row.get('train_memory_bytes'))} vs "
                             f"{kib(full.get('train_memory_bytes'))}.")
    return "\n".join(lines), pd.DataFrame(rows)


def kib(b) -> str:
    return "n/a" if b is None or (isinstance(b, float) and math.isnan(b)) else f"{b / 1024:,.0f} KiB"


def breakdown_text(r: pd.Series) -> str:
    """`weights 0.41, scales 0.12, BN 0.50, head 0.65, masks 0.00 KiB` (means over seeds)."""
    parts = [f"{b[4:-6].replace('bn', 'BN')} {r[b] / 1024:.2f}" for b in BREAKDOWN if b in r and not pd.isna(r[b])]
    return ", ".join(parts) + " KiB" if parts else "n/a"


def size_section(inputs: Inputs, band: tuple[float, float], tally: Tally) -> tuple[str, pd.DataFrame]:
    cfg = inputs.config()
    rows, lines = [], []
    for t in inputs.targets:
        full = baseline(cfg, t, "full")
        if full is None:
            lines.append(f"- **{t}**: binary full finetune was not run (transfer.baselines), so there is no reference accuracy.")
            continue
        if t not in inputs.pareto:
            lines.append(f"- **{t}**: no sweep results (run `dvc repro sweep@{t}`); only the transfer stages' task states count.")
        for k in (1, 3):
            h = smallest_within(inputs, t, k)
            unit = f"{k} point{'s' if k > 1 else ''}"
            row = {"target": t, "within": f"{k} pt"}
            if h is None:
                top = most_accurate(inputs, t)
                row["smallest state (on val)"] = "none"
                text = f"- **{t}**: no task state below the base's size has a paired val gap to binary full finetuning whose interval stays above -{unit}."
                if top is not None:
                    d, hw, _ = paired(inputs, t, top.key, "full", "val")
                    text += (f" The most accurate on val is {top.config} ({top.source}, {pct(top.memory_ratio, 2)} of the base): "
                             f"val gap {tally.gap(d, hw, count=False)}.")
                lines.append(text)
            else:
                g = tally.gap(*paired(inputs, t, h.key, "full", "test")[:2])
                row.update({"smallest state (on val)": f"{h.config} ({h.source})", "memory": pct(h.memory_ratio, 2),
                            "breakdown": breakdown_text(h), "val gap vs full": tally.gap(h.val_gap, h.val_gap_ci, count=False),
                            "test acc": acc(h), "paired test gap vs full": g})
                lines.append(f"- **{t}**, within {unit}: {h.config} ({h.source}), {pct(h.memory_ratio, 2)} of the base "
                             f"({breakdown_text(h)}); paired val gap to binary full {tally.gap(h.val_gap, h.val_gap_ci, count=False)}; "
                             f"test {acc(h)} vs full's {acc(full)}, paired {g}; {band_position(h.memory_ratio, *band)}.")
            rows.append(row)
    return "\n".join(lines), pd.DataFrame(rows)


def runs_table(inputs: Inputs) -> pd.DataFrame:
    cfg = inputs.config()
    return pd.DataFrame({
        "target": cfg.target, "method": cfg.method, "precision": cfg.precision,
        "task state": [describe(r) if r.method != "full" else "" for _, r in cfg.iterrows()],
        "seeds": cfg.seeds,
        "val acc": [ci_pct(m, h) for m, h in zip(cfg.val_acc, cfg.val_acc_ci)],
        "test acc": [ci_pct(m, h) for m, h in zip(cfg.test_acc, cfg.test_acc_ci)],
        "task memory": [f"{b / 1024:.2f} KiB ({100 * r:.1f}%)" for b, r in zip(cfg.task_memory_bytes, cfg.memory_ratio)],
        "of which": [breakdown_text(r) if r.method != "full" else "" for _, r in cfg.iterrows()],
        "train s": [ci_num(m, h) for m, h in zip(cfg.train_time_s, cfg.train_time_s_ci)],
        "epochs run": [f"{e:.1f}" for e in cfg.epochs_run],
        "lr": [f"{v:.3g}" for v in cfg.lr],
        "lr searched (selection seed, * chosen)": cfg.get("lr_searched", pd.Series(["n/a"] * len(cfg))),
        "hit cap improving": cfg.hit_cap_improving,
    })


def sweep_table(inputs: Inputs) -> pd.DataFrame:
    rows = []
    for t in sorted(inputs.pareto):
        m = inputs.metrics.get(f"sweep_{t}", {})
        rows.append({"target": t, "complete trials": m.get("complete"), "failed": m.get("failed"),
                     "trials at cap, improving": m.get("trials_hit_cap_improving", "n/a"),
                     "Pareto points": m.get("pareto_size"), "retrained": m.get("retrained"), "seeds each": m.get("seeds"),
                     "memory range": f"{m.get('memory_pct_min', float('nan')):.1f}-{m.get('memory_pct_max', float('nan')):.1f}%"
                     if m.get("memory_pct_min") is not None else "n/a",
                     "hypervolume, log10 memory 1-100% (val)": m.get("hypervolume_log_memory"),
                     "same (test, reported only)": m.get("hypervolume_log_memory_test")})
    return pd.DataFrame(rows)


def data_table(inputs: Inputs) -> pd.DataFrame:
    rows = []
    for stem, m in sorted(inputs.metrics.items()):
        if stem.startswith("prepare_"):
            rows.append({"dataset": stem[len("prepare_"):], "classes": m.get("num_classes"), "train": m.get("train_images"),
                         "val": m.get("val_images"), "test": m.get("test_images")})
    return pd.DataFrame(rows)


def protocol_lines(inputs: Inputs) -> list[str]:
    """What every arm was trained and tuned by, read from the result files."""
    r = inputs.results
    seeds = sorted(set(r.seed))
    lines = [f"- Reported seeds: {', '.join(map(str, seeds))}; none took part in a choice: every lr search and sweep "
             f"trial trained on a selection seed of its own. Accuracies are means over seeds x test images with a 95% "
             f"interval counting both seed-to-seed and test-image variation (two-way random-effects ANOVA, "
             f"Satterthwaite t; `pipeline.stats.crossed_ci`). A comparison of A with B is the paired difference "
             f"(same seeds, same images) with its interval (`paired_ci`); A and B are *apart* when it excludes 0.",
             "- Every arm (full binary, full fp32, head, BN thresholds, serial, parallel): lr chosen on val by a bracketing "
             "search on the selection seed (log-spaced start values, extended past a winning end until the winner is interior "
             "or a limit; a run trailing the finished ones is pruned by Optuna's MedianPruner); the searched values are in the "
             "table of all runs. Up to the cap, early stopping on val accuracy, best-val weights restored."]
    heads = sorted(set(r[r.method != "full"].head_bits)) if "head_bits" in r else []
    if heads:
        lines.append(f"- Every new head (head, BN thresholds, serial, parallel) is stored at {', '.join(f'{h}-bit' for h in heads)} "
                     f"weights (bias float32); full finetuning keeps its float head in its whole copy.")
    for t, p in sorted(inputs.pareto.items()):
        m = inputs.metrics.get(f"sweep_{t}", {})
        lines.append(f"- Sweep on {t}: {m.get('complete')} trials (own lr dimension, selection seed, val only; the "
                     f"smallest and largest configuration of each adapter type first); {len(p)} of them (its Pareto set "
                     f"below the base's size, then the next non-dominated layers) retrained on every reported seed at the "
                     f"arms' budget.")
    cfg = inputs.config()
    edge = [f"{c.target}/{c.key}" for c in cfg.itertuples()
            if isinstance(getattr(c, "lr_searched", None), str) and _at_end(c.lr_searched)]
    if edge:
        lines.append(f"- Chosen lr still at an end of its search (a limit reached): {', '.join(edge)}.")
    flagged = int(cfg.hit_cap_improving.sum()) + sum(int(p.get("hit_cap_improving", pd.Series(dtype=int)).sum())
                                                              for p in inputs.pareto.values())
    lines.append(f"- Runs that hit their epoch cap while val accuracy was still rising: {flagged}"
                 + (" (flagged in the tables: their numbers are not converged)." if flagged else "."))
    return lines


def _at_end(searched: str) -> bool:
    """`0.003, 0.01*, 0.03 (pruned)`: the starred value is the first or last searched."""
    parts = [s.strip() for s in searched.split(",")]
    return len(parts) > 1 and ("*" in parts[0].split()[0] or "*" in parts[-1].split()[0])


def table(df: pd.DataFrame) -> str:
    """A cell its row lacks (a column other rows have) prints empty, not `nan`."""
    return df.astype(object).where(df.notna(), "").to_markdown(index=False, disable_numparse=True) if len(df) \
        else "_(no rows)_"


def in_short(inputs: Inputs, band: tuple[float, float], max_ratio: float, tally: Tally) -> list[str]:
    """The answer in a few lines, and the prior study's claim ("7-12% of the base is a good
    compromise, a few points below standard transfer learning, faster to train") judged point by
    point with paired intervals."""
    cfg = inputs.config()
    lines = []
    for t in inputs.targets:
        full, fp32 = baseline(cfg, t, "full"), baseline(cfg, t, "full", "fp32")
        found = best_adapter(inputs, t, band[1])
        inband = [f for f in found if f.memory_ratio >= band[0]] or found
        if full is None or not inband:
            continue
        b = inband[0]
        d, h, _ = paired(inputs, t, b.key, full.key, "test")
        parts = [f"**{t}**: the best adapter at <= {band[1]:.0%} ({b.config}, {pct(b.memory_ratio)} of the base) "
                 f"reaches {acc(b)} test, {tally.gap(d, h, count=False)} vs binary full finetuning ({acc(full)})"]
        if fp32 is not None:
            parts.append(f"{tally.gap(*paired(inputs, t, b.key, fp32.key, 'test')[:2], count=False)} vs fp32 full ({acc(fp32)})")
        few = "within a few points (the interval inside [-5, 0] pts)" if -0.05 <= d - h and d + h <= 0 else \
            "not below standard transfer learning" if d - h > 0 else \
            "more than a few points below" if d + h < -0.05 else "not pinned down to a few points"
        r = time_ratios(inputs, t, b.method) if b.source == "transfer stage" else None
        r = r or time_ratios(inputs, t, "parallel")
        faster = "n/a" if r is None else ratio_ci(r["train_time_s"])
        verdict = ("faster" if r is not None and r["train_time_s"][2] < 1 else
                   "slower" if r is not None and r["train_time_s"][1] > 1 else "not apart in time")
        lines.append("- " + "; ".join(parts) + f". Prior claim, point by point: a few points below standard transfer "
                     f"learning: {few}; faster to train: {verdict} (training time {faster} binary full's, "
                     f"{b.method if b.source == 'transfer stage' else 'parallel'} arm, paired over seeds).")
    return lines


def render(inputs: Inputs, figures: list[tuple[str, str]], band: tuple[float, float], max_ratio: float,
           provenance: dict[str, str]) -> str:
    tally = Tally()
    acc_text, acc_tab = accuracy_section(inputs, max_ratio, tally)
    time_text, time_tab = time_section(inputs)
    size_text, size_tab = size_section(inputs, band, tally)
    short = in_short(inputs, band, max_ratio, tally)
    times = stage_times(inputs.metrics)
    total = times.wall_time_s.sum() if len(times) else 0.0
    parts = [
        "# Adapters on a frozen binary network: results",
        "",
        "Written by `pipeline report` from `reports/results.csv`, `reports/predictions/*.npz`, `reports/metrics/*.json` "
        "and `reports/sweep/*/` only. Val chooses (lr, best adapter, smallest within k points, the sweep's points); test "
        "only reports what val chose. Accuracies are fractions shown as %, `mean ± 95% half-width` in points; gaps are "
        "`difference [95% interval]` in points. Memory follows the one accounting rule (binary weights 1 bit, floats 32, "
        "BN 2 values per channel, k-bit weights k bits (ternary 2) + a scale per output channel, the task state's "
        "per-channel floats at its `bn_bits`, pruned tensors non-zeros + mask or indices), as % of the binary base "
        f"({inputs.base_bytes / 1024:.2f} KiB).",
        "",
        "## In short", "", *short, "",
        f"Paired comparisons stated in sections 1 and 3: {tally.n}, of which {tally.apart} are apart (95% interval "
        f"excluding 0).", "",
        "## Data", "", table(data_table(inputs)), "",
        "## Protocol", "", *protocol_lines(inputs), "",
        f"## 1. Accuracy: the best adapter at <= {max_ratio:.0%} task memory vs standard transfer learning",
        "", acc_text, "", table(acc_tab), "",
        "## 2. Training time and memory: every method vs binary full finetuning",
        "", "Ratios are paired over seeds (exp of the mean log ratio, 95% t interval); every run of an arm timed alike: "
        "the reported seeds side by side with one thread each, each worker warmed up first. Peak training memory: one "
        "training step's saved activations, parameters, and gradient and Adam moments of the trainable ones "
        "(TinyTL's measure).", "", time_text, "", table(time_tab), "",
        "## 3. Size: how small can the task state be?",
        "", "The smallest task state below the base's size whose paired val gap to binary full finetuning has its 95% "
        "interval's lower end above -1 point (and -3), chosen on val and reported on test.", "",
        size_text, "", table(size_tab), "",
        "## All transfer runs", "", table(runs_table(inputs)), "",
        "## Sweeps", "", table(sweep_table(inputs)), "",
        "Hypervolume over log10 memory: the area dominated by the sweep's Pareto points (mean val accuracy over the "
        "reported seeds x log10 of memory % of base, from 1% to 100%), so each decade of memory weighs alike; larger is "
        "better; the number to compare sweeps by (`dvc metrics diff`). The test one beside it chooses nothing.", "",
        "## Figures", "",
    ]
    for path, caption in figures:
        parts += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    parts += ["## Where the time goes", "", table(times.assign(wall_time_s=times.wall_time_s.round(1))), "",
              f"Total stage wall time: {total:.0f} s.", "",
              "## How this was produced", ""]
    parts += [f"- {k}: `{v}`" for k, v in provenance.items()]
    return "\n".join(parts) + "\n"
