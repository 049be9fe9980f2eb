"""The one bank: a base resident once, serving several task states (from either file format).
Each task state's modules (head, adapters, task BN) are built once, by the one loader, on a
scratch copy of the base's layout and swapped into the base by reference, so a swap copies no
tensor and the base is never reloaded."""

from __future__ import annotations

import time
from pathlib import Path

import torch.nn as nn

from pipeline.errors import UserError
from pipeline.nn.adapters import TaskSpec, TransferNet
from pipeline.nn.backbones import Backbone, build_backbone
from pipeline.nn.fusion import fuse_bn_, is_fused
from pipeline.runtime.loader import TaskState, attach, check_base, open_base, read_state


def tensor_bytes(modules) -> int:
    """Bytes of the parameters and buffers these modules hold (each tensor once)."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def full_copy(net: TransferNet) -> TransferNet:
    """The network full finetuning would keep for this task (its layout; for counting bytes)."""
    return TransferNet(build_backbone(net.base.arch), TaskSpec("full"), net.base.head.out_features)


class Bank:
    """One base, resident once (every BN fused, as every finalized network runs it); `add` builds
    a task state's modules once, `activate` swaps them in: what the last one replaced goes back."""

    def __init__(self, base: Backbone, base_sha256: str, base_name: str | None = None):
        for m in base.features.modules():
            if isinstance(m, nn.BatchNorm2d) and not is_fused(m):
                fuse_bn_(m)
        self.base, self.base_sha256, self.base_name = base.eval(), base_sha256, base_name
        self.states: dict[str, TaskState] = {}
        self.nets: dict[str, TransferNet] = {}  # each task state on its scratch base (for accounting)
        self.tasks: dict[str, dict[str, nn.Module | None]] = {}
        self.original: dict[str, nn.Module | None] = {}
        self.active: str | None = None

    @classmethod
    def open(cls, base_path: Path) -> Bank:
        """A bank on the base in `base_path` (a packed `.bnnpack` or a checkpoint)."""
        base, base_sha256 = open_base(base_path)
        return cls(base, base_sha256, str(base_path))

    def add(self, name: str, state: TaskState | Path) -> TransferNet:
        """Build `state` (or the task state in that file) for swapping in; its network on the scratch base."""
        state = state if isinstance(state, TaskState) else read_state(state)
        check_base(state, self.base_sha256, self.base_name)
        spec = state.spec
        if spec.method == "full" or state.precision != "binary":
            raise UserError(f"{state.source}: a {spec.method} ({state.precision}) task state is a whole network; "
                            f"a bank shares the binary base: allowed methods head, bn, serial, parallel")
        arch = self.base.arch.to_dict()
        if state.meta.get("arch", arch) != arch:
            raise UserError(f"{state.source}: built for arch {state.meta['arch']}, the bank's base is {arch}")
        # Built on a scratch copy of the base's layout; only its task modules are kept.
        scratch = attach(build_backbone(self.base.arch), self.base_sha256, state, self.base_name)
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
        self.tasks[name], self.states[name], self.nets[name] = modules, state, scratch
        return scratch

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
