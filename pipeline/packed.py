"""Running from the packed files alone: a base `model.bnnpack` plus a task state `*.bnnpack`
(format in `pipeline.nn.export`) rebuilt into the network that was measured, and a bank that keeps
one base resident and swaps task states into it in place."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.paths import base_packed
from pipeline.errors import UserError
from pipeline.nn.adapters import TaskSpec, TransferNet
from pipeline.nn.backbones import Arch, Backbone, build_backbone
from pipeline.nn.export import TASK_META, load_tensors_into, read_packed
from pipeline.nn.memory import storage_plan

Tensors = dict[str, torch.Tensor]


def read_base(path: Path) -> tuple[dict, Tensors]:
    meta, tensors = read_packed(path)
    if "spec" in meta or "arch" not in meta or "base_sha256" not in meta:
        raise UserError(f"{path}: not a packed base (its header names no base arch; a task state goes in --packed)")
    return meta, tensors


def read_task(path: Path) -> tuple[dict, Tensors]:
    meta, tensors = read_packed(path)
    missing = [k for k in TASK_META if k not in meta]
    if missing:
        what = "a base" if "arch" in meta and "spec" not in meta else "written before format 3's task header"
        raise UserError(f"{path}: not a packed task state ({what}; its header lacks {', '.join(missing)})")
    return meta, tensors


def _check_covers(path, tensors: Tensors, plan_names: set[str]) -> None:
    """Every tensor the network stores is in the file, and the file holds nothing else."""
    missing, extra = sorted(plan_names - set(tensors)), sorted(set(tensors) - plan_names)
    if missing or extra:
        raise UserError(f"{path}: its tensors do not fit the network its header names "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")


def base_net(base_path: Path, base: tuple[dict, Tensors]) -> Backbone:
    meta, tensors = base
    try:
        net = build_backbone(Arch(**meta["arch"]))
    except (TypeError, KeyError) as exc:
        raise UserError(f"{base_path}: unknown base arch {meta.get('arch')} ({exc})") from None
    _check_covers(base_path, tensors, {e.name for e in storage_plan(net)})
    load_tensors_into(net, tensors)
    return net.eval()


def check_pair(base_path: Path, base_meta: dict, task_path: Path, task_meta: dict) -> None:
    if task_meta["base_sha256"] != base_meta["base_sha256"]:
        raise UserError(f"{task_path}: trained on base {task_meta['base_sha256'][:12]}, but {base_path} is base "
                        f"{base_meta['base_sha256'][:12]}; give the base it was trained on (--base)")


def task_net(base: Backbone, task_path: Path, task: tuple[dict, Tensors]) -> TransferNet:
    """`base` (loaded from its packed file; modified in place) with the task state attached."""
    meta, tensors = task
    try:
        spec = TaskSpec(**meta["spec"])
    except TypeError as exc:
        raise UserError(f"{task_path}: its spec does not name a task state ({exc})") from None
    net = TransferNet(base, spec, int(meta["num_classes"]))
    _check_covers(task_path, tensors, {e.name for e in storage_plan(net, include=net.is_task_module)})
    load_tensors_into(net, tensors)
    return net.eval()


def default_base(task_meta: dict) -> Path:
    return base_packed(task_meta["precision"])


def load_packed_net(task_path: Path, base_path: Path | None = None) -> tuple[TransferNet, dict]:
    """The network a task state was measured as, from the two packed files only (the base: the
    pipeline's own for the task state's precision unless given)."""
    task = read_task(task_path)
    base_path = Path(base_path) if base_path else default_base(task[0])
    base = read_base(base_path)
    check_pair(base_path, base[0], task_path, task[0])
    return task_net(base_net(base_path, base), task_path, task), task[0]


@torch.no_grad()
def logits(net: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Two networks' logits on the same images: how many, argmax mismatches, largest difference."""
    return {"images": len(a), "mismatches": int((a.argmax(1) != b.argmax(1)).sum()),
            "max_logit_diff": float((a - b).abs().max()) if len(a) else 0.0}


def tensor_bytes(modules) -> int:
    """Bytes of the parameters and buffers these modules hold (each tensor once)."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def full_copy(task_meta: dict) -> TransferNet:
    """The network full finetuning would keep for this task (its layout; for counting bytes)."""
    return TransferNet(build_backbone(Arch(**task_meta["arch"])), TaskSpec("full"), int(task_meta["num_classes"]))


class PackedBank:
    """One base from its packed file, resident once; each task state's modules (head, adapters,
    task BN) are built once from its packed file and swapped into the base by reference, so a swap
    copies no tensor and the base is never reloaded."""

    def __init__(self, base_path: Path):
        self.base_path = Path(base_path)
        self.base_meta, tensors = read_base(self.base_path)
        self.base = base_net(self.base_path, (self.base_meta, tensors))
        self.tasks: dict[str, dict[str, nn.Module | None]] = {}
        self.task_meta: dict[str, dict] = {}
        self.original: dict[str, nn.Module | None] = {}
        self.active: str | None = None

    def add(self, name: str, task_path: Path) -> None:
        meta, tensors = read_task(task_path)
        check_pair(self.base_path, self.base_meta, Path(task_path), meta)
        if meta["method"] == "full" or meta["precision"] != "binary":
            raise UserError(f"{task_path}: a {meta['method']} ({meta['precision']}) task state is a whole network; "
                            f"a bank shares the binary base: allowed methods head, bn, serial, parallel")
        if meta["arch"] != self.base_meta["arch"]:
            raise UserError(f"{task_path}: built for arch {meta['arch']}, the bank's base is {self.base_meta['arch']}")
        # Built on a scratch copy of the base's layout; only its task modules are kept.
        scratch = task_net(build_backbone(Arch(**meta["arch"])), Path(task_path), (meta, tensors))
        modules = {}
        for path, m in scratch.named_modules():  # the outermost task modules (named_modules is pre-order)
            rel = path[len("base."):]
            if path.startswith("base.") and scratch.is_task_module(path, m) and not any(
                    rel.startswith(p + ".") for p in modules):
                modules[rel] = m
        for block in range(len(self.base.blocks)):  # blocks without adapters must lose the last task's
            path = f"{self._block_path(block)}.adapter"
            modules.setdefault(path, None)
        for path in modules:
            self.original.setdefault(path, self._get(path))
        self.tasks[name], self.task_meta[name] = modules, meta

    def _block_path(self, i: int) -> str:
        target = self.base.blocks[i]
        return next(p for p, m in self.base.named_modules() if m is target)

    def _get(self, path: str) -> nn.Module | None:
        parent, _, leaf = path.rpartition(".")
        return getattr(self.base.get_submodule(parent), leaf)

    def _set(self, path: str, module: nn.Module | None) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(self.base.get_submodule(parent), leaf, module)  # registers it (a block's adapter may be None)

    def activate(self, name: str) -> Backbone:
        """Swap `name`'s task state in: what the last one replaced goes back, then this one's modules."""
        if self.active is not None:
            for path in self.tasks[self.active]:
                self._set(path, self.original[path])
        for path, m in self.tasks[name].items():
            self._set(path, m)
        self.active = name
        return self.base

    def swap_seconds(self, names: list[str], swaps: int = 1000) -> list[float]:
        times = []
        for i in range(swaps):
            t0 = time.perf_counter()
            self.activate(names[i % len(names)])
            times.append(time.perf_counter() - t0)
        return times

    def resident_bytes(self) -> dict[str, int]:
        """Tensor bytes held: the base alone (with its own head and BN), and each task's modules."""
        active = self.active
        if active is not None:  # measure the base with its own modules in place
            for path in self.tasks[active]:
                self._set(path, self.original[path])
        out = {"base": tensor_bytes([self.base])}
        out.update({n: tensor_bytes([m for m in mods.values() if m is not None]) for n, mods in self.tasks.items()})
        if active is not None:
            for path, m in self.tasks[active].items():
                self._set(path, m)
        return out
