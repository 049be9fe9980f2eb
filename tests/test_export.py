"""Bit-packed export: file sizes check the accounting, signs and floats round-trip, a model loaded
from the packed file computes what the source model computes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn as nn

from conftest import backbone_with_bn_stats
from pipeline.errors import UserError
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
    assert raw[:8] == MAGIC == b"BNNPACK1"
    (n,) = struct.unpack("<I", raw[8:12])
    assert sizes["header_bytes"] == 12 + n
    header = json.loads(raw[12:12 + n])
    assert header["meta"] == {"arch": ARCH.to_dict(), "note": "x"}
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
    with pytest.raises(UserError, match="truncated"):
        read_packed(path)
