"""Binary building blocks: the sign quantizer with its straight-through gradient, the quantised
conv, and latent-weight clipping. Expected values are worked out by hand or with plain torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nn.binary import QuantConv2d, clip_latent_weights, precision_of, relu, ste_sign


# ---------------------------------------------------------------------------------- ste_sign


def test_ste_sign_forward_maps_zero_to_plus_one():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    out = ste_sign(x)
    assert out.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    assert out.dtype == x.dtype
    assert out.shape == x.shape


def test_ste_sign_negative_zero_is_plus_one():
    # -0.0 >= 0 in IEEE arithmetic: it must also map to +1, never to 0 or -1.
    assert ste_sign(torch.tensor([-0.0])).tolist() == [1.0]


def test_ste_sign_output_is_strictly_binary():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g) * 3
    x[0, 0, :3] = 0.0  # exact zeros must not produce a third value
    out = ste_sign(x)
    values = set(torch.unique(out).tolist())
    assert values == {-1.0, 1.0}
    # and every element has the sign of x (with 0 -> +1), computed independently
    expected = torch.tensor([[[1.0 if v >= 0 else -1.0 for v in row] for row in plane] for plane in x.tolist()])
    assert torch.equal(out, expected)


def test_ste_sign_backward_passes_gradient_inside_unit_interval_inclusive():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -1.0001, 1.0001], requires_grad=True)
    ste_sign(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_ste_sign_backward_scales_incoming_gradient():
    x = torch.tensor([0.3, -0.7, 1.5, -3.0], requires_grad=True)
    weights = torch.tensor([2.0, -5.0, 7.0, 11.0])
    (ste_sign(x) * weights).sum().backward()
    # d/dx = upstream weight inside |x| <= 1, 0 outside
    assert x.grad.tolist() == [2.0, -5.0, 0.0, 0.0]


def test_precision_attributes():
    assert ste_sign.precision == 1
    assert relu.precision == 32
    assert precision_of(ste_sign) == 1
    assert precision_of(None) == 32
    assert precision_of(relu) == 32


# ------------------------------------------------------------------------------- QuantConv2d


def test_quantconv_hand_computed_binary_output():
    # x (3x3)                 sign(x)         w (2x2)         sign(w)
    #  0.5 -1.0  2.0           +1 -1 +1        0.2 -0.4        +1 -1
    # -0.3  0.0  1.5           -1 +1 +1        0.0  0.9        +1 +1
    #  0.7 -2.0 -0.1           +1 -1 -1
    # out[i,j] = sum_ab sign(x)[i+a, j+b] * sign(w)[a, b]  (cross-correlation, no padding)
    # out[0,0] = +1 - (-1) + (-1) + (+1) =  2
    # out[0,1] = -1 - (+1) + (+1) + (+1) =  0
    # out[1,0] = -1 - (+1) + (+1) + (-1) = -2
    # out[1,1] = +1 - (+1) + (-1) + (-1) = -2
    # The second output channel has w2 with sign(w2) = -sign(w), so its output is negated.
    conv = QuantConv2d(1, 2, 2, bias=False, input_quantizer=ste_sign, kernel_quantizer=ste_sign)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.2, -0.4], [0.0, 0.9]]], [[[-0.5, 0.3], [-0.1, -2.0]]]]))
    x = torch.tensor([[[[0.5, -1.0, 2.0], [-0.3, 0.0, 1.5], [0.7, -2.0, -0.1]]]])
    out = conv(x)
    expected = torch.tensor([[[[2.0, 0.0], [-2.0, -2.0]], [[-2.0, 0.0], [2.0, 2.0]]]])
    assert out.shape == (1, 2, 2, 2)
    assert torch.equal(out, expected)


def test_quantconv_hand_computed_with_bias_and_padding():
    # 1x1 input of value -0.2 (sign -1), 3x3 kernel all positive (sign +1), padding 1, bias 0.5:
    # only the centre tap sees the input -> out = -1 * 1 + 0.5 = -0.5; zero padding is added after
    # the input quantizer, so it contributes 0 (not sign(0) = +1).
    conv = QuantConv2d(1, 1, 3, padding=1, bias=True, input_quantizer=ste_sign, kernel_quantizer=ste_sign)
    with torch.no_grad():
        conv.weight.fill_(0.3)
        conv.bias.fill_(0.5)
    out = conv(torch.tensor([[[[-0.2]]]]))
    assert out.tolist() == [[[[-0.5]]]]


def test_quantconv_matches_conv_of_signs_random():
    g = torch.Generator().manual_seed(1)
    conv = QuantConv2d(3, 5, 3, stride=2, padding=1, bias=False,
                       input_quantizer=ste_sign, kernel_quantizer=ste_sign)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    x = torch.randn(2, 3, 9, 9, generator=g)
    sx = torch.where(x >= 0, 1.0, -1.0)
    sw = torch.where(conv.weight.detach() >= 0, 1.0, -1.0)
    expected = F.conv2d(sx, sw, stride=2, padding=1)
    out = conv(x)
    # integer-valued sums of +-1 products: exact
    assert torch.equal(out.detach(), expected)
    # each output sums at most 3*3*3 products of +-1 (fewer at zero-padded borders)
    assert torch.equal(out, out.round())
    assert out.abs().max().item() <= 27


def test_quantconv_without_quantizers_is_plain_conv():
    g = torch.Generator().manual_seed(2)
    conv = QuantConv2d(2, 3, 3, padding=1, bias=True)
    x = torch.randn(1, 2, 5, 5, generator=g)
    expected = F.conv2d(x, conv.weight.detach(), conv.bias.detach(), padding=1)
    assert torch.allclose(conv(x).detach(), expected, atol=1e-6)
    assert conv.weight_bits == 32


def test_quantconv_weight_bits_and_quantized_weight():
    b = QuantConv2d(2, 2, 3, bias=False, kernel_quantizer=ste_sign)
    f = QuantConv2d(2, 2, 3, bias=False, kernel_quantizer=None)
    assert b.weight_bits == 1
    assert f.weight_bits == 32
    w = b.weight.detach()
    assert torch.equal(b.quantized_weight().detach(), torch.where(w >= 0, 1.0, -1.0))
    assert f.quantized_weight() is f.weight


def test_quantconv_latent_weight_gradient_is_straight_through():
    # loss = sum(conv(x)) with a 1x1 kernel: d loss / d sign(w) = sum(sign(x)); the STE passes it
    # to the latent weight where |w| <= 1 and blocks it where |w| > 1.
    conv = QuantConv2d(1, 2, 1, bias=False, input_quantizer=ste_sign, kernel_quantizer=ste_sign)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.5]]], [[[1.5]]]]))
    x = torch.tensor([[[[0.3, -2.0], [4.0, 0.1]]]])  # signs +1 -1 +1 +1 -> sum 2
    conv(x).sum().backward()
    assert conv.weight.grad.flatten().tolist() == [2.0, 0.0]


# ------------------------------------------------------------------------- clip_latent_weights


def test_clip_latent_weights_clamps_only_trainable_binary_weights():
    binary = QuantConv2d(1, 1, 2, bias=True, input_quantizer=ste_sign, kernel_quantizer=ste_sign)
    fp = QuantConv2d(1, 1, 2, bias=False, input_quantizer=relu, kernel_quantizer=None)
    plain = nn.Conv2d(1, 1, 2, bias=False)
    frozen = QuantConv2d(1, 1, 2, bias=False, kernel_quantizer=ste_sign)
    values = torch.tensor([[[[3.0, -2.5], [0.5, -1.0]]]])
    with torch.no_grad():
        for m in (binary, fp, plain, frozen):
            m.weight.copy_(values)
        binary.bias.fill_(4.0)
    frozen.weight.requires_grad_(False)
    model = nn.Sequential(binary, fp, nn.Sequential(plain, frozen))

    clip_latent_weights(model)

    assert binary.weight.detach().flatten().tolist() == [1.0, -1.0, 0.5, -1.0]
    assert binary.bias.detach().tolist() == [4.0]  # only weights are latent binary values
    assert torch.equal(fp.weight.detach(), values)
    assert torch.equal(plain.weight.detach(), values)
    assert torch.equal(frozen.weight.detach(), values)
    # clipping happens in place: same Parameter object, still trainable
    assert binary.weight.requires_grad
    assert isinstance(binary.weight, nn.Parameter)


def test_clip_latent_weights_works_under_grad_mode():
    # Called right after optimizer.step() with autograd on: must not raise (in-place on a leaf).
    conv = QuantConv2d(1, 1, 1, bias=False, kernel_quantizer=ste_sign)
    with torch.no_grad():
        conv.weight.fill_(-7.0)
    with torch.enable_grad():
        clip_latent_weights(conv)
    assert conv.weight.item() == -1.0
