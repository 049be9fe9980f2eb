"""Adapter weight bits at full width: parallel adapters, groups 1, on every block, at 1, 2, 4 and 8
bits (and ternary). For each: task memory by hand (from the block widths), by the one memory
function, and as the packed file's payload; and test accuracy, mean ± 95% interval over the
default seeds, at the lr the default run chose for `parallel` on the target. Needs the default
run's base, prepared target and transfer metrics (`dvc repro`).

    python benchmarks/bits_table.py [--target fashion_5to9] [--bits 1 2 4 8 ternary]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from pipeline.config import load_params
from pipeline.paths import METRICS_DIR, base_checkpoint, prepared
from pipeline.console import quiet
from pipeline.nn.binary import storage_bits
from pipeline.nn.checkpoint import load_base
from pipeline.stats import mean_ci
from pipeline.train.datamodule import PreparedData
from pipeline.train import transfer
from pipeline.train.spec import from_params


def by_hand(bits, bn_bits: int, head_bits: int, classes: int) -> float:
    """Bytes of the task state, from the base's block widths alone: per block, cin * cout weights
    at `bits`, cout scales and 2 * cout fused BN values at `bn_bits`; the head's k-bit weights, one
    float32 scale per class and a float32 bias."""
    base = load_base(base_checkpoint("binary"))
    bits_total = 0
    for block in base.blocks:
        cin, cout = block.conv.in_channels, block.conv.out_channels
        bits_total += cin * cout * storage_bits(bits) + cout * bn_bits + 2 * cout * bn_bits
    feat = base.head.in_features
    bits_total += feat * classes * head_bits + classes * 32 + classes * 32
    return bits_total / 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="fashion_5to9")
    ap.add_argument("--bits", nargs="+", default=["1", "2", "4", "8"])
    args = ap.parse_args()
    quiet()
    p = load_params()
    lr = json.loads((METRICS_DIR / f"transfer_{args.target}_parallel.json").read_text())["lr"]
    classes = PreparedData(prepared(args.target), 1).num_classes
    out = Path(tempfile.mkdtemp(prefix="bits_table-"))
    print(f"target {args.target}, parallel, groups 1, placement all, bn_bits {p.adapter.bn_bits}, head "
          f"{p.transfer.head_bits}-bit, lr {lr:g} (the default run's choice for parallel), seeds {p.seeds}\n")
    print("| bits | memory by hand | memory function | packed payload | % of base | test acc |")
    print("|---|---|---|---|---|---|")
    for b in args.bits:
        bits = b if b == "ternary" else int(b)
        pb = replace(p, adapter=replace(p.adapter, groups=1, reduction=1, placement="all", bits=bits, task_bn=False,
                                        learn_scale=False, prune=replace(p.adapter.prune, amount=0.0)))
        base_bytes = transfer.base_memory_bytes()
        rows = [transfer.run(pb, from_params(pb, args.target, "parallel", "binary", lr, s),
                             transfer.Tracking(f"bits-table-{args.target}-{b}bit-s{s}", {"stage": "benchmark"}),
                             out, f"b{b}_s{s}", base_bytes).row
                for s in p.seeds]
        hand = by_hand(bits, p.adapter.bn_bits, p.transfer.head_bits, classes)
        mem = {r["task_memory_bytes"] for r in rows}
        packed = {r["packed_payload_bytes"] for r in rows}
        acc, ci = mean_ci([r["test_acc"] for r in rows])
        print(f"| {b} | {hand:,.0f} B | {', '.join(f'{m:,.0f}' for m in mem)} B | {', '.join(f'{m:,}' for m in packed)} B "
              f"| {100 * rows[0]['memory_ratio']:.1f}% | {100 * acc:.1f}% ± {100 * ci:.1f} |", flush=True)


if __name__ == "__main__":
    main()
