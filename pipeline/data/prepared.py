"""The prepared format, read side: `data/prepared/<name>/` holds train/val/test safetensors (x
normalised, y relabelled 0..k-1) and manifest.json with each split's sha256. Apart from
`pipeline.data.prepare` (the write side), so the stages that only read prepared data do not
depend on the dataset sources."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.io import sha256

SPLITS = ("train", "val", "test")


def load_prepared(folder: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a prepared dataset, checking it is complete and unchanged since `prepare`."""
    folder = Path(folder)
    manifest_file = folder / "manifest.json"
    if not manifest_file.exists():
        raise UserError(f"{folder}: not a prepared dataset (no manifest.json); run `pipeline prepare {folder.name}`")
    try:
        manifest = json.loads(manifest_file.read_text())
        expected = manifest["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{manifest_file}: corrupt manifest; rerun `pipeline prepare {folder.name}`") from None
    splits = {}
    for split in SPLITS:
        file = folder / f"{split}.safetensors"
        if not file.exists() or sha256(file) != expected.get(split):
            raise UserError(f"{file}: missing or changed since prepare; rerun `pipeline prepare {folder.name}`")
        t = load_file(str(file))
        splits[split] = (t["x"], t["y"])
    return manifest, splits
