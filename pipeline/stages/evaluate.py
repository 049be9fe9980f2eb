"""`pipeline evaluate` (one adapter file on its target) and `pipeline bank` (one loaded base
serving several targets by swapping adapters); with --packed, both run from the packed files alone.
Loading and swapping task states is `pipeline.runtime`, for both formats."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.nn.adapters import TransferNet
from pipeline.nn.export import read_header
from pipeline.nn.inference import accuracy, logits
from pipeline.nn.memory import memory_report
from pipeline.paths import base_checkpoint, base_packed, prepared, task_dir
from pipeline.runtime.bank import Bank, full_copy, tensor_bytes
from pipeline.runtime.loader import (TaskState, compare, default_base, load_state, read_adapter_state,
                                     read_task)
from pipeline.runtime.xnor import load_numpy_net
from pipeline.train.datamodule import PreparedData


def _target_data(params: Params, target: str, command: str = "evaluate") -> PreparedData:
    params.dataset(target, command)
    return PreparedData(prepared(target), 1)


def trained_net(adapter: Path, state: TaskState | None = None) -> TransferNet:
    """The network as training saved it: the adapter file on its base checkpoint."""
    return load_state(state or read_adapter_state(adapter))


def run_evaluate(params: Params, target: str, adapter: Path, split: str = "test") -> float:
    data = _target_data(params, target)
    state = read_adapter_state(adapter)
    config = state.meta
    if config.get("dataset_sha256") != data.manifest["sha256"]:
        raise UserError(f"{adapter}: trained on target '{config.get('target')}', not on '{target}' as prepared now")
    net = trained_net(adapter, state)
    acc = accuracy(net, *data.splits[split])
    recorded = config.get("metrics", {}).get(f"{split}_acc")
    print(f"{target} {split} accuracy {acc:.4f} (recorded {recorded if recorded is None else f'{recorded:.4f}'})")
    return acc


def run_bank(params: Params, targets: list[str], method: str) -> dict[str, float]:
    bank = Bank.open(base_checkpoint("binary"))
    base_bytes = memory_report(bank.base).bytes
    accs, task_bytes, full_bytes = {}, 0.0, 0.0
    for target in targets:
        data = _target_data(params, target, "bank")
        net = bank.add(target, read_adapter_state(task_dir(target, method) / "adapter"))
        accs[target] = accuracy(bank.activate(target), *data.splits["test"])
        task_bytes += memory_report(net, include=net.is_task_module).bytes
        # a full copy per target: the whole network with this target's head
        full_bytes += memory_report(net, include=lambda n, m: ".adapter" not in n).bytes
        print(f"{target}: test accuracy {accs[target]:.4f} (recorded {bank.states[target].meta['metrics']['test_acc']:.4f})")
    n = len(targets)
    print(f"memory for {n} targets: base + {n} task states = {(base_bytes + task_bytes) / 1024:.2f} KiB; "
          f"{n} full copies = {full_bytes / 1024:.2f} KiB ({(base_bytes + task_bytes) / full_bytes:.1%})")
    return accs


def _packed_data(params: Params, target: str, meta: dict, source: Path) -> PreparedData:
    data = _target_data(params, target)
    if meta["dataset_sha256"] != data.manifest["sha256"]:
        raise UserError(f"{source}: trained on target '{meta['target']}', not on '{target}' as prepared now")
    return data


def _recorded(task_path: Path, split: str):
    """The accuracy the transfer stage recorded beside the packed file (its .json), if any."""
    try:
        return json.loads(task_path.with_suffix(".json").read_text()).get("metrics", {}).get(f"{split}_acc")
    except (OSError, ValueError):
        return None


def check_packed(params: Params, task_path: Path, base_path: Path | None = None, target: str | None = None,
                 split: str = "test", against: tuple[str, ...] = ()) -> dict:
    """Base + task state from their packed files only, on `split` of its target: accuracy, the one
    recorded beside it, and for each of `against` (`trained`: safetensors + checkpoint; `numpy`:
    the XNOR path) the same images compared (images, argmax mismatches, largest logit difference)."""
    task_path = Path(task_path)
    state = read_task(task_path)
    net, meta = load_state(state, base_path), state.meta
    base_path = base_path or default_base(state)
    target = target or meta["target"]
    x, y = _packed_data(params, target, meta, task_path).splits[split]
    out = logits(net, x)
    correct = int((out.argmax(1) == y).sum())
    result = {"target": target, "base": base_path, "images": len(y), "correct": correct,
              "accuracy": correct / max(len(y), 1), "recorded": _recorded(task_path, split)}
    for other in against:
        if other == "trained":
            ref = logits(trained_net(task_path.with_suffix("")), x)
        else:
            ref = torch.from_numpy(load_numpy_net(task_path, base_path)(x.numpy()))
        result[other] = compare(out, ref)
    return result


def run_evaluate_packed(params: Params, target: str, task_path: Path, base_path: Path | None, split: str = "test",
                        compare_to: str | None = None) -> dict:
    r = check_packed(params, task_path, base_path, target, split, (compare_to,) if compare_to else ())
    recorded = r["recorded"]
    print(f"{target} {split} accuracy {r['accuracy']:.4f} from {task_path} + {r['base']} "
          f"(recorded {'n/a' if recorded is None else f'{recorded:.4f}'})")
    if compare_to:
        c = r[compare_to]
        print(f"  vs {compare_to}: {c['images']} images, {c['mismatches']} argmax mismatches, "
              f"largest logit difference {c['max_logit_diff']:.3g}")
    return r


def _state_files(targets: list[str], method: str, states: list[str] | None) -> list[Path]:
    """The packed task states to bank: the given files, or each target's `method`; all present, none twice."""
    if states:
        paths = [Path(s) for s in states]
        for p in paths:
            if not p.exists():
                raise UserError(f"{p}: task state not found")
    else:
        paths = [task_dir(t, method) / "adapter.bnnpack" for t in targets]
        for t, p in zip(targets, paths):
            if not p.exists():
                raise UserError(f"{p}: not found; run the {method} transfer for '{t}' first (dvc repro)")
    names = [str(p) for p in paths]
    if len(set(names)) != len(names):
        raise UserError(f"bank: a task state is named twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return paths


def run_bank_packed(params: Params, targets: list[str], method: str, swaps: int = 1000,
                    states: list[str] | None = None) -> dict:
    """One base from its packed file and N task states from theirs (each target's `method`, or the
    given files), swapped in place: accuracy of each, bytes held and stored, swap time."""
    paths = _state_files(targets, method, states)
    names = [str(p) for p in paths]
    base_path = base_packed("binary")
    bank = Bank.open(base_path)
    for name, path in zip(names, paths):
        bank.add(name, read_task(path))
    payload = {n: read_header(p)[0]["payload_bytes"] for n, p in zip(["base"] + names, [base_path] + paths)}
    files = {n: p.stat().st_size for n, p in zip(["base"] + names, [base_path] + paths)}
    for name, path in zip(names, paths):
        meta = bank.states[name].meta
        x, y = _packed_data(params, meta["target"], meta, path).splits["test"]
        acc = accuracy(bank.activate(name), x, y)
        recorded = _recorded(path, "test")
        print(f"{name} ({meta['target']}): test accuracy {acc:.4f} "
              f"(recorded {'n/a' if recorded is None else f'{recorded:.4f}'})")
    times = bank.swap_seconds(names, swaps)
    held = bank.resident_bytes()
    full = [full_copy(bank.nets[n]) for n in names]  # what full finetuning keeps per task
    full_stored = sum(memory_report(f).bytes for f in full)
    full_held = sum(tensor_bytes([f]) for f in full)
    n = len(names)
    tasks = lambda d: sum(d[k] for k in names)  # noqa: E731
    print(f"{n} task states on one base, stored: {payload['base'] + tasks(payload):,} B packed (base "
          f"{payload['base']:,} + tasks {tasks(payload):,}; files with their headers {files['base'] + tasks(files):,} B)"
          f" vs {n} full copies {full_stored:,.0f} B: {(payload['base'] + tasks(payload)) / full_stored:.1%}")
    print(f"held in memory as torch tensors: {held['base'] + tasks(held):,} B (base {held['base']:,} + tasks "
          f"{tasks(held):,}) vs {n} full copies {full_held:,} B: {(held['base'] + tasks(held)) / full_held:.1%}")
    med = statistics.median(times)
    p99 = sorted(times)[max(int(0.99 * len(times)) - 1, 0)]
    print(f"swap: median {med * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us over {swaps} swaps among {n} task states")
    return {"held": held, "payload": payload, "files": files, "full_stored": full_stored, "full_held": full_held,
            "swap_median_s": med}
