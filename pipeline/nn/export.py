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
from pipeline.nn.memory import TensorEntry, index_bits, storage_plan

MAGIC = b"BNNPACK1"


def _fused_bn(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return scale, shift


def pack_uint(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2**bits, `bits` bits each, MSB first, padded to a whole byte."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    planes = (v[:, None] >> np.arange(bits - 1, -1, -1)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1)).tobytes()


def unpack_uint(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(1)


def _codes(module: nn.Module, weight: torch.Tensor, bits: int) -> tuple[np.ndarray, float]:
    """Integer codes and scale of a k-bit weight (frozen codes if the layer has them)."""
    from pipeline.nn.adapters import quantize

    mask = getattr(module, "mask", torch.ones_like(weight))
    frozen = getattr(module, "scale", None)
    if frozen is not None and float(frozen) > 0:
        return (weight * mask).round().to(torch.int64).numpy().reshape(-1), float(frozen)
    codes, scale = quantize(weight * mask, bits)
    return codes.to(torch.int64).numpy().reshape(-1), float(scale)


def _encode(entry: TensorEntry, model: nn.Module) -> tuple[bytes, list[int]]:
    modules = dict(model.named_modules())
    if entry.encoding == "bn_fused":
        scale, shift = _fused_bn(modules[entry.layer])
        return torch.cat([scale, shift]).float().numpy().tobytes(), [2, scale.numel()]
    module = modules[entry.layer]
    tensor = model.get_parameter(entry.name).detach()
    shape = list(tensor.shape)
    bits = entry.value_bits
    if entry.encoding == "sign":
        return np.packbits((tensor >= 0).numpy().reshape(-1)).tobytes(), shape
    if entry.encoding == "float32":
        return tensor.float().numpy().tobytes(), shape
    qmax = 2 ** (bits - 1) - 1
    if entry.encoding.startswith("int"):
        codes, scale = _codes(module, tensor, bits)
        return pack_uint(codes + qmax, bits) + np.float32(scale).tobytes(), shape
    if entry.encoding == "sparse":
        if bits < 32:
            values, scale = _codes(module, tensor, bits)
        else:
            values, scale = (tensor * getattr(module, "mask", 1)).numpy().reshape(-1), None
        nz = np.flatnonzero(values)
        n = values.size
        if n <= len(nz) * index_bits(n):  # the cheaper of a 1-bit mask or explicit indices
            where = np.packbits((values != 0).astype(np.uint8)).tobytes()
        else:
            where = pack_uint(nz, index_bits(n))
        if bits == 32:
            data = values[nz].astype(np.float32).tobytes()
        elif bits == 1:
            data = np.packbits((values[nz] > 0).astype(np.uint8)).tobytes()
        else:
            data = pack_uint(values[nz].astype(np.int64) + qmax, bits) + np.float32(scale).tobytes()
        return where + data, shape
    raise NotImplementedError(f"export of encoding '{entry.encoding}'")


def export_packed(model: nn.Module, path: Path, meta: dict, include=None) -> dict:
    """Write `model` (or the modules `include` picks) bit-packed to `path`; return the sizes."""
    plan = storage_plan(model, include)
    records, chunks, offset = [], [], 0
    for e in plan:
        data, shape = _encode(e, model)
        records.append({"name": e.name, "layer": e.layer, "encoding": e.encoding, "shape": shape,
                        "bits": e.value_bits, "nnz": e.nnz, "offset": offset, "nbytes": len(data)})
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
    qmax = 2 ** (bits - 1) - 1
    if enc == "sign":
        return np.unpackbits(np.frombuffer(chunk, dtype=np.uint8))[:numel].astype(np.float32) * 2 - 1
    if enc.startswith("int"):
        scale = np.frombuffer(chunk[-4:], dtype=np.float32)[0]
        return ((unpack_uint(chunk[:-4], bits, numel) - qmax) * scale).astype(np.float32)
    if enc == "sparse":
        nnz = r["nnz"]
        if numel <= nnz * index_bits(numel):
            n_where = (numel + 7) // 8
            nz = np.flatnonzero(np.unpackbits(np.frombuffer(chunk[:n_where], dtype=np.uint8))[:numel])
        else:
            n_where = (nnz * index_bits(numel) + 7) // 8
            nz = unpack_uint(chunk[:n_where], index_bits(numel), nnz)
        data = chunk[n_where:]
        if bits == 32:
            vals = np.frombuffer(data, dtype=np.float32)
        elif bits == 1:
            vals = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:nnz].astype(np.float32) * 2 - 1
        else:
            scale = np.frombuffer(data[-4:], dtype=np.float32)[0]
            vals = ((unpack_uint(data[:-4], bits, nnz) - qmax) * scale).astype(np.float32)
        out = np.zeros(numel, dtype=np.float32)
        out[nz] = vals
        return out
    return np.frombuffer(chunk, dtype=np.float32).copy()


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
