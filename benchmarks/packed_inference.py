"""Inference on one core: the numpy XNOR-popcount path (pipeline.runtime.xnor) against torch's float32
inference of the same network (both built from the same packed files), in images/s at batch 1
and batch 256, median over repeats; predictions compared on every timed image. Needs the default
run's packed base and task state.

    python benchmarks/packed_inference.py [--task models/fashion_5to9/parallel/adapter.bnnpack] [--repeats 5]
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, numpy's BLAS too
    os.environ[var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.paths import prepared, task_dir  # noqa: E402
from pipeline.runtime.loader import load_state, read_task  # noqa: E402
from pipeline.runtime.xnor import load_numpy_net  # noqa: E402
from pipeline.train.datamodule import PreparedData  # noqa: E402


def images_per_s(fn, batches: list, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        runs.append(sum(len(b) for b in batches) / (time.perf_counter() - t0))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=str(task_dir("fashion_5to9", "parallel") / "adapter.bnnpack"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--single", type=int, default=200, help="images timed one at a time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    state = read_task(Path(args.task))
    net, meta = load_state(state), state.meta
    fast = load_numpy_net(Path(args.task))
    x, _ = PreparedData(prepared(meta["target"]), 1).splits["test"]
    x = torch.cat([x] * (-(-256 // len(x))))[:256] if len(x) < 256 else x[:256]
    xn = x.numpy()

    @torch.inference_mode()
    def torch_fn(b):
        return net(b)

    same = np.array_equal(torch_fn(x).argmax(1).numpy(), fast(xn).argmax(1))
    rows = []
    for name, batches_t, batches_n in (
            ("batch 1", [x[i: i + 1] for i in range(args.single)], [xn[i: i + 1] for i in range(args.single)]),
            ("batch 256", [x], [xn])):
        t = images_per_s(torch_fn, batches_t, args.repeats)
        n = images_per_s(fast, batches_n, args.repeats)
        rows.append((name, t, n))
    print(f"{args.task} ({meta['method']}, {meta['target']}), one core (torch threads 1, BLAS threads 1), "
          f"median of {args.repeats}; same argmax on all 256 images: {same}")
    print("| batch | torch float32 images/s | numpy XNOR images/s | numpy / torch |")
    print("|---|---|---|---|")
    for name, t, n in rows:
        print(f"| {name} | {t:,.0f} | {n:,.0f} | {n / t:.2f} |")


if __name__ == "__main__":
    main()
