"""Should a stage's independent runs (lr grid, seeds) go side by side, one torch thread each, or
one after another with all threads? Times plain training epochs of one full finetune on a target
both ways and prints the throughput ratio. Needs `dvc repro prepare` first.

    python benchmarks/side_by_side.py [--target fashion_5to9] [--precision binary] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def epochs(threads: int, target: str, precision: str, n: int) -> list[float]:
    import torch

    sys.path.insert(0, str(HERE))
    from throughput import plain_epochs

    from pipeline.config import load_params
    from pipeline.paths import prepared
    from pipeline.nn.backbones import Arch, build_backbone
    from pipeline.train.datamodule import PreparedData

    torch.set_num_threads(threads)
    p = load_params()
    data = PreparedData(prepared(target), p.transfer.optim.batch_size, 0, 0)
    arch = Arch(p.model.name, precision, data.num_classes, p.data.channels, p.data.input_size, p.model.width)
    torch.manual_seed(0)
    return plain_epochs(build_backbone(arch), data.train_dataloader(), 0.005, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="fashion_5to9")
    ap.add_argument("--precision", default="binary", choices=["binary", "fp32"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.threads:
        print(statistics.median(epochs(args.threads, args.target, args.precision, args.epochs)))
        return
    cmd = [sys.executable, __file__, "--target", args.target, "--precision", args.precision, "--epochs", str(args.epochs)]
    one = float(subprocess.run(cmd + ["--threads", "2"], capture_output=True, text=True, check=True).stdout)
    procs = [subprocess.Popen(cmd + ["--threads", "1"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    pair = [float(p.communicate()[0]) for p in procs]
    print(f"one process, 2 threads: {one:.2f} s/epoch")
    print(f"two processes, 1 thread each: {', '.join(f'{t:.2f}' for t in pair)} s/epoch "
          f"(effective {max(pair) / 2:.2f} s/epoch)")
    print(f"throughput side by side / one process: {one / (max(pair) / 2):.2f}x; for 3 + 2 runs "
          f"(lr grid, then 2 seeds): {(5 * one) / (3 * max(pair)):.2f}x")


if __name__ == "__main__":
    main()
