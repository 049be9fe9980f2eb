"""Every task state of a run, from its packed files alone: for each `models/<target>/<method>/
adapter*.bnnpack` (every method, every seed) and each retrained Pareto point under
`reports/sweep/<target>/pareto/`, the network rebuilt from base + task state is run on the whole
test split and compared with the trained network (safetensors + checkpoint: same argmax on every
image, largest logit difference) and with the numpy XNOR path; its accuracy against the recorded
one. Needs a finished `dvc repro`.

    python benchmarks/packed_check.py [--no-numpy]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from pipeline.config import BASE_DIR, PREPARED
from pipeline.console import quiet
from pipeline.nn.adapter_io import apply_adapter, read_adapter
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.packed import compare, load_packed_net, logits
from pipeline.train.datamodule import PreparedData
from pipeline.xnor import load_numpy_net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy XNOR comparison")
    args = ap.parse_args()
    quiet()
    files = sorted(Path("models").glob("*/*/adapter*.bnnpack")) + sorted(Path("reports/sweep").glob("*/pareto/*.bnnpack"))
    data, bases = {}, {}
    total = {"files": 0, "images": 0, "trained": 0, "numpy": 0, "acc": 0}
    worst = {"trained": 0.0, "numpy": 0.0}
    print("| task state | images | accuracy (recorded) | mismatches vs trained | max logit diff | "
          "mismatches vs numpy | max logit diff |")
    print("|---|---|---|---|---|---|---|")
    for f in files:
        net, meta = load_packed_net(f)
        target = meta["target"]
        if target not in data:
            data[target] = PreparedData(PREPARED / target, 1).splits["test"]
        x, y = data[target]
        out = logits(net, x)
        acc = float((out.argmax(1) == y).float().mean())
        config, tensors = read_adapter(f.with_suffix(""))
        base_file = BASE_DIR / config["precision"] / "model.pt"
        if base_file not in bases:
            bases[base_file] = (load_base(base_file), sha256(base_file))
        base, sha = bases[base_file]
        trained = compare(out, logits(apply_adapter(copy.deepcopy(base), sha, config, tensors, str(f)), x))
        recorded = config["metrics"]["test_acc"]
        row = [str(f), str(len(y)), f"{acc:.4f} ({recorded:.4f})", str(trained["mismatches"]),
               f"{trained['max_logit_diff']:.2g}"]
        total["trained"] += trained["mismatches"]
        worst["trained"] = max(worst["trained"], trained["max_logit_diff"])
        if args.no_numpy:
            row += ["-", "-"]
        else:
            num = compare(out, torch.from_numpy(load_numpy_net(f)(x.numpy())))
            row += [str(num["mismatches"]), f"{num['max_logit_diff']:.2g}"]
            total["numpy"] += num["mismatches"]
            worst["numpy"] = max(worst["numpy"], num["max_logit_diff"])
        total["files"] += 1
        total["images"] += len(y)
        total["acc"] += round(recorded * len(y)) != int((out.argmax(1) == y).sum())  # recorded is rounded
        print("| " + " | ".join(row) + " |")
    print(f"\n{total['files']} task states, {total['images']:,} test images: {total['trained']} argmax mismatches vs "
          f"the trained network (largest logit difference {worst['trained']:.3g}), "
          + ("" if args.no_numpy else f"{total['numpy']} vs the numpy path (largest {worst['numpy']:.3g}), ")
          + f"{total['acc']} accuracies differing from the recorded ones (in correct images)")


if __name__ == "__main__":
    main()
