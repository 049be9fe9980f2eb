"""Stage `prepare`: one dataset from params.data.datasets -> data/prepared/<name>/."""

from __future__ import annotations

import time

from pipeline.config import Params
from pipeline.data.prepare import prepare_dataset
from pipeline.io import write_json
from pipeline.paths import METRICS_DIR, prepared


def run(params: Params, name: str) -> dict:
    spec = params.dataset(name, "prepare", "dataset")
    t0 = time.perf_counter()
    manifest = prepare_dataset(name, spec, params.data, prepared(name))
    counts = {split: sum(c.values()) for split, c in manifest["counts"].items()}
    write_json(METRICS_DIR / f"prepare_{name}.json", {
        **{f"{k}_images": v for k, v in counts.items()}, "num_classes": manifest["num_classes"],
        "train_sha256": manifest["sha256"]["train"][:16], "wall_time_s": round(time.perf_counter() - t0, 3)})
    print(f"prepared {name}: {manifest['num_classes']} classes, {counts} -> {prepared(name)}")
    return manifest
