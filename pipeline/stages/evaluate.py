"""`pipeline evaluate` (one adapter file on its target) and `pipeline bank` (one loaded base
serving several targets by swapping adapters)."""

from __future__ import annotations

from pathlib import Path

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
