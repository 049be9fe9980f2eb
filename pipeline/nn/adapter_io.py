"""Adapter files (PEFT-style): `<stem>.safetensors` holds the task-specific state, `<stem>.json`
its config, memory and the sha256 of the base checkpoint it was trained against. k-bit adapter
weights are stored as int16 levels plus their per-channel scales; pruning masks are implied by the
zeros."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.nn.adapters import FUSED_EPS, TaskSpec, TransferNet, _QuantWeight, fuse_bn_, is_fused
from pipeline.nn.backbones import Backbone

FORMAT = "bnn-adapter/2"  # 2: per-channel scales, integer levels, bn_bits


def _file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_adapter(net: TransferNet, stem: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `<stem>.safetensors` and `<stem>.json`; `net` must be finalized."""
    convs = {n: m for n, m in net.named_modules() if isinstance(m, _QuantWeight)}
    tensors = {}
    for key, value in net.task_state().items():
        owner, leaf = key.rsplit(".", 1)
        if owner in convs and leaf == "mask":
            continue  # the zeros in the weights are the mask
        if owner in convs and leaf == "weight" and convs[owner].bits != 32:
            value = value.to(torch.int16)
        tensors[key] = value.detach().contiguous().clone()
    stem.parent.mkdir(parents=True, exist_ok=True)
    st = stem.with_suffix(".safetensors")
    save_file(tensors, str(st))
    config = {
        "format": FORMAT,
        **meta,
        "spec": net.spec.to_dict(),
        "num_classes": net.base.head.out_features,
        "pruned_layers": [n for n, c in convs.items() if c.pruned],
        "safetensors_sha256": _file_sha(st),
    }
    stem.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and tensors of an adapter file (path to .safetensors or .json, or their stem)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (st, js):
        if not f.exists():
            raise UserError(f"{f}: adapter file not found; an adapter is a .safetensors file plus its .json config")
    try:
        config = json.loads(js.read_text())
        ok = isinstance(config, dict) and config.get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise UserError(f"{js}: not an adapter config (expected JSON with format '{FORMAT}')")
    if _file_sha(st) != config.get("safetensors_sha256"):
        raise UserError(f"{st}: does not match its config's sha256 (truncated or replaced?)")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{st}: not a readable safetensors file ({exc})") from None
    return config, tensors


def apply_adapter(base: Backbone, base_sha256: str, config: dict, tensors: dict[str, torch.Tensor],
                  source: str = "adapter") -> TransferNet:
    """Attach the adapter to `base` (refusing one trained against another base)."""
    if config.get("base_sha256") != base_sha256:
        raise UserError(
            f"{source}: trained against base {str(config.get('base_sha256'))[:12]}, but the loaded base is "
            f"{base_sha256[:12]}; load it onto the base it was trained with"
        )
    net = TransferNet(base, TaskSpec(**config["spec"]), int(config["num_classes"]))
    convs = {n: m for n, m in net.named_modules() if isinstance(m, _QuantWeight)}
    state = {}
    for key, value in tensors.items():
        owner, leaf = key.rsplit(".", 1)
        state[key] = value.float() if value.dtype == torch.int16 else value
        if owner in convs and leaf == "weight":
            state[f"{owner}.mask"] = (value != 0).float() if owner in config["pruned_layers"] else torch.ones_like(state[key])
            convs[owner].pruned = owner in config["pruned_layers"]
    expected = set(net.task_state())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{source}: tensors do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(f"{source}: tensor shapes do not fit the base ({str(exc).splitlines()[0]})") from None
    for name, m in net.named_modules():  # finalize fused every BN (eps is not in the state dict)
        if isinstance(m, torch.nn.BatchNorm2d):
            if net.is_task_module(name, m):
                m.eps = FUSED_EPS
            elif not is_fused(m):
                fuse_bn_(m)  # the base's, as finalize fused it
    net.eval()
    return net


class AdapterBank:
    """One loaded base serving several targets: `activate` detaches the current task state
    (adapters, head, task BN) and attaches another; the base weights are never copied."""

    def __init__(self, base: Backbone, base_sha256: str):
        self.base, self.base_sha256 = base, base_sha256
        self._head = base.head
        for m in base.features.modules():  # fused once, as every finalized network runs it
            if isinstance(m, torch.nn.BatchNorm2d) and not is_fused(m):
                fuse_bn_(m)
        # Only BN tensors can be task-specific inside the base (task_bn); keep their base values.
        self._bn = {k: v.clone() for k, v in base.state_dict().items()
                    if k.startswith("features") and k.rsplit(".", 1)[1] in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                    and isinstance(base.get_submodule(k.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)}
        self.active: str | None = None

    def activate(self, name: str, config: dict, tensors: dict[str, torch.Tensor], source: str) -> TransferNet:
        for block in self.base.blocks:
            block.adapter = None
        self.base.head = self._head
        self.base.load_state_dict(self._bn, strict=False)
        net = apply_adapter(self.base, self.base_sha256, config, tensors, source)
        self.active = name
        return net
