"""Turn a registry source into prepared splits: class subset, resize, split, normalise, write
(the write side of the prepared format; `pipeline.data.prepared` reads it back)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split

from pipeline.config import Data, DatasetSpec
from pipeline.data.prepared import SPLITS
from pipeline.data.registry import source_of
from pipeline.errors import UserError
from pipeline.io import sha256



def select_classes(x: np.ndarray, y: np.ndarray, classes: list[int] | None, name: str):
    """Keep `classes` (in the given order) and relabel them 0..k-1."""
    present = sorted(int(c) for c in np.unique(y))
    if classes is None:
        classes = present
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(f"data.datasets.{name}.classes: {missing} not in the data; allowed: {present}")
    lut = {c: i for i, c in enumerate(classes)}
    keep = np.isin(y, classes)
    return x[keep], np.array([lut[int(c)] for c in y[keep]], dtype=np.int64), list(classes)


def cap_per_class(x: np.ndarray, y: np.ndarray, cap: int | None, seed: int):
    if cap is None:
        return x, y
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)])
    idx.sort()
    return x[idx], y[idx]


def to_shape(x: np.ndarray, size: int, channels: int) -> torch.Tensor:
    t = torch.from_numpy(x)
    if t.shape[1] == 3 and channels == 1:  # ITU-R 601 luma
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif t.shape[1] == 1 and channels == 3:
        t = t.repeat(1, 3, 1, 1)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.contiguous()


def stratified_split(y: np.ndarray, fractions: tuple[float, float, float], seed: int):
    """Indices of train, val, test; every class spread in proportion."""
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=y, random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val, test = train_test_split(rest, train_size=val_share, stratify=y[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def prepare_dataset(name: str, spec: DatasetSpec, data: Data, out_dir: Path) -> dict:
    source = source_of(name, spec)  # before anything is read or written
    x, y = source.load(Path(data.raw_dir), spec.path)
    x, y, classes = select_classes(x, y, spec.classes, name)
    x, y = cap_per_class(x, y, spec.max_per_class, data.seed)
    counts = np.bincount(y)
    if len(counts) < 2 or counts.min() < 3:
        raise UserError(
            f"data.datasets.{name}: needs at least 2 classes with 3 images each to split; got counts {counts.tolist()}"
        )
    images = to_shape(x, data.input_size, data.channels)
    s = data.split
    try:
        parts = stratified_split(y, (s.train, s.val, s.test), data.seed)
    except ValueError:  # sklearn: a class too small to reach every split
        raise UserError(
            f"data.datasets.{name}: class counts {counts.tolist()} are too small for split "
            f"{s.train:g}/{s.val:g}/{s.test:g}; every class needs images in train, val and test"
        ) from None
    train = images[parts[0]]
    dims = (0, 2, 3)
    mean, std = train.mean(dims), train.std(dims).clamp_min(1e-6)  # from train only

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": name,
        "source": spec.source,
        "classes": classes,
        "num_classes": len(classes),
        "input_size": data.input_size,
        "channels": data.channels,
        "seed": data.seed,
        "split": {"train": s.train, "val": s.val, "test": s.test},
        "mean": mean.tolist(),
        "std": std.tolist(),
        "counts": {},
        "sha256": {},
    }
    for split, idx in zip(SPLITS, parts):
        xs = ((images[idx] - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).contiguous()
        ys = torch.from_numpy(y[idx]).contiguous()
        file = out_dir / f"{split}.safetensors"
        save_file({"x": xs, "y": ys}, str(file))
        manifest["counts"][split] = {str(c): int((ys == c).sum()) for c in range(len(classes))}
        manifest["sha256"][split] = sha256(file)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
