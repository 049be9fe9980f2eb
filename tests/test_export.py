"""Bit-packed export: file sizes check the accounting, signs and floats round-trip, k-bit levels and
their per-channel scales are packed as worked out by hand, a model loaded from the packed file
computes what the source model computes. (Every encoding of a task state: test_quant.py.)"""

from __future__ import annotations

import json
import zlib
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import backbone_with_bn_stats
from pipeline.errors import UserError
from pipeline.nn.adapters import AdapterConv, QuantLinear
from pipeline.nn.backbones import Arch, build_backbone
from pipeline.nn.binary import QuantConv2d
from pipeline.nn.export import MAGIC, export_packed, load_packed_into, read_packed


ARCH = Arch("bnn_vgg_small", "binary", 5, in_channels=1, input_size=28)  # default width 32


@pytest.fixture
def source_model():
    """A binary VGG whose BNs hold non-trivial running statistics and affine parameters."""
    return backbone_with_bn_stats(ARCH, seed=0, batch=16)


def _binary_convs(net):
    return {n: m for n, m in net.named_modules() if isinstance(m, QuantConv2d) and m.weight_bits == 1}


def test_export_sizes_match_accounting(tmp_path, source_model):
    sizes = export_packed(source_model, tmp_path / "m.bnnpack", {"arch": ARCH.to_dict()})
    assert sizes["payload_bytes"] >= sizes["accounted_bytes"]
    assert sizes["payload_bytes"] <= 1.02 * sizes["accounted_bytes"]
    assert sizes["file_bytes"] == sizes["payload_bytes"] + sizes["header_bytes"]
    assert sizes["file_bytes"] == (tmp_path / "m.bnnpack").stat().st_size
    # accounted bytes by hand (w = 32, 1 input channel, 5 classes): stem 288 floats, 9 * 31,744
    # sign bits, 2 floats per BN channel over w + 13w = 448 channels (stem + 5 blocks), head
    # 128 * 5 + 5 floats
    w = 32
    bits = 288 * 32 + 9 * (w * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w + 4 * w * 4 * w) \
        + 64 * (14 * w) + (4 * w * 5 + 5) * 32
    assert sizes["accounted_bytes"] == bits / 8


def test_export_header_layout(tmp_path, source_model):
    path = tmp_path / "m.bnnpack"
    sizes = export_packed(source_model, path, {"arch": ARCH.to_dict(), "note": "x"})
    raw = path.read_bytes()
    assert raw[:8] == MAGIC + b"3" == b"BNNPACK3"
    n, crc = struct.unpack("<II", raw[8:16])
    assert sizes["header_bytes"] == 16 + n
    assert crc == zlib.crc32(raw[16:16 + n])
    header = json.loads(raw[16:16 + n])
    assert header["meta"] == {"arch": ARCH.to_dict(), "note": "x"}
    assert header["payload_bytes"] == sizes["payload_bytes"] == len(raw) - 16 - n
    assert header["payload_crc32"] == zlib.crc32(raw[16 + n:])
    # records tile the payload without gaps
    offsets = [(r["offset"], r["nbytes"]) for r in header["tensors"]]
    assert offsets[0][0] == 0
    for (o1, n1), (o2, _) in zip(offsets, offsets[1:]):
        assert o2 == o1 + n1
    assert offsets[-1][0] + offsets[-1][1] == sizes["payload_bytes"]
    # a 1-bit tensor takes ceil(numel / 8) bytes
    for r in header["tensors"]:
        if r["encoding"] == "sign":
            numel = 1
            for d in r["shape"]:
                numel *= d
            assert r["nbytes"] == -(-numel // 8)


def test_read_packed_returns_signs_and_floats(tmp_path, source_model):
    path = tmp_path / "m.bnnpack"
    export_packed(source_model, path, {"k": 1})
    meta, tensors = read_packed(path)
    assert meta == {"k": 1}
    convs = _binary_convs(source_model)
    assert len(convs) == 5
    for name, conv in convs.items():
        w = conv.weight.detach()
        t = tensors[f"{name}.weight"]
        assert t.shape == w.shape
        assert torch.equal(t, torch.where(w >= 0, 1.0, -1.0))
    # full-precision tensors come back bit-exact
    assert torch.equal(tensors["features.0.weight"], source_model.features[0].weight.detach())
    assert torch.equal(tensors["head.weight"], source_model.head.weight.detach())
    assert torch.equal(tensors["head.bias"], source_model.head.bias.detach())
    # BN entries: (2, C) fused scale and shift, computed here from the BN definition
    bn = source_model.features[1]
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    assert tensors["features.1"].shape == (2, bn.num_features)
    assert torch.allclose(tensors["features.1"][0], scale, atol=1e-6)
    assert torch.allclose(tensors["features.1"][1], shift, atol=1e-6)


def test_packed_sign_of_odd_sized_tensor(tmp_path):
    # 3 weights -> one padded byte; padding bits must not leak into the decoded tensor
    model = nn.Sequential(QuantConv2d(1, 3, 1, bias=False, kernel_quantizer=lambda x: x))
    model[0].kernel_quantizer.precision = 1  # a 1-bit quantizer
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([-0.5, 0.0, 2.0]).view(3, 1, 1, 1))
    path = tmp_path / "odd.bnnpack"
    sizes = export_packed(model, path, {})
    assert sizes["payload_bytes"] == 1
    assert sizes["accounted_bytes"] == 3 / 8
    _, tensors = read_packed(path)
    assert tensors["0.weight"].flatten().tolist() == [-1.0, 1.0, 1.0]


def test_load_packed_into_reproduces_eval_outputs(tmp_path, source_model):
    path = tmp_path / "m.bnnpack"
    export_packed(source_model, path, {})
    torch.manual_seed(123)
    target = build_backbone(ARCH).eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    with torch.no_grad():
        before = target(x)
        expected = source_model(x)
    assert not torch.allclose(before, expected, atol=1e-4)  # the load has something to do
    load_packed_into(target, path)
    with torch.no_grad():
        out = target(x)
    assert torch.allclose(out, expected, atol=1e-4)


def test_bad_magic_raises_user_error(tmp_path, source_model):
    good = tmp_path / "m.bnnpack"
    export_packed(source_model, good, {})
    bad = tmp_path / "bad.bnnpack"
    bad.write_bytes(b"NOTPACK!" + good.read_bytes()[8:])
    with pytest.raises(UserError, match="magic"):
        read_packed(bad)


def test_short_file_raises_user_error(tmp_path):
    f = tmp_path / "short.bnnpack"
    f.write_bytes(b"BNN")
    with pytest.raises(UserError):
        read_packed(f)


def test_truncated_payload_raises_user_error(tmp_path, source_model):
    path = tmp_path / "m.bnnpack"
    export_packed(source_model, path, {})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(UserError, match=r"truncated \(payload of \d+ bytes, header says \d+\)"):
        read_packed(path)


def _damaged(tmp_path, source_model, damage):
    path = tmp_path / "m.bnnpack"
    export_packed(source_model, path, {})
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<I", raw[8:12])[0]
    damage(raw, n)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda raw, n: raw.__setitem__(7, ord("2")), "packed format version '2'; this reader reads version 3"),
    (lambda raw, n: raw.__setitem__(7, ord("9")), "packed format version '9'"),
    (lambda raw, n: raw.__setitem__(20, raw[20] ^ 0x04), r"corrupt header \(checksum mismatch\)"),
    (lambda raw, n: raw.__setitem__(16 + n + 3, raw[16 + n + 3] ^ 0x80), r"corrupt payload \(checksum mismatch\)"),
    (lambda raw, n: raw.extend(b"\0"), r"trailing bytes \(payload of \d+ bytes, header says \d+\)"),
    (lambda raw, n: raw.__delitem__(slice(40, None)), r"truncated \(header of \d+ bytes, 24 left"),
    (lambda raw, n: raw.__delitem__(slice(10, None)), r"truncated \(ends inside the header length\)"),
])
def test_damaged_files_are_refused_in_one_line(tmp_path, source_model, damage, message):
    """Another version, a flipped bit in header or payload, extra or missing bytes: each named."""
    path = _damaged(tmp_path, source_model, damage)
    with pytest.raises(UserError, match=message) as info:
        read_packed(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ------------------------------------------------------------------ k-bit levels and scales by hand

# Two output channels of four weights (test_quant.py works out the levels):
#   1 bit:   q = [1, -1, 1, 1], [1, -1, 1, -1]        s = 0.45, 0.2675
#   2 bits:  q = [3, -1, 1, 1], [1, -3, 1, -1]        s = 0.3, 0.2
#   4 bits:  q = [15, -5, 9, 1], [3, -15, 7, -1]      s = 0.06, 0.04
#   ternary: q = [1, 0, 1, 0], [0, -1, 1, 0]          s = 0.63, 0.3745
W = torch.tensor([[0.9, -0.3, 0.5, 0.1], [0.12, -0.6, 0.3, -0.05]])


@pytest.mark.parametrize("bits, encoding, payload, levels", [
    # sign: bit 1 for +1, MSB first: 1011 1010 = 0xBA
    (1, "sign", [0xBA], [[1, -1, 1, 1], [1, -1, 1, -1]]),
    # int2: code (q + 3) / 2 = 3 1 2 2 | 2 0 2 1 -> 11 01 10 10 = 0xDA, 10 00 10 01 = 0x89
    (2, "int2", [0xDA, 0x89], [[3, -1, 1, 1], [1, -3, 1, -1]]),
    # int4: code (q + 15) / 2 = 15 5 12 8 | 9 0 11 7 -> 0xF5 0xC8 0x90 0xB7
    (4, "int4", [0xF5, 0xC8, 0x90, 0xB7], [[15, -5, 9, 1], [3, -15, 7, -1]]),
    # ternary: code q + 1 = 2 1 2 1 | 1 0 2 1 -> 10 01 10 01 = 0x99, 01 00 10 01 = 0x49
    ("ternary", "ternary", [0x99, 0x49], [[1, 0, 1, 0], [0, -1, 1, 0]]),
])
@pytest.mark.parametrize("scale_bits", [32, 16])
def test_packed_levels_and_scales_by_hand(tmp_path, bits, encoding, payload, levels, scale_bits):
    conv = AdapterConv(4, 2, groups=1, stride=1, bits=bits, scale_bits=scale_bits)
    with torch.no_grad():
        conv.weight.copy_(W.view_as(conv.weight))
    conv.freeze_codes()
    model = nn.Sequential(conv)
    path = tmp_path / "k.bnnpack"
    sizes = export_packed(model, path, {})
    raw = path.read_bytes()
    (n,) = struct.unpack("<I", raw[8:12])
    records = json.loads(raw[16:16 + n])["tensors"]
    body = raw[16 + n:]
    assert [(r["name"], r["encoding"], r["shape"], r["bits"]) for r in records] == [
        ("0.weight", encoding, [2, 4, 1, 1], 2 if bits == "ternary" else bits),
        ("0.scale", f"float{scale_bits}", [2], scale_bits),
    ]
    w_rec, s_rec = records
    assert list(body[w_rec["offset"]: w_rec["offset"] + w_rec["nbytes"]]) == payload
    # the scales follow as 2 little-endian floats of scale_bits
    dtype = np.float16 if scale_bits == 16 else np.float32
    scales = np.frombuffer(body[s_rec["offset"]: s_rec["offset"] + s_rec["nbytes"]], dtype=dtype)
    assert s_rec["nbytes"] == 2 * scale_bits // 8
    assert torch.equal(torch.from_numpy(scales.astype(np.float32)), conv.scale)
    # sizes: 8 weights at storage bits (ternary 2) + 2 scales; each tensor padded to whole bytes
    wb = 8 * (2 if bits == "ternary" else bits)
    assert sizes["accounted_bytes"] == (wb + 2 * scale_bits) / 8
    assert sizes["payload_bytes"] == -(-wb // 8) + 2 * scale_bits // 8 == len(payload) + 2 * scale_bits // 8
    # read_packed gives the levels, not the dequantised values, and the scales apart
    _, tensors = read_packed(path)
    assert tensors["0.weight"].view(2, 4).tolist() == levels
    assert torch.equal(tensors["0.scale"], conv.scale)
    # load_packed_into restores levels, scales and `frozen` into a fresh layer
    fresh = nn.Sequential(AdapterConv(4, 2, groups=1, stride=1, bits=bits, scale_bits=scale_bits))
    load_packed_into(fresh, path)
    assert bool(fresh[0].frozen)
    assert torch.equal(fresh[0].weight, conv.weight) and torch.equal(fresh[0].scale, conv.scale)
    assert torch.equal(fresh[0].effective_weight(), conv.effective_weight())


def test_packed_quantised_head_keeps_its_float_bias(tmp_path):
    # head at 2 bits: weight levels, 2 scales, then the 2 float32 biases as they are
    head = QuantLinear(4, 2, bits=2)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(torch.tensor([0.25, -1.5]))
    head.freeze_codes()
    path = tmp_path / "h.bnnpack"
    sizes = export_packed(nn.Sequential(head), path, {})
    # 8 * 2 bits = 2 bytes, 2 float32 scales, 2 float32 biases
    assert sizes["payload_bytes"] == sizes["accounted_bytes"] == 2 + 8 + 8
    _, tensors = read_packed(path)
    assert sorted(tensors) == ["0.bias", "0.scale", "0.weight"]
    assert tensors["0.bias"].tolist() == [0.25, -1.5]
    assert tensors["0.weight"].tolist() == [[3, -1, 1, 1], [1, -3, 1, -1]]
