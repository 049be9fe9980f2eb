"""Bit-packed export of a model, written from `storage_plan` so its size checks the accounting.

File layout: b"BNNPACK1", uint32 little-endian header length, a JSON header (architecture and one
record per tensor: name, encoding, shape, offset, nbytes), then the payload. Each tensor is padded
to whole bytes; the header is the only other overhead.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.errors import UserError
from pipeline.nn.memory import TensorEntry, storage_plan

MAGIC = b"BNNPACK1"


def _fused_bn(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return scale, shift


def _encode(entry: TensorEntry, model: nn.Module) -> tuple[bytes, list[int]]:
    modules = dict(model.named_modules())
    if entry.encoding == "bn_fused":
        scale, shift = _fused_bn(modules[entry.layer])
        return torch.cat([scale, shift]).float().numpy().tobytes(), [2, scale.numel()]
    tensor = model.get_parameter(entry.name).detach()
    if entry.encoding == "sign":
        return np.packbits((tensor >= 0).numpy().reshape(-1)).tobytes(), list(tensor.shape)
    if entry.encoding == "float32":
        return tensor.float().numpy().tobytes(), list(tensor.shape)
    raise NotImplementedError(f"export of encoding '{entry.encoding}'")


def export_packed(model: nn.Module, path: Path, meta: dict) -> dict:
    """Write `model` bit-packed to `path`; return sizes (payload, header, file, accounted bits)."""
    plan = storage_plan(model)
    records, chunks, offset = [], [], 0
    for e in plan:
        data, shape = _encode(e, model)
        records.append({"name": e.name, "layer": e.layer, "encoding": e.encoding, "shape": shape,
                        "offset": offset, "nbytes": len(data)})
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"meta": meta, "tensors": records}, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        for c in chunks:
            f.write(c)
    header_bytes = len(MAGIC) + 4 + len(header)
    return {
        "file_bytes": path.stat().st_size,
        "header_bytes": header_bytes,
        "payload_bytes": offset,
        "accounted_bytes": sum(e.bits for e in plan) / 8,
    }


def read_packed(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Decode a packed file to (meta, {tensor name: tensor}); BN entries give (2, C) scale/shift."""
    raw = Path(path).read_bytes()
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        raise UserError(f"{path}: not a packed model file (bad magic)")
    (n,) = struct.unpack("<I", raw[len(MAGIC): len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(raw[start: start + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt header") from None
    payload = memoryview(raw)[start + n:]
    out = {}
    for r in header["tensors"]:
        chunk = payload[r["offset"]: r["offset"] + r["nbytes"]]
        if len(chunk) != r["nbytes"]:
            raise UserError(f"{path}: truncated at tensor {r['name']}")
        numel = int(np.prod(r["shape"]))
        if r["encoding"] == "sign":
            bits = np.unpackbits(np.frombuffer(chunk, dtype=np.uint8))[:numel]
            values = bits.astype(np.float32) * 2 - 1
        else:
            values = np.frombuffer(chunk, dtype=np.float32).copy()
        out[r["name"]] = torch.from_numpy(values.reshape(r["shape"]))
    return header["meta"], out


def load_packed_into(model: nn.Module, path: Path) -> None:
    """Load a packed file into `model` (BN set to the fused scale/shift), for round-trip checks."""
    _, tensors = read_packed(path)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, t in tensors.items():
            m = modules.get(name)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(t[0]); m.bias.copy_(t[1])
                m.running_mean.zero_(); m.running_var.fill_(1.0); m.eps = 0.0
            else:
                model.get_parameter(name).copy_(t)
