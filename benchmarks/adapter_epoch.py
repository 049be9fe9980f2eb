"""Epoch time of each transfer method against a binary full finetune on the same target,
through the same training path (training seconds only, median over epochs). Needs the base and
the prepared target (`dvc repro pretrain`).

    python benchmarks/adapter_epoch.py [--target fashion_5to9] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace

from pipeline.config import load_params
from pipeline.train.spec import from_params
from pipeline.train.transfer import build
from pipeline.train.module import Classifier
from pipeline.train.trainer import make_trainer, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="fashion_5to9")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["full", "head", "serial", "parallel"])
    args = ap.parse_args()
    params = load_params()
    tmp = tempfile.mkdtemp()
    params = replace(params, trainer=replace(params.trainer, progress_bar=False),
                     tracking=replace(params.tracking, uri=f"sqlite:///{tmp}/mlflow.db"))
    o = replace(params.transfer.optim, max_epochs=args.epochs, patience=args.epochs + 1)
    medians = {}
    for method in args.methods:
        seed_everything(0, params)
        spec = replace(from_params(params, args.target, method, "binary", 0.005, 0), optim=o)
        net, data, _ = build(params, spec)
        run = make_trainer(params, run_name=f"benchmark-{method}", tags={"stage": "benchmark"}, optim=o)
        run.trainer.fit(Classifier(net, o, spec.lr, data.num_classes), datamodule=data)
        times = [r.train_seconds for r in run.timing.history]
        medians[method] = statistics.median(times)
        print(f"{method:9s} epoch {medians[method]:.3f} s (epochs {', '.join(f'{t:.2f}' for t in times)})")
    a = params.adapter
    print(f"adapter config: placement {a.placement}, groups {a.groups}, bits {a.bits}, task_bn {a.task_bn}")
    for method, t in medians.items():
        if method != "full" and "full" in medians:
            print(f"ratio {method}/full epoch time: {t / medians['full']:.3f}")


if __name__ == "__main__":
    main()
