"""Per-image predictions: the predicted class of every val and test image of every reported run,
so any two runs compare image by image (pipeline.stats.paired_ci) and every recorded accuracy can
be recomputed. One compressed .npz per file: `labels/<split>` and `<run>/<split>` (uint8 class
indices), where <run> is `<variant>/seed<k>` (an arm), `trial<n>/seed<k>` (a sweep point) or
`pretrain/seed<k>`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

SPLITS = ("val", "test")


def run_key(name: str, seed: int) -> str:
    return f"{name}/seed{seed}"


def write(path: Path, labels: dict[str, np.ndarray], runs: dict[str, dict[str, np.ndarray]]) -> "Predictions":
    """`runs`: run key -> {split: predicted classes}; every split's length must match its labels.
    Returns what it wrote."""
    arrays = {f"labels/{s}": np.asarray(y, dtype=np.uint8) for s, y in labels.items()}
    for key, preds in runs.items():
        for s, p in preds.items():
            if len(p) != len(labels[s]):
                raise ValueError(f"predictions {key}/{s}: {len(p)} predictions for {len(labels[s])} images")
            arrays[f"{key}/{s}"] = np.asarray(p, dtype=np.uint8)
    out = Predictions(arrays)
    out.save(path)
    return out


class Predictions:
    """A predictions file read back (or several merged): labels and each run's predicted classes."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    @classmethod
    def read(cls, *paths: Path) -> "Predictions":
        arrays: dict[str, np.ndarray] = {}
        for p in paths:
            with np.load(p) as z:
                for k in z.files:
                    if k.startswith("labels/") and k in arrays and not np.array_equal(arrays[k], z[k]):
                        raise ValueError(f"{p}: {k} differs from another predictions file of the same target")
                    arrays[k] = z[k]
        return cls(arrays)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")  # atomic: a killed stage leaves no half file
        np.savez_compressed(tmp, **self.arrays)
        tmp.replace(path)

    def labels(self, split: str) -> np.ndarray:
        return self.arrays[f"labels/{split}"]

    def has(self, key: str, split: str) -> bool:
        return f"{key}/{split}" in self.arrays

    def runs(self) -> list[str]:
        return sorted({k.rsplit("/", 1)[0] for k in self.arrays if not k.startswith("labels/")})

    def correct(self, keys: Iterable[str], split: str) -> np.ndarray:
        """runs x images, 1 where the run's prediction is the label."""
        y = self.labels(split)
        return np.stack([(self.arrays[f"{k}/{split}"] == y) for k in keys]).astype(np.float64)

    def accuracy(self, key: str, split: str) -> float:
        return float(self.correct([key], split).mean())
