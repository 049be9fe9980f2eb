"""Bit-packed export of a model, written from `storage_plan` so its size checks the accounting.

File layout: b"BNNPACK2", uint32 little-endian header length, a JSON header (architecture and one
record per tensor: name, encoding, shape, bits, nnz, levels, offset, nbytes), then the payload.
Each tensor is padded to whole bytes; the header is the only other overhead. Bit order: MSB first
(numpy packbits). Encodings: sign (1 = +1), int{k} (code c -> level 2c - (2**k - 1)), ternary
(c -> c - 1), float32/float16, bn_fused ((2, C): scale then shift, at `bits`), sparse (a 1-bit
mask or ceil(log2(numel))-bit indices, then the kept values in `levels`). A k-bit weight is its
levels times its `<layer>.scale` entry, one value per output channel.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.errors import UserError
from pipeline.nn.binary import code_levels, level_codes
from pipeline.nn.memory import TensorEntry, index_bits, storage_plan

MAGIC = b"BNNPACK2"  # 2: k-bit levels and their per-channel scales as separate tensors


def pack_uint(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2**bits, `bits` bits each, MSB first, padded to a whole byte."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    planes = (v[:, None] >> np.arange(bits - 1, -1, -1)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1)).tobytes()


def unpack_uint(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(1)


def _floats(t: torch.Tensor, bits: int) -> bytes:
    return t.detach().float().numpy().astype(np.float16 if bits == 16 else np.float32).tobytes()


def _encode_levels(values: np.ndarray, encoding: str) -> bytes:
    """Integer levels (or floats) of one of the level encodings, packed."""
    if encoding == "float32":
        return values.astype(np.float32).tobytes()
    if encoding == "sign":
        return np.packbits((values >= 0).astype(np.uint8)).tobytes()  # a binary conv's latent weights too
    bits = 2 if encoding == "ternary" else int(encoding[3:])
    codes = level_codes(torch.from_numpy(values.astype(np.float64)), "ternary" if encoding == "ternary" else bits)
    return pack_uint(codes.numpy().round().astype(np.int64), bits)


def _decode_levels(chunk: bytes, encoding: str, count: int) -> np.ndarray:
    if encoding == "float32":
        return np.frombuffer(chunk, dtype=np.float32)[:count].copy()
    if encoding == "sign":
        return np.unpackbits(np.frombuffer(chunk, dtype=np.uint8))[:count].astype(np.float32) * 2 - 1
    bits = 2 if encoding == "ternary" else int(encoding[3:])
    codes = torch.from_numpy(unpack_uint(chunk, bits, count).astype(np.float32))
    return code_levels(codes, "ternary" if encoding == "ternary" else bits).numpy()


def _stored(module: nn.Module, name: str, model: nn.Module) -> torch.Tensor:
    """A weight as stored: signs for a binary conv, integer levels for k-bit, else the floats."""
    from pipeline.nn.adapters import _QuantWeight

    if isinstance(module, _QuantWeight) and name.rsplit(".", 1)[-1] == "weight":  # not the head's bias
        if module.bits == 32:
            return (module.weight * module.mask).detach()
        return module.levels_and_scale()[0].detach()
    return model.get_parameter(name).detach()


def _encode(entry: TensorEntry, model: nn.Module) -> tuple[bytes, list[int]]:
    from pipeline.nn.adapters import fused_bn

    module = dict(model.named_modules())[entry.layer]
    if entry.encoding == "bn_fused":
        scale, shift = fused_bn(module)
        return _floats(torch.cat([scale, shift]), entry.value_bits), [2, scale.numel()]
    if entry.name.endswith(".scale"):
        return _floats(module.levels_and_scale()[1], entry.value_bits), [entry.numel]
    tensor = _stored(module, entry.name, model)
    shape, values = list(tensor.shape), tensor.numpy().reshape(-1)
    if entry.encoding != "sparse":
        return _encode_levels(values, entry.encoding), shape
    nz = np.flatnonzero(values)
    n = values.size
    if n <= len(nz) * index_bits(n):  # the cheaper of a 1-bit mask or explicit indices
        where = np.packbits((values != 0).astype(np.uint8)).tobytes()
    else:
        where = pack_uint(nz, index_bits(n))
    return where + _encode_levels(values[nz], entry.levels), shape


def export_packed(model: nn.Module, path: Path, meta: dict, include=None) -> dict:
    """Write `model` (or the modules `include` picks) bit-packed to `path`; return the sizes."""
    plan = storage_plan(model, include)
    records, chunks, offset = [], [], 0
    for e in plan:
        data, shape = _encode(e, model)
        records.append({"name": e.name, "layer": e.layer, "encoding": e.encoding, "shape": shape,
                        "bits": e.value_bits, "nnz": e.nnz, "levels": e.levels, "offset": offset,
                        "nbytes": len(data)})
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
        "tensors": len(plan),
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
        values = _decode(r, bytes(chunk), numel)
        out[r["name"]] = torch.from_numpy(values.reshape(r["shape"]))
    return header["meta"], out


def _decode(r: dict, chunk: bytes, numel: int) -> np.ndarray:
    enc, bits = r["encoding"], r.get("bits", 32)
    if enc in ("bn_fused", "float16"):
        return np.frombuffer(chunk, dtype=np.float16 if bits == 16 else np.float32).astype(np.float32)
    if enc != "sparse":
        return _decode_levels(chunk, enc, numel)
    nnz = r["nnz"]
    if numel <= nnz * index_bits(numel):
        n_where = (numel + 7) // 8
        nz = np.flatnonzero(np.unpackbits(np.frombuffer(chunk[:n_where], dtype=np.uint8))[:numel])
    else:
        n_where = (nnz * index_bits(numel) + 7) // 8
        nz = unpack_uint(chunk[:n_where], index_bits(numel), nnz)
    out = np.zeros(numel, dtype=np.float32)
    out[nz] = _decode_levels(chunk[n_where:], r["levels"], nnz)
    return out


def load_packed_into(model: nn.Module, path: Path) -> None:
    """Load a packed file into `model`: BN set to the fused scale/shift, k-bit weights to their
    levels and scales (frozen), everything else copied."""
    from pipeline.nn.adapters import _QuantWeight

    _, tensors = read_packed(path)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, t in tensors.items():
            m = modules.get(name)
            owner = modules.get(name.rsplit(".", 1)[0])
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(t[0]); m.bias.copy_(t[1])
                m.running_mean.zero_(); m.running_var.fill_(1.0); m.eps = 0.0
            elif isinstance(owner, _QuantWeight) and name.endswith(".scale"):
                owner.scale.data = t.clone()
                owner.frozen.fill_(True)
            else:
                model.get_parameter(name).copy_(t)
