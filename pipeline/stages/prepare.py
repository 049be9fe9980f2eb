"""Stage `prepare`: one dataset from params.data.datasets -> data/prepared/<name>/."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PREPARED, Params
from pipeline.data.prepare import prepare_dataset
from pipeline.errors import UserError


def run(params: Params, name: str) -> dict:
    if name not in params.data.datasets:
        raise UserError(f"prepare: unknown dataset '{name}'; allowed (data.datasets): {', '.join(params.data.datasets)}")
    manifest = prepare_dataset(name, params.data.datasets[name], params.data, PREPARED / name)
    counts = {split: sum(c.values()) for split, c in manifest["counts"].items()}
    print(f"prepared {name}: {manifest['num_classes']} classes, {counts} -> {PREPARED / name}")
    return manifest
