"""The width question by the memory function alone (no training): for each base width, the binary
base's bytes and what a task state costs as a share of it, split into adapter weights, weight
scales, BN (fused, per channel), head and masks. Per-channel floats grow with the width and binary
weights with its square, so the same adapter configuration should cost a smaller share of a wider
base. Configurations: the default run's methods (head, bn, serial, parallel at params.yaml's
`adapter`) and the sweep's ends (parallel groups 32, `last:1`, 1-bit; groups 1, all blocks, 32-bit
with task BN).

    python benchmarks/width_share.py [--widths 32 64 128] [--classes 5]
"""

from __future__ import annotations

import argparse

from pipeline.config import load_params
from pipeline.nn.adapters import TaskSpec, TransferNet
from pipeline.nn.backbones import Arch, build_backbone
from pipeline.nn.memory import BREAKDOWN_COLUMNS, breakdown, memory_report, storage_plan


def configs(params) -> list[tuple[str, TaskSpec]]:
    a, hb = params.adapter, params.transfer.head_bits
    default = dict(groups=a.groups, reduction=a.reduction, placement=a.placement, task_bn=a.task_bn, bits=a.bits,
                   head_bits=hb, bn_bits=a.bn_bits)
    return [("head", TaskSpec("head", head_bits=hb)),
            ("bn", TaskSpec("bn", head_bits=hb, bn_bits=a.bn_bits)),
            ("serial (default)", TaskSpec("serial", **default)),
            ("parallel (default)", TaskSpec("parallel", **default)),
            ("parallel g32 last:1 1-bit", TaskSpec("parallel", 32, 1, "last:1", False, 1, hb, a.bn_bits)),
            ("parallel g1 all 32-bit +task BN", TaskSpec("parallel", 1, 1, "all", True, 32, hb, a.bn_bits))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--classes", type=int, default=5, help="classes of the target's head")
    args = ap.parse_args()
    params = load_params()
    m, d = params.model, params.data
    print("| width | base KiB | task state | task KiB | % of base | "
          + " | ".join(f"{c.removeprefix('mem_').removesuffix('_bytes')} %" for c in BREAKDOWN_COLUMNS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(BREAKDOWN_COLUMNS))
    for width in args.widths:
        base = build_backbone(Arch(m.name, "binary", 5, d.channels, d.input_size, width))
        base_bytes = memory_report(base).bytes
        for name, spec in configs(params):
            net = TransferNet(build_backbone(base.arch), spec, args.classes)
            net.finalize()
            task = memory_report(net, include=net.is_task_module).bytes
            parts = breakdown(storage_plan(net, include=net.is_task_module))
            shares = " | ".join(f"{100 * v / base_bytes:.2f}" for v in parts.values())
            print(f"| {width} | {base_bytes / 1024:.2f} | {name} | {task / 1024:.2f} | {100 * task / base_bytes:.2f} | {shares} |")


if __name__ == "__main__":
    main()
