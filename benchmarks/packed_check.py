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
from pathlib import Path

from pipeline.config import load_params
from pipeline.console import quiet
from pipeline.paths import MODELS, SWEEP_DIR
from pipeline.stages.evaluate import check_packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy XNOR comparison")
    args = ap.parse_args()
    quiet()
    params = load_params("params.yaml")
    against = ("trained",) if args.no_numpy else ("trained", "numpy")
    files = sorted(MODELS.glob("*/*/adapter*.bnnpack")) + sorted(SWEEP_DIR.glob("*/pareto/*.bnnpack"))
    total = {"files": 0, "images": 0, "trained": 0, "numpy": 0, "acc": 0}
    worst = {"trained": 0.0, "numpy": 0.0}
    print("| task state | images | accuracy (recorded) | mismatches vs trained | max logit diff | "
          "mismatches vs numpy | max logit diff |")
    print("|---|---|---|---|---|---|---|")
    for f in files:
        r = check_packed(params, f, against=against)
        row = [str(f), str(r["images"]), f"{r['accuracy']:.4f} ({r['recorded']:.4f})"]
        for other in ("trained", "numpy"):
            if other not in r:
                row += ["-", "-"]
                continue
            row += [str(r[other]["mismatches"]), f"{r[other]['max_logit_diff']:.2g}"]
            total[other] += r[other]["mismatches"]
            worst[other] = max(worst[other], r[other]["max_logit_diff"])
        total["files"] += 1
        total["images"] += r["images"]
        total["acc"] += round(r["recorded"] * r["images"]) != r["correct"]  # the record is rounded
        print("| " + " | ".join(row) + " |")
    print(f"\n{total['files']} task states, {total['images']:,} test images: {total['trained']} argmax mismatches vs "
          f"the trained network (largest logit difference {worst['trained']:.3g}), "
          + ("" if args.no_numpy else f"{total['numpy']} vs the numpy path (largest {worst['numpy']:.3g}), ")
          + f"{total['acc']} accuracies differing from the recorded ones (in correct images)")


if __name__ == "__main__":
    main()
