"""Stage `prepare`: one dataset from params.data.datasets -> data/prepared/<name>/."""

from __future__ import annotations

from pathlib import Path

import time

from pipeline.config import Params
from pipeline.paths import METRICS_DIR, prepared
from pipeline.data.prepare import prepare_dataset
from pipeline.errors import UserError
from pipeline.io import write_json


def run(params: Params, name: str) -> dict:
    if name not in params.data.datasets:
        raise UserError(f"prepare: unknown dataset '{name}'; allowed (data.datasets): {', '.join(params.data.datasets)}")
    t0 = time.perf_counter()
    manifest = prepare_dataset(name, params.data.datasets[name], params.data, prepared(name))
    counts = {split: sum(c.values()) for split, c in manifest["counts"].items()}
    write_json(METRICS_DIR / f"prepare_{name}.json", {
        **{f"{k}_images": v for k, v in counts.items()}, "num_classes": manifest["num_classes"],
        "train_sha256": manifest["sha256"]["train"][:16], "wall_time_s": round(time.perf_counter() - t0, 3)})
    print(f"prepared {name}: {manifest['num_classes']} classes, {counts} -> {prepared(name)}")
    return manifest
