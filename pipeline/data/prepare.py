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

from pipeline.config import Data, DatasetSpec, ParamsError, Split
from pipeline.data.prepared import SPLITS
from pipeline.data.registry import source_of
from pipeline.errors import UserError
from pipeline.io import sha256



def select_classes(y: np.ndarray, classes: list[int] | None, name: str):
    """The images of `classes` (in the given order), relabelled 0..k-1: (their indices, labels, classes)."""
    present = sorted(int(c) for c in np.unique(y))
    if classes is None:
        classes = present
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(f"data.datasets.{name}.classes: {missing} not in the data; allowed: {present}")
    lut = {c: i for i, c in enumerate(classes)}
    keep = np.flatnonzero(np.isin(y, classes))
    return keep, np.array([lut[int(c)] for c in y[keep]], dtype=np.int64), list(classes)


def cap_per_class(y: np.ndarray, cap: int | None, seed: int, exempt: np.ndarray | None = None) -> np.ndarray:
    """Indices of at most `cap` images per class (drawn by `seed`), the `exempt` ones (an official
    test split: the budget caps training images only) all kept."""
    idx = np.arange(len(y))
    if cap is None:
        return idx
    capped = idx if exempt is None else idx[~exempt]
    rng = np.random.default_rng(seed)
    kept = np.concatenate([rng.permutation(capped[y[capped] == c])[:cap] for c in np.unique(y[capped])])
    if exempt is not None:
        kept = np.concatenate([kept, idx[exempt]])
    return np.sort(kept)


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


def counted_split(y: np.ndarray, split: Split, seed: int, official_test: np.ndarray | None, name: str):
    """Indices of train, val, test with `split`'s counts per class, drawn by `seed`: train and val
    from the training images (all of them, or those not in the official test split), test from
    what is left of them or (a source with one) from the official test images; `all`: every one."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(y))
    pool, test_pool = (idx, None) if official_test is None else (idx[~official_test], idx[official_test])
    parts: tuple[list, list, list] = ([], [], [])
    for c in np.unique(y):
        mine = rng.permutation(pool[y[pool] == c])
        tests = mine[split.train + split.val:] if test_pool is None else rng.permutation(test_pool[y[test_pool] == c])
        wanted = 1 if split.test == "all" else split.test
        if len(mine) < split.train + split.val or len(tests) < wanted:
            where = "training " if test_pool is not None else ""
            raise UserError(f"data.datasets.{name}: class {int(c)} has {len(mine)} {where}images"
                            + ("" if test_pool is None else f" and {len(tests)} test images")
                            + f", too few for split train {split.train}, val {split.val}, test {split.test} per class")
        parts[0].append(mine[:split.train])
        parts[1].append(mine[split.train:split.train + split.val])
        parts[2].append(tests if split.test == "all" else tests[:split.test])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def split_indices(name: str, y: np.ndarray, official_test: np.ndarray | None, s: Split, seed: int):
    """train, val and test indices: fractions (stratified) or counts per class."""
    if s.counts:
        return counted_split(y, s, seed, official_test, name)
    counts = np.bincount(y)
    try:
        return stratified_split(y, (s.train, s.val, s.test), seed)
    except ValueError:  # sklearn: a class too small to reach every split
        raise UserError(
            f"data.datasets.{name}: class counts {counts.tolist()} are too small for split "
            f"{s.train:g}/{s.val:g}/{s.test:g}; every class needs images in train, val and test"
        ) from None


def prepare_dataset(name: str, spec: DatasetSpec, data: Data, out_dir: Path) -> dict:
    source = source_of(name, spec)  # before anything is read or written
    s = spec.split or data.split
    if source.official_test and not s.counts:
        key = f"data.datasets.{name}.split" if spec.split else "data.split"
        raise ParamsError(f"{key}: fractions, but '{spec.source}' keeps its official test split as the test split; "
                          f"allowed: counts per class, e.g. {{train: 200, val: 100, test: all}}")
    x, y, official = source.load(Path(data.raw_dir), spec.path)
    keep, y, classes = select_classes(y, spec.classes, name)
    official = None if official is None else official[keep]
    kept = cap_per_class(y, spec.max_per_class, data.seed, official)
    x, y, official = x[keep[kept]], y[kept], None if official is None else official[kept]
    counts = np.bincount(y)
    if len(counts) < 2 or counts.min() < 3:
        raise UserError(
            f"data.datasets.{name}: needs at least 2 classes with 3 images each to split; got counts {counts.tolist()}"
        )
    images = to_shape(x, data.input_size, data.channels)
    parts = split_indices(name, y, official, s, data.seed)
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
        "official_test": source.official_test,  # the test split is the source's own test images
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
