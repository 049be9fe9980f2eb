"""`pipeline evaluate` (one adapter file on its target) and `pipeline bank` (one loaded base
serving several targets by swapping adapters); with --packed, both run from the packed files alone."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from pipeline.config import BASE_DIR, PREPARED, Params
from pipeline.errors import UserError
from pipeline.nn.adapter_io import AdapterBank, apply_adapter, read_adapter
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.nn.memory import memory_report
from pipeline.train.datamodule import PreparedData
from pipeline.train.evaluate import accuracy


def _target_data(params: Params, target: str) -> PreparedData:
    if target not in params.data.datasets:
        raise UserError(f"unknown target '{target}'; allowed (data.datasets): {', '.join(params.data.datasets)}")
    return PreparedData(PREPARED / target, 1)


def run_evaluate(params: Params, target: str, adapter: Path, split: str = "test") -> float:
    config, tensors = read_adapter(adapter)
    data = _target_data(params, target)
    if config.get("dataset_sha256") != data.manifest["sha256"]:
        raise UserError(f"{adapter}: trained on target '{config.get('target')}', not on '{target}' as prepared now")
    base_file = BASE_DIR / config.get("precision", "binary") / "model.pt"
    net = apply_adapter(load_base(base_file), sha256(base_file), config, tensors, source=str(adapter))
    acc = accuracy(net, *data.splits[split])
    recorded = config.get("metrics", {}).get(f"{split}_acc")
    print(f"{target} {split} accuracy {acc:.4f} (recorded {recorded if recorded is None else f'{recorded:.4f}'})")
    return acc


def run_bank(params: Params, targets: list[str], method: str) -> dict[str, float]:
    base_file = BASE_DIR / "binary" / "model.pt"
    base = load_base(base_file)
    bank = AdapterBank(base, sha256(base_file))
    base_bytes = memory_report(base).bytes
    accs, task_bytes, full_bytes = {}, 0.0, 0.0
    for target in targets:
        data = _target_data(params, target)
        stem = Path("models") / target / method / "adapter"
        config, tensors = read_adapter(stem)
        net = bank.activate(target, config, tensors, source=str(stem))
        accs[target] = accuracy(net, *data.splits["test"])
        task_bytes += memory_report(net, include=net.is_task_module).bytes
        # a full copy per target: the whole network with this target's head
        full_bytes += memory_report(net, include=lambda n, m: ".adapter" not in n).bytes
        print(f"{target}: test accuracy {accs[target]:.4f} (recorded {config['metrics']['test_acc']:.4f})")
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
    import json

    js = task_path.with_suffix(".json")
    try:
        return json.loads(js.read_text()).get("metrics", {}).get(f"{split}_acc")
    except (OSError, ValueError):
        return None


def run_evaluate_packed(params: Params, target: str, task_path: Path, base_path: Path | None, split: str = "test",
                        compare_to: str | None = None) -> dict:
    """Base + task state from their packed files only; optionally the same images through the
    trained network (`trained`: safetensors + checkpoint) and the numpy XNOR path (`numpy`)."""
    from pipeline.packed import compare, default_base, load_packed_net, logits

    task_path = Path(task_path)
    net, meta = load_packed_net(task_path, base_path)
    base_path = base_path or default_base(meta)
    data = _packed_data(params, target, meta, task_path)
    x, y = data.splits[split]
    out = logits(net, x)
    acc = float((out.argmax(1) == y).float().mean())
    recorded = _recorded(task_path, split)
    print(f"{target} {split} accuracy {acc:.4f} from {task_path} + {base_path} "
          f"(recorded {'n/a' if recorded is None else f'{recorded:.4f}'})")
    result = {"accuracy": acc, "recorded": recorded}
    for other in ([compare_to] if compare_to else []):
        if other == "trained":
            config, tensors = read_adapter(task_path.with_suffix(""))
            base_file = BASE_DIR / config.get("precision", "binary") / "model.pt"
            ref = logits(apply_adapter(load_base(base_file), sha256(base_file), config, tensors, str(task_path)), x)
        else:
            from pipeline.xnor import load_numpy_net

            ref = torch.from_numpy(load_numpy_net(task_path, base_path)(x.numpy()))
        c = compare(out, ref)
        print(f"  vs {other}: {c['images']} images, {c['mismatches']} argmax mismatches, "
              f"largest logit difference {c['max_logit_diff']:.3g}")
        result[other] = c
    return result


def run_bank_packed(params: Params, targets: list[str], method: str, swaps: int = 1000) -> dict:
    """One base from its packed file and the targets' task states from theirs, swapped in place."""
    from pipeline.packed import PackedBank, full_copy, logits, tensor_bytes

    base_path = BASE_DIR / "binary" / "model.bnnpack"
    bank = PackedBank(base_path)
    stored = {"base": base_path.stat().st_size} if base_path.exists() else {}
    for target in targets:
        path = Path("models") / target / method / "adapter.bnnpack"
        if not path.exists():
            raise UserError(f"{path}: not found; run the {method} transfer for '{target}' first (dvc repro)")
        bank.add(target, path)
        stored[target] = path.stat().st_size
    for target in targets:
        data = _packed_data(params, target, bank.task_meta[target], Path("models") / target / method)
        x, y = data.splits["test"]
        acc = float((logits(bank.activate(target), x).argmax(1) == y).float().mean())
        recorded = _recorded(Path("models") / target / method / "adapter.bnnpack", "test")
        print(f"{target}: test accuracy {acc:.4f} (recorded {'n/a' if recorded is None else f'{recorded:.4f}'})")
    times = bank.swap_seconds(targets, swaps)
    held = bank.resident_bytes()
    n = len(targets)
    full = {t: full_copy(bank.task_meta[t]) for t in targets}  # what full finetuning keeps per target
    full_stored = sum(memory_report(f).bytes for f in full.values())
    full_held = sum(tensor_bytes([f]) for f in full.values())
    tasks_held = sum(held[t] for t in targets)
    tasks_stored = sum(stored[t] for t in targets)
    print(f"{n} task states on one base: held in memory {held['base'] + tasks_held:,} B (base {held['base']:,} + "
          f"tasks {tasks_held:,}); packed files {stored['base'] + tasks_stored:,} B (base {stored['base']:,} + tasks "
          f"{tasks_stored:,})")
    print(f"{n} full copies: held {full_held:,} B; stored {full_stored:,.0f} B "
          f"(one base + {n} task states is {(stored['base'] + tasks_stored) / full_stored:.1%} of it)")
    med = statistics.median(times)
    print(f"swap: median {med * 1e6:.1f} us over {swaps} swaps (p99 {sorted(times)[int(0.99 * len(times)) - 1] * 1e6:.1f} us)")
    return {"held": held, "stored": stored, "full_stored": full_stored, "full_held": full_held, "swap_median_s": med}
