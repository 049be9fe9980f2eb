"""The packed format: a model or a task state, bit-packed from `storage_plan`, so its size
checks the accounting and its contents run the network (`pipeline.runtime`).

Version 3, little-endian:

    b"BNNPACK3"                magic: 7 letters, then the format version as one ASCII digit
    uint32 n                   header length in bytes
    uint32 crc32(header)
    header                     n bytes of UTF-8 JSON: {"meta": {...}, "payload_bytes": P,
                               "payload_crc32": C, "tensors": [record, ...]}
    payload                    P bytes: the tensors back to back, each padded to whole bytes

A record is {name, layer, encoding, shape, bits, nnz, levels, offset, nbytes}; `offset` counts
from the payload's start. Bit order: MSB first (numpy packbits). Encodings:
  sign        1 bit per value, 1 = +1, 0 = -1 (a binary conv's weights)
  int{k}      k-bit codes c, level 2c - (2**k - 1) (odd levels, none at zero)
  ternary     2-bit codes c, level c - 1
  float32, float16
  bn_fused    (2, C) at `bits` (16 or 32): the fused scale, then the shift; y = scale * x + shift
  sparse      where the kept values are (a 1-bit mask over all values, or ceil(log2(numel))-bit
              indices, whichever is smaller), then the kept values in the encoding `levels`
A k-bit weight is its levels times its `<layer>.scale` tensor, one value per output channel.
`meta` names what the file is: a base ({arch, base_sha256}) or a task state (TASK_META).
A reader refuses, in one line, another version, a bad checksum, a truncated file or a table
whose tensors do not tile the payload.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.errors import UserError, first_line
from pipeline.nn.adapters import _QuantWeight
from pipeline.nn.binary import code_levels, level_codes
from pipeline.nn.fusion import fused_bn, set_fused_
from pipeline.nn.memory import TensorEntry, index_bits, storage_plan

MAGIC = b"BNNPACK"
VERSION = 3  # 2: k-bit levels and scales apart; 3: checksums, payload length, task-state meta
ENCODINGS = ("sign", "ternary", "float32", "float16", "bn_fused", "sparse", "int1", "int2", "int4", "int8")
TASK_META = ("target", "method", "precision", "seed", "arch", "spec", "num_classes", "classes",
             "base_sha256", "dataset_sha256")  # what a task state needs to run on its base


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
    if isinstance(module, _QuantWeight) and name.rsplit(".", 1)[-1] == "weight":  # not the head's bias
        if module.bits == 32:
            return (module.weight * module.mask).detach()
        return module.levels_and_scale()[0].detach()
    return model.get_parameter(name).detach()


def _encode(entry: TensorEntry, model: nn.Module) -> tuple[bytes, list[int]]:
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
    payload = b"".join(chunks)
    header = json.dumps({"meta": meta, "payload_bytes": len(payload), "payload_crc32": zlib.crc32(payload),
                         "tensors": records}, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(MAGIC + str(VERSION).encode() + struct.pack("<II", len(header), zlib.crc32(header)) + header)
        f.write(payload)
    header_bytes = len(MAGIC) + 1 + 8 + len(header)
    return {
        "file_bytes": path.stat().st_size,
        "header_bytes": header_bytes,
        "payload_bytes": offset,
        "accounted_bytes": sum(e.bits for e in plan) / 8,
        "tensors": len(plan),
    }


def read_header(path: Path) -> tuple[dict, memoryview]:
    """The checked header and the payload of a packed file; one-line UserError for anything else."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read packed file ({exc.strerror or exc})") from None
    prefix = len(MAGIC) + 1
    if not raw.startswith(MAGIC) or len(raw) < prefix:
        raise UserError(f"{path}: not a packed model file (no {MAGIC.decode()} magic)")
    version = raw[len(MAGIC): prefix].decode("ascii", "replace")
    if version != str(VERSION):
        raise UserError(f"{path}: packed format version {version!r}; this reader reads version {VERSION} "
                        f"(export it again with this version of the pipeline)")
    if len(raw) < prefix + 8:
        raise UserError(f"{path}: truncated (ends inside the header length)")
    n, crc = struct.unpack("<II", raw[prefix: prefix + 8])
    start = prefix + 8
    if len(raw) < start + n:
        raise UserError(f"{path}: truncated (header of {n} bytes, {len(raw) - start} left in the file)")
    blob = raw[start: start + n]
    if zlib.crc32(blob) != crc:
        raise UserError(f"{path}: corrupt header (checksum mismatch)")
    try:
        header = json.loads(blob)
        tensors, size = header["tensors"], int(header["payload_bytes"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path}: corrupt header (not the version {VERSION} layout)") from None
    payload = memoryview(raw)[start + n:]
    if len(payload) != size:
        what = "truncated" if len(payload) < size else "trailing bytes"
        raise UserError(f"{path}: {what} (payload of {len(payload)} bytes, header says {size})")
    if zlib.crc32(payload) != header.get("payload_crc32"):
        raise UserError(f"{path}: corrupt payload (checksum mismatch)")
    offset = 0
    for r in tensors:
        if r.get("offset") != offset or r.get("encoding") not in ENCODINGS:
            raise UserError(f"{path}: corrupt tensor table at '{r.get('name')}'")
        offset += r["nbytes"]
    if offset != size:
        raise UserError(f"{path}: corrupt tensor table (tensors cover {offset} of {size} payload bytes)")
    return header, payload


def read_packed(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Decode a packed file to (meta, {tensor name: tensor}); BN entries give (2, C) scale/shift."""
    header, payload = read_header(path)
    return header["meta"], decode_tensors(header, payload)


def decode_tensors(header: dict, payload: memoryview) -> dict[str, torch.Tensor]:
    """The tensors of a checked header and payload (`read_header`), by name."""
    out = {}
    for r in header["tensors"]:
        chunk = bytes(payload[r["offset"]: r["offset"] + r["nbytes"]])
        numel = int(np.prod(r["shape"]))
        values = _decode(r, chunk, numel)
        out[r["name"]] = torch.from_numpy(values.reshape(r["shape"]))
    return out


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
    """Load a packed file into `model` (see `load_tensors_into`)."""
    load_tensors_into(model, read_packed(path)[1])


def load_tensors_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load decoded packed tensors into `model`: BN set to the fused scale/shift, k-bit
    weights to their levels and scales (frozen), everything else copied."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, t in tensors.items():
            m = modules.get(name)
            owner = modules.get(name.rsplit(".", 1)[0])
            try:
                want = (2, m.num_features) if isinstance(m, nn.modules.batchnorm._BatchNorm) else \
                    owner.scale.shape if isinstance(owner, _QuantWeight) and name.endswith(".scale") else \
                    model.get_parameter(name).shape
                if tuple(t.shape) != tuple(want):
                    raise RuntimeError(f"shape {tuple(t.shape)}, the network's {tuple(want)}")
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    set_fused_(m, t[0], t[1])
                elif isinstance(owner, _QuantWeight) and name.endswith(".scale"):
                    owner.scale.data = t.clone()
                    owner.frozen.fill_(True)
                else:
                    model.get_parameter(name).copy_(t)
            except (AttributeError, RuntimeError, IndexError) as exc:
                raise UserError(f"packed tensor '{name}' does not fit the network "
                                f"({first_line(exc, 160)})") from None
