"""Stage `report`: reports/results.csv, reports/metrics/*.json, reports/sweep/*/*.csv ->
reports/plots/*.png and reports/report.md. No training, no MLflow."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import Params
from pipeline.io import sha256
from pipeline.paths import REPORTS
from pipeline.report import plots
from pipeline.report.analysis import load_inputs
from pipeline.report.markdown import render
from pipeline.train.tracking import git_commit



def run(params: Params, params_file: Path = Path("params.yaml"), reports: Path = REPORTS) -> Path:
    t0 = time.perf_counter()
    r = params.report
    inputs = load_inputs(reports)
    band = (r.band_low, r.band_high)
    out = reports / "plots"
    figures = []
    for t in inputs.targets:
        plots.accuracy_vs_memory(inputs, t, band, out / f"accuracy_vs_memory_{t}.png", r.dpi)
        figures.append((f"plots/accuracy_vs_memory_{t}.png",
                        f"Test accuracy vs task memory on {t}: each method, the sweep's trials (faint, val accuracy) "
                        f"and Pareto front, the {band[0]:.0%}-{band[1]:.0%} band shaded."))
    for t in sorted(inputs.pareto):
        plots.sweep_front(inputs, t, out / f"sweep_{t}.png", r.dpi)
        figures.append((f"plots/sweep_{t}.png", f"The sweep on {t}: its trials (val, one seed) and its Pareto set "
                                                 f"retrained on every seed (val and test, 95% intervals)."))
    plots.training_time(inputs, out / "training_time.png", r.dpi)
    figures.append(("plots/training_time.png", "Training seconds per method and target (validation excluded)."))
    plots.learning_curves(inputs, out / "learning_curves.png", r.dpi)
    figures.append(("plots/learning_curves.png", "Validation accuracy against cumulative training seconds."))
    plots.storage_for_tasks(inputs, r.n_tasks, out / "storage_for_tasks.png", r.dpi)
    figures.append(("plots/storage_for_tasks.png",
                    f"Storage for N = 1..{r.n_tasks} tasks: one binary base plus N task states vs N full copies."))
    manifests = {k: m.get("train_sha256") for k, m in inputs.metrics.items() if k.startswith("prepare_")}
    provenance = {
        "params.yaml sha256": sha256(Path(params_file), length=16),
        "git commit": git_commit(),
        **{f"dataset {k[len('prepare_'):]} (train split sha256)": v for k, v in manifests.items()},
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "report stage seconds": f"{time.perf_counter() - t0:.1f}",
    }
    text = render(inputs, figures, band, r.max_ratio, provenance)
    (reports / "report.md").write_text(text)
    print(f"report: {reports / 'report.md'} and {len(figures)} plots in {time.perf_counter() - t0:.1f}s")
    return reports / "report.md"
