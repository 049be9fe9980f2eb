"""The one loader: a task state read from either file format (an adapter's `.safetensors` +
`.json`, `pipeline.nn.adapter_io`; a `.bnnpack`, `pipeline.nn.export`) and attached to a base
(a packed `model.bnnpack` or a checkpoint `model.pt`) as exactly the network that was measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.errors import UserError
from pipeline.nn.adapter_io import load_adapter_tensors, read_adapter, stored_keys
from pipeline.nn.adapters import TaskSpec, TransferNet, _QuantWeight
from pipeline.nn.backbones import Arch, Backbone, build_backbone
from pipeline.nn.checkpoint import load_base, sha256
from pipeline.nn.export import TASK_META, decode_tensors, load_tensors_into, read_header, read_packed
from pipeline.nn.fusion import FUSED_EPS, fuse_bn_, is_fused
from pipeline.nn.memory import storage_plan
from pipeline.paths import base_checkpoint, base_packed

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TaskState:
    """A task state as read from its files.

    `meta`: the adapter's config, or the packed header's meta (TASK_META); `packed`: the tensors
    are as a packed file decodes them (storage-plan names, a BN as its fused (2, C) scale and
    shift), else as an adapter file holds them (state-dict names, k-bit levels as int16);
    `pruned_layers`: the layers whose zeros are their pruning mask; `source`: the file, as
    refusals name it."""

    meta: dict
    tensors: Tensors
    source: str
    packed: bool
    pruned_layers: tuple[str, ...] = ()

    @property
    def spec(self) -> TaskSpec:
        try:
            return TaskSpec(**self.meta["spec"])
        except TypeError as exc:
            raise UserError(f"{self.source}: its spec does not name a task state ({exc})") from None

    @property
    def precision(self) -> str:
        """The precision of the base it was trained on."""
        return self.meta.get("precision", "binary")


def read_base(path: Path) -> tuple[dict, Tensors]:
    meta, tensors = read_packed(path)
    if "spec" in meta or "arch" not in meta or "base_sha256" not in meta:
        raise UserError(f"{path}: not a packed base (its header names no base arch; a task state goes in --packed)")
    return meta, tensors


def read_task(path: Path) -> TaskState:
    """A task state from its `.bnnpack`; its pruned layers are the ones stored sparse."""
    header, payload = read_header(path)
    meta = header["meta"]
    missing = [k for k in TASK_META if k not in meta]
    if missing:
        what = "a base" if "arch" in meta and "spec" not in meta else "written before format 3's task header"
        raise UserError(f"{path}: not a packed task state ({what}; its header lacks {', '.join(missing)})")
    pruned = tuple(r["layer"] for r in header["tensors"] if r["encoding"] == "sparse")
    return TaskState(meta, decode_tensors(header, payload), str(path), packed=True, pruned_layers=pruned)


def read_adapter_state(path: Path) -> TaskState:
    """A task state from its adapter files (the .safetensors, the .json, or their stem)."""
    config, tensors = read_adapter(path)
    return TaskState(config, tensors, str(path), packed=False, pruned_layers=tuple(config.get("pruned_layers", ())))


def read_state(path: Path) -> TaskState:
    """A task state from either format: a `.bnnpack`, else its adapter files."""
    path = Path(path)
    return read_task(path) if path.suffix == ".bnnpack" else read_adapter_state(path)


def _check_covers(source, tensors: Tensors, names: set[str], what: str) -> None:
    """Every tensor the network stores is in the file, and the file holds nothing else."""
    missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
    if missing or extra:
        raise UserError(f"{source}: {what} (missing {missing[:3]}, unexpected {extra[:3]})")


HEADER_MISFIT = "its tensors do not fit the network its header names"


def base_net(base_path: Path, base: tuple[dict, Tensors]) -> Backbone:
    """A base from its packed file's (meta, tensors): every BN fused, in eval mode."""
    meta, tensors = base
    try:
        net = build_backbone(Arch(**meta["arch"]))
    except (TypeError, KeyError) as exc:
        raise UserError(f"{base_path}: unknown base arch {meta.get('arch')} ({exc})") from None
    _check_covers(base_path, tensors, {e.name for e in storage_plan(net)}, HEADER_MISFIT)
    load_tensors_into(net, tensors)
    return net.eval()


def open_base(path: Path) -> tuple[Backbone, str]:
    """A base from its file and its sha256 (the identity task states name): a packed
    `.bnnpack`, else a checkpoint `model.pt`."""
    path = Path(path)
    if path.suffix == ".bnnpack":
        meta, tensors = read_base(path)
        return base_net(path, (meta, tensors)), meta["base_sha256"]
    return load_base(path), sha256(path)


def default_base(state: TaskState) -> Path:
    """The pipeline's own base for a task state's precision, in the same format as the state."""
    return (base_packed if state.packed else base_checkpoint)(state.precision)


def check_base(state: TaskState, base_sha256: str, base_name: str | None = None) -> None:
    """Refuse a task state trained on another base (in the words of its format's commands)."""
    trained = state.meta.get("base_sha256")
    if trained == base_sha256:
        return
    if state.packed:
        raise UserError(f"{state.source}: trained on base {str(trained)[:12]}, but {base_name or 'the given base'} is base "
                        f"{base_sha256[:12]}; give the base it was trained on (--base)")
    raise UserError(f"{state.source}: trained against base {str(trained)[:12]}, but the loaded base is "
                    f"{base_sha256[:12]}; load it onto the base it was trained with")


@torch.no_grad()
def _as_finalized(net: TransferNet, pruned_layers: tuple[str, ...]) -> None:
    """Masks and BN as `finalize` left them: a pruned layer's mask is where its weights are
    non-zero; a task BN arrived fused (its eps is in no file), the base's is fused here if not yet."""
    for name, m in net.named_modules():
        if isinstance(m, _QuantWeight):  # the head and the adapter convs: all task modules
            m.pruned = name in pruned_layers
            m.mask.copy_((m.weight != 0).float() if m.pruned else torch.ones_like(m.mask))
        elif isinstance(m, nn.BatchNorm2d):
            if net.is_task_module(name, m):
                m.eps = FUSED_EPS
            elif not is_fused(m):
                fuse_bn_(m)


def attach(base: Backbone, base_sha256: str, state: TaskState, base_name: str | None = None) -> TransferNet:
    """`state` attached to `base` (modified in place: a new head, adapters, task BN), refusing one
    trained on another base or whose tensors do not fit what its header names; the network that
    was measured, in eval mode."""
    check_base(state, base_sha256, base_name)
    net = TransferNet(base, state.spec, int(state.meta["num_classes"]))
    if state.packed:
        _check_covers(state.source, state.tensors, {e.name for e in storage_plan(net, include=net.is_task_module)},
                      HEADER_MISFIT)
        load_tensors_into(net, state.tensors)
    else:
        _check_covers(state.source, state.tensors, stored_keys(net), "tensors do not fit its config")
        load_adapter_tensors(net, state.tensors, state.source)
    _as_finalized(net, state.pruned_layers)
    return net.eval()


def load_state(state: TaskState, base_path: Path | None = None) -> TransferNet:
    """`state` on the base in `base_path` (default: the pipeline's own, `default_base`)."""
    base_path = Path(base_path) if base_path else default_base(state)
    base, base_sha256 = open_base(base_path)
    return attach(base, base_sha256, state, str(base_path))


def load_task_state(path: Path, base_path: Path | None = None) -> tuple[TransferNet, TaskState]:
    """The network a task state was measured as, from its files and its base's (either format)."""
    state = read_state(path)
    return load_state(state, base_path), state


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Two networks' logits on the same images: how many, argmax mismatches, largest difference."""
    return {"images": len(a), "mismatches": int((a.argmax(1) != b.argmax(1)).sum()),
            "max_logit_diff": float((a - b).abs().max()) if len(a) else 0.0}
