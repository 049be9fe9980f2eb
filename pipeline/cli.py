"""`pipeline <command>`: the one entry point for dvc.yaml and for people.

User mistakes (UserError) print one line and exit 2; environment failures and diverged runs exit 1.
Each command imports its stage inside its function: torch, Lightning and MLflow take seconds to
import, so `pipeline --help` and a bad argument answer at once (`python -X importtime`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from pipeline.config import load_params
from pipeline.console import quiet
from pipeline.errors import EnvironmentFailure, TrainingDiverged, UserError, first_line
from pipeline.paths import base_checkpoint


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(2, f"error: {self.prog}: {message}\n")


def _params(args):
    return load_params(args.params)


def cmd_prepare(args) -> None:
    from pipeline.stages import prepare

    prepare.run(_params(args), args.dataset)


def cmd_pretrain(args) -> None:
    from pipeline.stages import pretrain

    pretrain.run(_params(args), args.precision)


def cmd_transfer(args) -> None:
    from pipeline.stages import transfer

    transfer.run(_params(args), args.target, args.method, args.precision)


def cmd_evaluate(args) -> None:
    from pipeline.stages import evaluate

    if args.packed:
        evaluate.run_evaluate_packed(_params(args), args.target, Path(args.packed),
                                     Path(args.base) if args.base else None, args.split, args.compare)
    else:
        if args.base or args.compare:
            raise UserError("evaluate: --base and --compare go with --packed, not --adapter")
        evaluate.run_evaluate(_params(args), args.target, Path(args.adapter), args.split)


def cmd_bank(args) -> None:
    from pipeline.stages import evaluate

    if args.swaps < 1:
        raise UserError(f"bank: --swaps {args.swaps}; allowed: an integer >= 1")
    if args.states and not args.packed:
        raise UserError("bank: --states goes with --packed")
    if not (args.targets or args.states):
        raise UserError("bank: name the task states: --targets T [T ...] (with --method), or --packed --states FILE ...")
    if args.packed:
        evaluate.run_bank_packed(_params(args), args.targets or [], args.method, args.swaps, args.states)
    else:
        evaluate.run_bank(_params(args), args.targets, args.method)


def cmd_sweep(args) -> None:
    from pipeline.stages import sweep

    sweep.run(_params(args), args.target, args.n_trials, args.workers, args.storage, args.study_name)


def cmd_report(args) -> None:
    from pipeline.stages import report

    report.run(_params(args), Path(args.params))


def cmd_results(args) -> None:
    from pipeline.stages import results

    results.run(_params(args))


def cmd_memory(args) -> None:
    from pipeline.nn.backbones import Arch, build_backbone
    from pipeline.nn.memory import memory_report

    for key in ("num_classes", "input_size", "in_channels"):
        if getattr(args, key) < 1:
            raise UserError(f"memory: --{key.replace('_', '-')} must be >= 1")
    if args.width is not None and args.width < 1:
        raise UserError("memory: --width must be >= 1")
    arch = Arch(args.model, args.precision, args.num_classes, args.in_channels, args.input_size, args.width)
    net = build_backbone(arch, key="memory --model")
    report = memory_report(net)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{args.model} ({args.precision}), {args.num_classes} classes, input {args.in_channels}x{args.input_size}x{args.input_size}")
        print(report.table())
        print(f"total: {report.params:,} parameters, {report.bits:,} bits = {report.bytes:,.0f} bytes = {report.bytes / 1024:.2f} KiB")


def cmd_export(args) -> None:
    from pipeline.nn.checkpoint import load_base, sha256
    from pipeline.nn.export import export_packed

    net = load_base(Path(args.model))
    out = Path(args.out) if args.out else Path(args.model).with_suffix(".bnnpack")
    sizes = export_packed(net, out, {"arch": net.arch.to_dict(), "base_sha256": sha256(Path(args.model))})
    ratio = sizes["payload_bytes"] / sizes["accounted_bytes"]
    print(f"wrote {out}: {sizes['file_bytes']:,} bytes = payload {sizes['payload_bytes']:,} + header "
          f"{sizes['header_bytes']:,}; accounting says {sizes['accounted_bytes']:,.1f} bytes (payload/accounting {ratio:.4f})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipeline", description="Adapters for frozen binary neural networks.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="prepare one dataset from params data.datasets")
    p.add_argument("dataset")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="pretrain the base on the source task")
    p.add_argument("--precision", choices=["binary", "fp32"], default="binary")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("transfer", help="transfer the base to a target with one method")
    p.add_argument("--target", required=True)
    p.add_argument("--method", required=True, choices=["full", "head", "bn", "serial", "parallel"])
    p.add_argument("--precision", choices=["binary", "fp32"], default="binary", help="base precision (full only)")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("evaluate", help="evaluate a task state on its target: adapter file + base checkpoint, "
                                         "or (--packed) the two packed files alone")
    p.add_argument("--target", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", help="adapter .safetensors (its .json must sit beside it)")
    what.add_argument("--packed", help="task state .bnnpack (runs from it and the packed base only)")
    p.add_argument("--base", default=None, help="packed base (default: models/base/<its precision>/model.bnnpack)")
    p.add_argument("--compare", choices=["trained", "numpy"], default=None,
                   help="also run the same images through the trained network (safetensors + checkpoint) "
                        "or the numpy XNOR path, and count the differences")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bank", help="one base, several targets: swap adapters in one process")
    p.add_argument("--targets", nargs="+", default=None)
    p.add_argument("--method", choices=["head", "bn", "serial", "parallel"], default="serial")
    p.add_argument("--packed", action="store_true", help="load base and task states from the packed files only")
    p.add_argument("--states", nargs="+", default=None, help="with --packed: task-state .bnnpack files to bank "
                                                            "(any targets and methods) instead of --targets")
    p.add_argument("--swaps", type=int, default=1000, help="swaps timed with --packed (default 1000)")
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("sweep", help="Optuna sweep of adapter configurations on one target")
    p.add_argument("--target", required=True)
    p.add_argument("--n-trials", type=int, default=None, help="COMPLETE trials wanted (default: sweep.n_trials)")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: journal file)")
    p.add_argument("--study-name", default=None)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="plots and report.md from the result files (no training)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("results", help="collect reports/results/*.csv into reports/results.csv")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("memory", help="per-layer memory of a backbone (the one accounting function)")
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, default=28)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--width", type=int, default=None, help="base width (default: the model's own)")
    p.add_argument("--precision", choices=["binary", "fp32"], default="binary")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("export", help="write a trained base bit-packed (1 bit per binary weight)")
    p.add_argument("--model", default=str(base_checkpoint("binary")))
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    quiet()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, EnvironmentFailure, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        first = first_line(exc)
        # Lightning refusing the hardware settings (an accelerator this machine lacks) is the params.
        if type(exc).__name__ == "MisconfigurationException" and type(exc).__module__.startswith("lightning"):
            print(f"error: trainer: {first} (set trainer.accelerator, devices, strategy in params.yaml)", file=sys.stderr)
            return 2
        # A tracking server or database that cannot be reached is the environment, not a bug: one line, exit 1.
        if type(exc).__module__.split(".")[0] in ("mlflow", "requests", "urllib3", "sqlalchemy", "psycopg"):
            print(f"error: {type(exc).__name__}: {first}", file=sys.stderr)
            return 1
        raise
    return 0
