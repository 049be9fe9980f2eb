"""Every output location of the pipeline (DESIGN.md's output contract), relative to the project
root; dvc.yaml names the same paths. No other module spells an output folder."""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
MODELS = Path("models")
BASE_DIR = MODELS / "base"
REPORTS = Path("reports")
METRICS_DIR = REPORTS / "metrics"
RESULTS_DIR = REPORTS / "results"     # one rows file per transfer arm
RESULTS_CSV = REPORTS / "results.csv"
PREDICTIONS_DIR = REPORTS / "predictions"  # <target>.npz: every arm's per-image predictions
SWEEP_DIR = REPORTS / "sweep"
PLOTS_DIR = REPORTS / "plots"


def prepared(dataset: str) -> Path:
    return PREPARED / dataset


def base_dir(precision: str) -> Path:
    return BASE_DIR / precision


def base_checkpoint(precision: str = "binary") -> Path:
    return BASE_DIR / precision / "model.pt"


def base_packed(precision: str = "binary") -> Path:
    return BASE_DIR / precision / "model.bnnpack"


def task_dir(target: str, variant: str) -> Path:
    """models/<target>/<variant>: one arm's task states (variant: method, or full_fp32)."""
    return MODELS / target / variant


def sweep_dir(target: str) -> Path:
    return SWEEP_DIR / target
