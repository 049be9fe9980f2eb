"""Backbones: output shapes, parameter counts derived from the architecture descriptions, and the
adapter attachment points (`model.blocks`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.nn.backbones import BACKBONES, Arch, BiRealBlock, ConvBlock, build_backbone
from pipeline.nn.binary import QuantConv2d


PRECISIONS = ["binary", "fp32"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("precision", PRECISIONS)
def test_vgg_output_shape(precision):
    torch.manual_seed(0)
    net = build_backbone(Arch("bnn_vgg_small", precision, 5, in_channels=1, input_size=28))
    out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    # embedding is the 4w-channel pooled feature
    assert net.embed(torch.randn(2, 1, 28, 28)).shape == (2, 128)


@pytest.fixture(scope="module", params=PRECISIONS)
def bireal1000(request):
    """Bi-Real Net 18, 3 channels, 1000 classes (built once per precision: it is 11.7M params)."""
    torch.manual_seed(0)
    return build_backbone(Arch("birealnet18", request.param, 1000, in_channels=3, input_size=224)).eval()


def _forward_with_features(net, x):
    seen = {}

    def hook(module, inputs, output):
        seen["f"] = tuple(output.shape)  # returns None: the output is left unchanged

    handle = net.features.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        handle.remove()
    return out, seen["f"]


def test_birealnet_output_shape_224(bireal1000):
    out, feats = _forward_with_features(bireal1000, torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
    # overall stride 32: stem /2, max-pool /2, three stride-2 stages -> 7x7
    assert feats == (1, 512, 7, 7)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_birealnet_output_shape_32(precision):
    torch.manual_seed(0)
    net = build_backbone(Arch("birealnet18", precision, 10, in_channels=3, input_size=32)).eval()
    out, feats = _forward_with_features(net, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert feats == (2, 512, 1, 1)


@pytest.mark.parametrize("size,side", [(28, 1), (40, 2)])
def test_birealnet_odd_intermediate_sizes(size, side):
    # 28 -> 14 -> 7 -> 4 -> 2 -> 1 and 40 -> 20 -> 10 -> 5 -> 3 -> 2: at odd sizes the stride-2
    # conv (padding 1) and the ceil-mode 2x2 average-pool shortcut must still agree in shape.
    net = build_backbone(Arch("birealnet18", "binary", 10, in_channels=1, input_size=size)).eval()
    out, feats = _forward_with_features(net, torch.randn(2, 1, size, size))
    assert out.shape == (2, 10)
    assert feats == (2, 512, side, side)


def test_backbone_registry_names():
    assert set(BACKBONES) == {"bnn_vgg_small", "birealnet18"}


@pytest.mark.parametrize("key", ["model.name", "memory: --model"])
def test_unknown_model_is_one_params_error_naming_the_key(key):
    """The backbone builder (not the config loader) knows the model names."""
    from pipeline.config import ParamsError
    from pipeline.errors import UserError

    with pytest.raises(ParamsError) as exc:
        build_backbone(Arch("resnet50", "binary", 10), key=key)
    assert str(exc.value) == f"{key}: unknown model 'resnet50'; allowed: bnn_vgg_small, birealnet18"
    assert isinstance(exc.value, UserError) and exc.value.exit_code == 2


# -------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("precision", PRECISIONS)
def test_vgg_parameter_count_by_hand(precision):
    w, cin, k = 32, 1, 5
    stem = 3 * 3 * cin * w
    binary_convs = 9 * (w * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w + 4 * w * 4 * w)
    bn = 2 * (w + w + 2 * w + 2 * w + 4 * w + 4 * w)  # stem BN + one BN per block
    head = 4 * w * k + k
    expected = stem + binary_convs + bn + head
    assert expected == 288 + 285_696 + 896 + 645  # the same sum, written out
    net = build_backbone(Arch("bnn_vgg_small", precision, k, in_channels=cin, width=w))
    assert n_params(net) == expected


def test_vgg_parameter_count_other_width():
    w, cin, k = 8, 3, 10
    expected = (3 * 3 * cin * w + 9 * (w * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w + 4 * w * 4 * w)
                + 2 * (w + w + 2 * w + 2 * w + 4 * w + 4 * w) + 4 * w * k + k)
    net = build_backbone(Arch("bnn_vgg_small", "binary", k, in_channels=cin, width=w))
    assert n_params(net) == expected


def birealnet18_counts(cin: int = 3, classes: int = 1000) -> tuple[int, int]:
    """(torch parameters, BN channels) of Bi-Real Net 18 from its description."""
    stem = 7 * 7 * cin * 64
    bn_ch = 64  # stem BN
    params = stem
    c_prev = 64
    for cout in (64, 128, 256, 512):
        for i in range(4):
            params += 3 * 3 * c_prev * cout  # binary 3x3 conv, no bias
            bn_ch += cout  # its BN
            if c_prev != cout:  # downsampling shortcut: 1x1 conv + BN
                params += c_prev * cout
                bn_ch += cout
            c_prev = cout
    params += 2 * bn_ch  # BN scale + shift
    params += 512 * classes + classes
    return params, bn_ch


def test_birealnet_parameter_count_by_hand(bireal1000):
    expected, bn_ch = birealnet18_counts()
    # written out: stem 9,408; binary convs 10,985,472; shortcuts 172,032; BN 2*4,800; head 513,000
    assert bn_ch == 4_800
    assert expected == 9_408 + 10_985_472 + 172_032 + 9_600 + 513_000
    assert n_params(bireal1000) == expected
    assert bn_channels(bireal1000) == bn_ch


def test_birealnet_keras_style_count_matches_larq_zoo(bireal1000):
    # Keras counts BN moving mean/variance as (non-trainable) parameters: 4 per channel.
    keras_total = n_params(bireal1000) + 2 * bn_channels(bireal1000)
    assert keras_total == 11_699_112  # Larq Zoo's published total for BiRealNet


def test_birealnet_shortcuts_only_where_shape_changes():
    net = build_backbone(Arch("birealnet18", "binary", 10, in_channels=3, input_size=32))
    units = [m for m in net.features if isinstance(m, BiRealBlock)]
    assert len(units) == 16
    down = [i for i, u in enumerate(units) if not isinstance(u.shortcut, nn.Identity)]
    assert down == [4, 8, 12]
    strides = [u.block.conv.stride for u in units]
    assert strides == [(2, 2) if i in (4, 8, 12) else (1, 1) for i in range(16)]
    for i in down:
        conv = [m for m in units[i].shortcut if isinstance(m, nn.Conv2d)]
        assert len(conv) == 1 and conv[0].kernel_size == (1, 1) and conv[0].bias is None
        assert not isinstance(conv[0], QuantConv2d)  # full-precision shortcut


# ------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("name,expected_blocks", [("bnn_vgg_small", 5), ("birealnet18", 16)])
@pytest.mark.parametrize("precision,bits", [("binary", 1), ("fp32", 32)])
def test_blocks_count_and_bits(name, expected_blocks, precision, bits):
    cin = 1 if name == "bnn_vgg_small" else 3
    net = build_backbone(Arch(name, precision, 10, in_channels=cin))
    blocks = net.blocks
    assert len(blocks) == expected_blocks
    assert all(isinstance(b, ConvBlock) for b in blocks)
    assert [b.conv.weight_bits for b in blocks] == [bits] * expected_blocks
    # every quantised conv in the model lives in a block; stem and head stay full precision
    quant = [m for m in net.modules() if isinstance(m, QuantConv2d)]
    assert len(quant) == expected_blocks
    assert isinstance(net.head, nn.Linear) and net.head.bias is not None


def test_vgg_blocks_in_forward_order_with_widths():
    w = 16
    net = build_backbone(Arch("bnn_vgg_small", "binary", 4, width=w))
    chans = [(b.conv.in_channels, b.conv.out_channels) for b in net.blocks]
    assert chans == [(w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)]


def test_binary_and_fp32_twins_share_state_dict_layout():
    b = build_backbone(Arch("bnn_vgg_small", "binary", 5))
    f = build_backbone(Arch("bnn_vgg_small", "fp32", 5))
    sb, sf = b.state_dict(), f.state_dict()
    assert list(sb) == list(sf)
    assert all(sb[k].shape == sf[k].shape for k in sb)
