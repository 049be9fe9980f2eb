"""Adapter files (PEFT-style): `<stem>.safetensors` holds the task-specific state, `<stem>.json`
its config, memory and the sha256 of the base checkpoint it was trained against. k-bit adapter
weights are stored as int16 levels plus their per-channel scales; pruning masks are implied by the
zeros. Attaching one to its base is `pipeline.runtime.loader.attach`, for either file format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError, first_line
from pipeline.io import sha256
from pipeline.nn.adapters import TransferNet, _QuantWeight

FORMAT = "bnn-adapter/2"  # 2: per-channel scales, integer levels, bn_bits


def _quant_weights(net: TransferNet) -> dict[str, _QuantWeight]:
    return {n: m for n, m in net.named_modules() if isinstance(m, _QuantWeight)}


def stored_keys(net: TransferNet) -> set[str]:
    """The tensors an adapter file holds for `net`: its task state but the masks (the zeros in
    the weights are the mask)."""
    convs = _quant_weights(net)
    return {k for k in net.task_state() if not (k.rsplit(".", 1)[0] in convs and k.endswith(".mask"))}


def save_adapter(net: TransferNet, stem: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `<stem>.safetensors` and `<stem>.json`; `net` must be finalized."""
    convs = _quant_weights(net)
    keep = stored_keys(net)
    tensors = {}
    for key, value in net.task_state().items():
        if key not in keep:
            continue
        owner, leaf = key.rsplit(".", 1)
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
        "safetensors_sha256": sha256(st),
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
    if sha256(st) != config.get("safetensors_sha256"):
        raise UserError(f"{st}: does not match its config's sha256 (truncated or replaced?)")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{st}: not a readable safetensors file ({exc})") from None
    return config, tensors


def load_adapter_tensors(net: TransferNet, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load an adapter file's tensors (`stored_keys`) into `net`, k-bit levels back to floats."""
    state = {k: v.float() if v.dtype == torch.int16 else v for k, v in tensors.items()}
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(f"{source}: tensor shapes do not fit the base ({first_line(exc)})") from None
