"""k-bit task weights: integer levels times one float scale per output channel (pipeline.nn.binary,
`_QuantWeight`), their memory accounting, their packed export, learned (LSQ) scales, the `bn`
method and `bn_bits`. Expected numbers are worked out by hand in the comments; where a check runs
on random tensors the expectation comes from an independent path (plain formulas written here)."""

from __future__ import annotations

import copy
import json
import math
import struct

import pytest
import torch
import torch.nn as nn

from conftest import backbone_with_bn_stats
from pipeline.nn.adapters import ResidualAdapter, AdapterConv, TaskSpec, QuantLinear, TransferNet
from pipeline.nn.backbones import Arch
from pipeline.nn.binary import code_levels, fixed_scale, level_codes, q_max, quant_levels, storage_bits
from pipeline.nn.export import MAGIC, export_packed, load_packed_into, read_packed
from pipeline.nn.fusion import fuse_bn_, fused_bn
from pipeline.nn.memory import breakdown, index_bits, memory_report, storage_plan
from pipeline.nn.pruning import prune_to

# width 4: stem 4 channels, blocks 4->4, 4->8, 8->8, 8->16, 16->16; head 16 -> classes.
# BN channels: stem 4 + blocks 4 + 8 + 8 + 16 + 16 = 56.
ARCH = Arch("bnn_vgg_small", "binary", 3, in_channels=1, input_size=12, width=4)
BN_CHANNELS = 4 + 4 + 8 + 8 + 16 + 16


@pytest.fixture(scope="module")
def vgg_base():
    return backbone_with_bn_stats(ARCH, 0, batch=8)


def _x(n=6, seed=7):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) * 1.5


# Two output channels of four weights each: the scale is per output channel.
W = torch.tensor([[0.9, -0.3, 0.5, 0.1],
                  [0.12, -0.6, 0.3, -0.05]])


def _conv(bits, w: torch.Tensor = W, **kw) -> AdapterConv:
    conv = AdapterConv(w.shape[1], w.shape[0], groups=1, stride=1, bits=bits, **kw)
    with torch.no_grad():
        conv.weight.copy_(w.view_as(conv.weight))
    return conv


# ------------------------------------------------------------------------ levels by hand
#
# 1 bit, s = mean|w|: row 0 (0.9 + 0.3 + 0.5 + 0.1) / 4 = 0.45, row 1 (0.12 + 0.6 + 0.3 + 0.05) / 4
#   = 0.2675; q = sign(w).
# 2 bits, s = max|w| / 3: 0.3 and 0.2; w / s = 3, -1, 1.67, 0.33 -> nearest odd 3, -1, 1, 1;
#   row 1: 0.6, -3, 1.5, -0.25 -> 1, -3, 1, -1.
# 4 bits, s = max|w| / 15: 0.06 and 0.04; w / s = 15, -5, 8.33, 1.67 -> 15, -5, 9, 1;
#   row 1: 3, -15, 7.5, -1.25 -> 3, -15, 7, -1.
# 8 bits, s = max|w| / 255: w / s = 255, -85, 141.67, 28.33 -> 255, -85, 141, 29;
#   row 1: 51, -255, 127.5, -21.25 -> 51, -255, 127, -21.
# ternary, s = 1.4 mean|w|: 0.63 and 0.3745, threshold s / 2 = 0.315 and 0.18725:
#   row 0 |w| >= 0.315: 0.9, 0.5 -> 1, 0, 1, 0; row 1 |w| >= 0.18725: 0.6, 0.3 -> 0, -1, 1, 0.
BY_HAND = {
    1: ([0.45, 0.2675], [[1, -1, 1, 1], [1, -1, 1, -1]]),
    2: ([0.3, 0.2], [[3, -1, 1, 1], [1, -3, 1, -1]]),
    4: ([0.06, 0.04], [[15, -5, 9, 1], [3, -15, 7, -1]]),
    8: ([0.9 / 255, 0.6 / 255], [[255, -85, 141, 29], [51, -255, 127, -21]]),
    "ternary": ([0.63, 0.3745], [[1, 0, 1, 0], [0, -1, 1, 0]]),
}


@pytest.mark.parametrize("bits", list(BY_HAND))
def test_levels_and_scales_by_hand(bits):
    scales, levels = BY_HAND[bits]
    s, q = torch.tensor(scales), torch.tensor(levels, dtype=torch.float32)
    conv = _conv(bits)
    got_q, got_s = conv.levels_and_scale()
    assert torch.equal(got_q.detach().view(2, 4), q)
    assert torch.allclose(got_s.detach(), s, rtol=1e-6, atol=0)
    assert got_s.shape == (2,)  # one scale per output channel
    eff = conv.effective_weight().detach().view(2, 4)
    assert torch.allclose(eff, q * s[:, None], rtol=1e-6, atol=0)
    # frozen: `weight` holds the levels, `scale` the scales, and the function is unchanged
    conv.freeze_codes()
    assert bool(conv.frozen) and conv.frozen.dtype == torch.bool
    assert torch.equal(conv.weight.detach().view(2, 4), q)
    assert torch.equal(conv.scale, got_s.detach())
    assert torch.equal(conv.effective_weight().detach().view(2, 4), eff)
    conv.freeze_codes()  # a second call is a no-op
    assert torch.equal(conv.weight.detach().view(2, 4), q)


def test_values_of_the_2bit_example():
    # q * s = 3 * 0.3, -1 * 0.3, 1 * 0.3, 1 * 0.3 = 0.9, -0.3, 0.3, 0.3 (row 0)
    eff = _conv(2).effective_weight().detach().view(2, 4)
    assert torch.allclose(eff[0], torch.tensor([0.9, -0.3, 0.3, 0.3]), rtol=1e-6, atol=0)
    # row 1: 0.2, -0.6, 0.2, -0.2
    assert torch.allclose(eff[1], torch.tensor([0.2, -0.6, 0.2, -0.2]), rtol=1e-6, atol=0)


def test_storage_bits_and_q_max():
    assert [storage_bits(b) for b in (1, 2, 4, 8, 32, "ternary")] == [1, 2, 4, 8, 32, 2]
    # mid-rise: 2**k - 1; ternary's largest level is 1
    assert [q_max(b) for b in (1, 2, 4, 8, "ternary")] == [1, 3, 15, 255, 1]


@pytest.mark.parametrize("bits, levels, codes", [
    (2, [-3, -1, 1, 3], [0, 1, 2, 3]),            # c = (q + 3) / 2
    (4, [-15, -13, -1, 1, 15], [0, 1, 7, 8, 15]),  # c = (q + 15) / 2
    (1, [-1, 1], [0, 1]),                          # c = (q + 1) / 2
    ("ternary", [-1, 0, 1], [0, 1, 2]),            # c = q + 1
])
def test_level_codes_by_hand(bits, levels, codes):
    q = torch.tensor(levels, dtype=torch.float32)
    assert level_codes(q, bits).tolist() == codes
    assert code_levels(torch.tensor(codes, dtype=torch.float32), bits).tolist() == levels


def test_one_bit_maps_zero_to_plus_scale():
    # s = mean(0, 0.4, 0.2, 0.2) = 0.2; sign(0) is taken as +1, never 0
    conv = _conv(1, torch.tensor([[0.0, -0.4, 0.2, -0.2]]))
    q, s = conv.levels_and_scale()
    assert q.view(-1).tolist() == [1.0, -1.0, 1.0, -1.0]
    assert torch.allclose(s, torch.tensor([0.2]), rtol=1e-6, atol=0)


def test_pruned_weights_are_ignored_by_the_scale_and_get_level_zero():
    # mask out the largest weight 0.9 of row 0. 2 bits: s = max(0.3, 0.5, 0.1) / 3 = 0.1667;
    # w / s = -1.8, 3, 0.6 -> -1, 3, 1. 1 bit: s = (0.3 + 0.5 + 0.1) / 3 = 0.3.
    # Ternary: s = 1.4 * 0.3 = 0.42, threshold 0.21: -1, 1, 0.
    for bits, s0, q0 in ((2, 0.5 / 3, [0, -1, 3, 1]), (1, 0.3, [0, -1, 1, 1]), ("ternary", 0.42, [0, -1, 1, 0])):
        conv = _conv(bits)
        conv.mask[0, 0] = 0.0
        q, s = conv.levels_and_scale()
        assert q[0].view(-1).tolist() == q0, bits
        assert torch.allclose(s[0], torch.tensor(s0), rtol=1e-6, atol=0), bits
        assert torch.equal(q[1].view(-1), torch.tensor(BY_HAND[bits][1][1], dtype=torch.float32))  # row 1 untouched
        assert float(conv.effective_weight()[0, 0]) == 0.0


def _random_conv(bits, seed=0, **kw) -> AdapterConv:
    conv = AdapterConv(64, 32, groups=2, stride=1, bits=bits, **kw)  # 32 channels x 32 weights
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return conv


def test_two_bits_take_exactly_four_levels_per_channel():
    # mid-rise: {-3, -1, 1, 3}, four levels (a mid-tread 2-bit quantiser has only -1, 0, 1).
    # 512 Gaussian weights per channel, so both tails pass 2/3 of max|w| (the +-3 levels).
    conv = AdapterConv(512, 4, groups=1, stride=1, bits=2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    q = conv.levels_and_scale()[0].detach()
    assert sorted(torch.unique(q).tolist()) == [-3.0, -1.0, 1.0, 3.0]
    eff = conv.effective_weight().detach().flatten(1)
    for c in range(4):
        assert sorted(torch.unique(q[c]).tolist()) == [-3.0, -1.0, 1.0, 3.0]
        assert torch.unique(eff[c]).numel() == 4


def test_one_bit_never_gives_zero_ternary_does():
    w = torch.randn(32, 32, 1, 1, generator=torch.Generator().manual_seed(1))
    w[0, :4] = 0.0  # exact zeros too
    one = _random_conv(1)
    ter = _random_conv("ternary")
    with torch.no_grad():
        one.weight.copy_(w.view_as(one.weight))
        ter.weight.copy_(w.view_as(ter.weight))
    q1 = one.levels_and_scale()[0].detach()
    assert set(torch.unique(q1).tolist()) == {-1.0, 1.0}
    qt = ter.levels_and_scale()[0].detach()
    assert set(torch.unique(qt).tolist()) == {-1.0, 0.0, 1.0}
    # ternary by an independent path (TWN): +-1 where |w| >= s / 2, s = 1.4 mean|w| per channel
    flat = w.view(32, -1)
    s = 1.4 * flat.abs().mean(1, keepdim=True)
    expected = torch.where(flat.abs() >= s / 2, torch.sign(flat), torch.zeros_like(flat))
    assert torch.equal(qt.view(32, -1), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_k_bit_levels_match_nearest_odd_level(bits):
    # independent path: s = max|w| / (2**k - 1) per channel, q = the odd integer nearest to w / s
    conv = _random_conv(bits, seed=bits)
    w = conv.weight.detach().view(32, -1)
    qm = 2 ** bits - 1
    s = w.abs().amax(1, keepdim=True) / qm
    v = w / s
    odd = torch.arange(-qm, qm + 1, 2, dtype=torch.float32)
    nearest = odd[(v[..., None] - odd).abs().argmin(-1)]
    q = conv.levels_and_scale()[0].detach().view(32, -1)
    assert torch.equal(q, nearest)
    assert torch.equal(q.abs().amax(1), torch.full((32,), float(qm)))  # the outer level is reached


def test_scale_bits_16_rounds_the_frozen_scale():
    # float16(0.3) = 0.300048828125 and float16(0.2) = 0.199951171875 (11-bit significand)
    conv = _conv(2, scale_bits=16)
    before = conv.levels_and_scale()[0].detach().clone()
    conv.freeze_codes()
    assert conv.scale.tolist() == [0.300048828125, 0.199951171875]
    assert torch.equal(conv.weight.detach(), before)
    # what is stored is what runs
    assert torch.equal(conv.effective_weight().detach().view(2, 4), before.view(2, 4) * conv.scale[:, None])


def test_head_is_quantised_per_output_channel():
    head = QuantLinear(4, 2, bits=2)
    with torch.no_grad():
        head.weight.copy_(W)
    q, s = head.levels_and_scale()
    assert torch.equal(q.detach(), torch.tensor(BY_HAND[2][1], dtype=torch.float32))
    assert torch.allclose(s.detach(), torch.tensor([0.3, 0.2]), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------- LSQ scales


def test_learned_scale_is_a_parameter_initialised_to_the_fixed_scale():
    conv = _random_conv(4, learn_scale=True)
    assert isinstance(conv.scale, nn.Parameter) and conv.scale.requires_grad
    # initialised from the weights at construction: max|w| / 15 per channel of those weights
    fresh = AdapterConv(8, 3, groups=1, stride=1, bits=4, learn_scale=True)
    expected = fresh.weight.detach().view(3, -1).abs().amax(1) / 15
    assert torch.allclose(fresh.scale.detach(), expected, rtol=1e-6, atol=0)
    fixed = _random_conv(4)
    assert "scale" not in dict(fixed.named_parameters()) and "scale" in dict(fixed.named_buffers())
    assert not _random_conv(32, learn_scale=True).learn_scale  # float weights have no scale to learn


def test_lsq_gradient_by_hand():
    # 2 bits, one channel of 3 weights w = 0.5, -0.2, 1.5, learned s = 0.3 (set by hand).
    # w / s = 1.67, -0.67, 5 -> q = 1, -1, and 5 is beyond qm + 1 = 4, so clipped to q = 3.
    # Loss L = sum(c * q * s) with c = 1, 2, 3.
    # dL/ds: inside the range d(q s)/ds = q - w / s, clipped d(q s)/ds = q:
    #   1 * (1 - 1.667) + 2 * (-1 + 0.667) + 3 * 3 = -2/3 - 2/3 + 9 = 23/3,
    #   times LSQ's gradient scale 1 / sqrt(3 weights * q_max 3) = 1/3 -> 23/9.
    # dL/dw: straight through inside the range (c * s * 1/s = c), 0 where clipped: 1, 2, 0.
    conv = _conv(2, torch.tensor([[0.5, -0.2, 1.5]]), learn_scale=True)
    with torch.no_grad():
        conv.scale.fill_(0.3)
    eff = conv.effective_weight().view(-1)
    assert torch.allclose(eff.detach(), torch.tensor([0.3, -0.3, 0.9]), rtol=1e-6, atol=0)
    (eff * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert conv.scale.grad.shape == (1,)
    assert math.isclose(float(conv.scale.grad), 23 / 9, rel_tol=1e-5)
    assert torch.allclose(conv.weight.grad.view(-1), torch.tensor([1.0, 2.0, 0.0]), rtol=1e-6, atol=0)


def test_fixed_scale_passes_no_gradient_to_a_scale():
    conv = _conv(2, torch.tensor([[0.5, -0.2, 1.5]]))
    (conv.effective_weight() * 2).sum().backward()
    assert not conv.scale.requires_grad and conv.scale.grad is None


def test_learned_scales_get_gradients_in_a_transfer_net(vgg_base):
    # groups 1: with groups 2 the bottleneck's up-projection has one weight per output channel, whose
    # closed-form scale puts it exactly on a level, where LSQ's step-size gradient is 0 by design
    torch.manual_seed(0)  # the adapters' init, not whatever state earlier tests left the global RNG in
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("serial", groups=1, reduction=2, bits=2, learn_scale=True), 3)
    net.train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ResidualAdapter):
                m.bn.weight.fill_(1.0)  # gamma 0 would block every gradient into the adapter
    convs = net.adapter_convs()
    assert len(convs) == 10
    scales = [n for n, p in net.named_parameters() if n.endswith(".scale")]
    assert len(scales) == 10 and all(p.requires_grad for n, p in net.named_parameters() if n.endswith(".scale"))
    nn.functional.cross_entropy(net(_x(8)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    for c in convs:
        assert c.scale.grad is not None and c.scale.grad.abs().sum() > 0
        assert c.scale.grad.shape == (c.out_channels,)


def test_freezing_a_learned_scale_keeps_the_function():
    conv = _random_conv(4, learn_scale=True, seed=3)
    with torch.no_grad():
        conv.scale.mul_(0.7)  # a learned step away from the fixed scale: some weights now clip
    before = conv.effective_weight().detach().clone()
    conv.freeze_codes()
    assert torch.equal(conv.effective_weight().detach(), before)
    assert conv.weight.detach().abs().max() == 15 and torch.equal(conv.weight, conv.weight.round())


# --------------------------------------------------------------------------------- memory by hand


@pytest.mark.parametrize("bits, scale_bits, encoding, weight_bits_total, scale_total", [
    (1, 32, "sign", 512, 64 * 32),            # 64 * 64 / 8 = 512 weights at 1 bit + 64 float32 scales
    ("ternary", 32, "ternary", 2 * 512, 64 * 32),
    (2, 32, "int2", 2 * 512, 64 * 32),
    (4, 32, "int4", 4 * 512, 64 * 32),
    (8, 32, "int8", 8 * 512, 64 * 32),
    (4, 16, "int4", 4 * 512, 64 * 16),        # float16 scales
    ("ternary", 16, "ternary", 2 * 512, 64 * 16),
])
def test_memory_of_quantised_adapter_conv_by_hand(bits, scale_bits, encoding, weight_bits_total, scale_total):
    conv = AdapterConv(64, 64, groups=8, stride=1, bits=bits, scale_bits=scale_bits)
    model = nn.Sequential(conv)
    for freeze in (False, True):  # latent or frozen: the same accounting
        if freeze:
            conv.freeze_codes()
        plan = storage_plan(model)
        assert [(e.name, e.encoding, e.numel, e.bits) for e in plan] == [
            ("0.weight", encoding, 512, weight_bits_total),
            ("0.scale", f"float{scale_bits}", 64, scale_total),
        ]
        assert memory_report(model).bits == weight_bits_total + scale_total


def test_memory_of_float_adapter_conv_has_no_scale():
    plan = storage_plan(nn.Sequential(AdapterConv(64, 64, groups=8, stride=1, bits=32)))
    assert [(e.name, e.encoding, e.bits) for e in plan] == [("0.weight", "float32", 512 * 32)]


def test_memory_of_learned_scale_counted_once():
    # the learned scale is a parameter, but it is counted with its weight, not as a float32 tensor
    model = nn.Sequential(AdapterConv(64, 64, groups=8, stride=1, bits=4, learn_scale=True))
    assert [e.name for e in storage_plan(model)] == ["0.weight", "0.scale"]
    assert memory_report(model).bits == 4 * 512 + 64 * 32


@pytest.mark.parametrize("amount, nnz, where", [
    # 512 weights, round(0.5 * 512) = 256 zeros: 256 indices of ceil(log2 512) = 9 bits = 2304 > the
    # 512-bit mask
    (0.5, 256, 512),
    # round(0.95 * 512) = round(486.4) = 486 zeros, 26 kept: 26 * 9 = 234 index bits < 512
    (0.95, 26, 26 * 9),
])
@pytest.mark.parametrize("bits, levels, vb", [(4, "int4", 4), (1, "sign", 1), (32, "float32", 32)])
def test_memory_of_pruned_adapter_conv_by_hand(amount, nnz, where, bits, levels, vb):
    conv = AdapterConv(64, 64, groups=8, stride=1, bits=bits)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(2)))
    prune_to([conv], amount)
    conv.make_pruning_permanent()
    conv.freeze_codes()
    plan = storage_plan(nn.Sequential(conv))
    w = plan[0]
    assert (w.encoding, w.levels, w.numel, w.nnz, w.value_bits) == ("sparse", levels, 512, nnz, vb)
    assert w.where_bits == where
    assert w.bits == nnz * vb + where
    scale = [] if bits == 32 else [64 * 32]
    assert [e.bits for e in plan[1:]] == scale
    assert memory_report(nn.Sequential(conv)).bits == nnz * vb + where + sum(scale)


def test_memory_of_pruned_ternary_drops_zero_levels():
    # A pruned ternary tensor stores only its non-zero levels: the pruned weights and those that
    # round to 0. Independent path: the live weights' scale 1.4 mean|w|, +-1 where |w| >= s / 2.
    conv = AdapterConv(64, 64, groups=8, stride=1, bits="ternary")
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(4)))
    prune_to([conv], 0.5)
    live = conv.mask.view(64, -1)
    w = conv.weight.detach().view(64, -1)
    s = 1.4 * (w.abs() * live).sum(1, keepdim=True) / live.sum(1, keepdim=True)
    nnz = int(((w.abs() >= s / 2) & (live > 0)).sum())
    assert 0 < nnz < 256
    where = min(512, nnz * 9)
    conv.make_pruning_permanent()
    for freeze in (False, True):  # latent or frozen: the stored levels decide
        if freeze:
            conv.freeze_codes()
        w_entry = storage_plan(nn.Sequential(conv))[0]
        assert (w_entry.encoding, w_entry.levels, w_entry.nnz) == ("sparse", "ternary", nnz)
        assert w_entry.bits == 2 * nnz + where


def test_memory_of_head_by_hand():
    # 8 bits: 48 weights at 8 bits + 3 float32 scales (one per class) + 3 float32 biases
    assert memory_report(QuantLinear(16, 3, bits=8)).bits == 48 * 8 + 3 * 32 + 3 * 32 == 576
    # ternary: 48 * 2 + 96 + 96
    assert memory_report(QuantLinear(16, 3, bits="ternary")).bits == 96 + 96 + 96
    assert memory_report(QuantLinear(16, 3, bits=32)).bits == (48 + 3) * 32


@pytest.mark.parametrize("bn_bits, expected", [
    # serial 16 -> 8 -> 16 in 2 groups: 16 * 8 / 2 = 64 weights each, at 4 bits; scales for 8 and
    # 16 output channels; BN_a 2 * 16 values.
    (16, 64 * 4 + 8 * 16 + 64 * 4 + 16 * 16 + 2 * 16 * 16),   # = 1408
    (32, 64 * 4 + 8 * 32 + 64 * 4 + 16 * 32 + 2 * 16 * 32),   # = 2304
])
def test_memory_of_adapter_with_bn_bits(bn_bits, expected):
    a = ResidualAdapter("serial", 16, 16, stride=1, groups=2, reduction=2, bits=4, bn_bits=bn_bits)
    assert memory_report(a).bits == expected
    assert [e.encoding for e in storage_plan(a)] == ["int4", f"float{bn_bits}", "int4", f"float{bn_bits}", "bn_fused"]


@pytest.mark.parametrize("bn_bits", [16, 32])
def test_adapter_bn_inside_transfer_net_keeps_bn_bits(vgg_base, bn_bits):
    # serial adapters on all 5 blocks (widths 4, 8, 8, 16, 16): adapter BN and scales at bn_bits,
    # the (frozen, not task-specific) base BN at 32
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("serial", bits=4, bn_bits=bn_bits), 3)
    plan = {e.name: e for e in storage_plan(net)}
    adapter_bn = [e for n, e in plan.items() if n.endswith("adapter.bn")]
    base_bn = [e for n, e in plan.items() if e.encoding == "bn_fused" and ".adapter" not in n]
    assert len(adapter_bn) == 5 and len(base_bn) == 6
    assert all(e.value_bits == bn_bits and e.bits == 2 * bn_bits * e.numel // 2 for e in adapter_bn)
    assert all(e.value_bits == 32 for e in base_bn)
    scales = [e for n, e in plan.items() if n.endswith(".scale") and ".adapter" in n]
    assert len(scales) == 5 and all(e.encoding == f"float{bn_bits}" for e in scales)
    # task state: adapter convs (4*4 + 8*8 + 8*8 + 16*16 + 16*16 = 656 weights at 4 bits), their
    # scales over 4 + 8 + 8 + 16 + 16 = 52 channels and BN_a (2 * 52 values) at bn_bits, the head
    # 16 * 3 + 3 floats
    task = memory_report(net, include=net.is_task_module).bits
    assert task == 656 * 4 + 52 * bn_bits + 2 * 52 * bn_bits + 51 * 32


def test_breakdown_by_hand(vgg_base):
    # serial adapter on the last block only (16 -> 16, 2 groups: 128 weights) at 4 bits, pruned to
    # half (64 kept; mask 128 bits < 64 * 7 index bits), float16 scales and BN_a, head 32-bit.
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("serial", groups=2, placement="last:1", bits=4,
                                                           bn_bits=16), 3)
    with torch.no_grad():
        for c in net.adapter_convs():
            c.weight.copy_(torch.randn(c.weight.shape, generator=torch.Generator().manual_seed(5)))
    prune_to(net.adapter_convs(), 0.5)
    net.finalize()
    plan = storage_plan(net, include=net.is_task_module)
    got = breakdown(plan)
    assert got == {
        "weights": 64 * 4 / 8,           # 32 bytes
        "scales": 16 * 16 / 8,           # 32
        "bn": 2 * 16 * 16 / 8,           # 64
        "head": (16 * 3 + 3) * 32 / 8,   # 204
        "masks": 128 / 8,                # 16
    }
    assert sum(got.values()) == sum(e.bits for e in plan) / 8 == memory_report(net, include=net.is_task_module).bytes


def test_breakdown_puts_all_of_a_quantised_head_in_head():
    plan = storage_plan(nn.ModuleDict({"head": QuantLinear(16, 3, bits=8)}))
    # weights 384 + scales 96 + bias 96 bits, all under the head
    assert breakdown(plan, head="head") == {"weights": 0.0, "scales": 0.0, "bn": 0.0, "head": 576 / 8, "masks": 0.0}


# ------------------------------------------------------------------------------ the `bn` method


def test_bn_method_trains_only_base_bn_and_head(vgg_base):
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("bn"), 3)
    assert net.task_bn and net.adapted == [] and not net.adapter_convs()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    bn_names = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bn_names) == 6 and all(n.startswith("base.features.") for n in bn_names)
    assert set(trainable) == {f"{n}.{leaf}" for n in bn_names for leaf in ("weight", "bias")} | {
        "base.head.weight", "base.head.bias"}
    # 2 * 56 BN values + 16 * 3 + 3 head values
    assert sum(p.numel() for p in trainable.values()) == 2 * BN_CHANNELS + 51 == 163
    net.train()
    assert all(m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    # the other methods: task_bn only where asked
    assert not TransferNet(copy.deepcopy(vgg_base), TaskSpec("head"), 3).task_bn
    assert TransferNet(copy.deepcopy(vgg_base), TaskSpec("serial", task_bn=True), 3).task_bn


@pytest.mark.parametrize("bn_bits, total_bytes", [(32, (2 * 56 * 32 + 51 * 32) / 8), (16, (2 * 56 * 16 + 51 * 32) / 8)])
def test_bn_method_memory_by_hand(vgg_base, tmp_path, bn_bits, total_bytes):
    # 6 BNs over 56 channels, 2 values each at bn_bits; head 16 * 3 + 3 float32 values:
    # 32 bits: (3,584 + 1,632) / 8 = 652 bytes; 16 bits: (1,792 + 1,632) / 8 = 428 bytes
    assert total_bytes == {32: 652, 16: 428}[bn_bits]
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("bn", bn_bits=bn_bits), 3)
    plan = storage_plan(net, include=net.is_task_module)
    assert sum(e.bits for e in plan) / 8 == total_bytes
    assert breakdown(plan) == {"weights": 0.0, "scales": 0.0, "bn": 2 * BN_CHANNELS * bn_bits / 8,
                               "head": 51 * 32 / 8, "masks": 0.0}
    net.finalize()
    # every tensor is whole bytes: the packed payload is exactly the accounting
    sizes = export_packed(net, tmp_path / "bn.bnnpack", {}, include=net.is_task_module)
    assert sizes["tensors"] == 6 + 2
    assert sizes["payload_bytes"] == sizes["accounted_bytes"] == total_bytes


def test_bn_method_finalize_fuses_bn_in_float16(vgg_base):
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("bn", bn_bits=16), 3)
    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    want = {}
    for n, m in bns.items():  # independent path: eval BN as scale * x + shift, rounded to float16
        scale = m.weight.detach() / torch.sqrt(m.running_var + m.eps)
        want[n] = (scale.half().float(), (m.bias.detach() - m.running_mean * scale).half().float())
    net.finalize()
    for n, m in bns.items():
        # a positive eps (some torch versions refuse 0) that with the variance makes exactly 1
        assert m.eps == 2.0 ** -24 > 0
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var + m.eps, torch.ones_like(m.running_var))
        assert torch.equal(torch.sqrt(m.running_var + m.eps), torch.ones_like(m.running_var))
        assert torch.equal(m.weight.detach(), want[n][0]) and torch.equal(m.bias.detach(), want[n][1])
    # at 32 bits finalize fuses in float32 (what the packed file stores), and its outputs barely move
    net32 = TransferNet(copy.deepcopy(vgg_base), TaskSpec("bn", bn_bits=32), 3).eval()
    want32 = {n: (m.weight.detach() / torch.sqrt(m.running_var + m.eps)) for n, m in net32.named_modules()
              if isinstance(m, nn.BatchNorm2d)}
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net32(x)
        net32.finalize()
        after = net32(x)
    for n, m in net32.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 2.0 ** -24 and torch.equal(m.weight.detach(), want32[n])
    assert torch.allclose(before, after, atol=1e-3)


# ---------------------------------------------------------------------------------- packed export


from test_adapters import _randomise  # noqa: E402  random task weights, head and task BN


# name: (spec, prune amount, encodings the packed task state must contain)
EXPORT_CASES = {
    "sign": (TaskSpec("serial", groups=2, bits=1), 0.0, {"sign", "float32", "bn_fused"}),
    "int2": (TaskSpec("serial", groups=2, reduction=2, bits=2, head_bits=2), 0.0, {"int2", "float32"}),
    "int4": (TaskSpec("parallel", groups=2, bits=4, head_bits=4), 0.0, {"int4", "float32"}),
    "int8": (TaskSpec("serial", bits=8, head_bits=8), 0.0, {"int8", "float32"}),
    "ternary": (TaskSpec("serial", bits="ternary", head_bits="ternary"), 0.0, {"ternary", "float32"}),
    "float32": (TaskSpec("parallel", reduction=2, bits=32), 0.0, {"float32", "bn_fused"}),
    "bn16": (TaskSpec("serial", bits=4, task_bn=True, bn_bits=16), 0.0, {"int4", "float16", "bn_fused"}),
    "bn32-task": (TaskSpec("serial", bits=4, task_bn=True), 0.0, {"int4", "float32", "bn_fused"}),
    "sparse-mask-int4": (TaskSpec("serial", bits=4), 0.3, {"sparse"}),
    "sparse-mask-ternary": (TaskSpec("serial", bits="ternary"), 0.3, {"sparse"}),
    "sparse-index-sign": (TaskSpec("serial", bits=1), 0.95, {"sparse"}),
    "sparse-index-float32": (TaskSpec("parallel", bits=32), 0.95, {"sparse"}),
    "learned-scales": (TaskSpec("serial", groups=2, bits=2, learn_scale=True), 0.0, {"int2", "float32"}),
    "learned-scales-16": (TaskSpec("serial", bits=4, learn_scale=True, bn_bits=16), 0.3,
                          {"sparse", "float16"}),
    "bn-method-16": (TaskSpec("bn", bn_bits=16), 0.0, {"bn_fused", "float32"}),
    "bn-method-32": (TaskSpec("bn"), 0.0, {"bn_fused", "float32"}),
}


def _payload_bytes_by_hand(plan) -> int:
    """Each tensor is padded to whole bytes; a sparse one is two parts (mask or indices, then the
    kept values), each padded."""
    total = 0
    for e in plan:
        if e.encoding == "sparse":
            total += math.ceil(e.where_bits / 8) + math.ceil((e.bits - e.where_bits) / 8)
        else:
            total += math.ceil(e.bits / 8)
    return total


def _build(vgg_base, spec: TaskSpec, prune: float, seed: int = 41) -> TransferNet:
    net = TransferNet(copy.deepcopy(vgg_base), spec, 4)
    _randomise(net, seed)
    if prune:
        prune_to(net.adapter_convs(), prune, "layer")
    net.finalize()
    return net.eval()


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_packed_task_state_round_trip(vgg_base, tmp_path, case):
    spec, prune, encodings = EXPORT_CASES[case]
    net = _build(vgg_base, spec, prune)
    x = _x()
    with torch.no_grad():
        expected = net(x)
    plan = storage_plan(net, include=net.is_task_module)
    path = tmp_path / "task.bnnpack"
    sizes = export_packed(net, path, {"case": case}, include=net.is_task_module)
    assert path.read_bytes()[:8] == MAGIC + b"3"
    assert sizes["accounted_bytes"] == sum(e.bits for e in plan) / 8
    assert sizes["payload_bytes"] == _payload_bytes_by_hand(plan)
    assert sizes["file_bytes"] == sizes["header_bytes"] + sizes["payload_bytes"] == path.stat().st_size

    (n,) = struct.unpack("<I", path.read_bytes()[8:12])
    records = json.loads(path.read_bytes()[16:16 + n])["tensors"]
    assert encodings <= {r["encoding"] for r in records} | {r["levels"] for r in records}
    if "sparse" in encodings:
        sparse = [e for e in plan if e.encoding == "sparse"]
        assert sparse and len(sparse) == len(net.adapter_convs())
        # 0.3 keeps 70%: the 1-bit mask is cheaper; 0.95 keeps a handful: indices are cheaper
        for e in sparse:
            if prune < 0.5:
                assert e.where_bits == e.numel
            else:
                assert e.where_bits == e.nnz * index_bits(e.numel) < e.numel

    meta, tensors = read_packed(path)
    assert meta == {"case": case}
    # k-bit weights come back as their integer levels, the scales separately
    quant = {n: m for n, m in net.named_modules() if isinstance(m, (AdapterConv, QuantLinear))}
    for name, m in quant.items():
        assert torch.equal(tensors[f"{name}.weight"], m.weight.detach()), name
        if m.bits == 32:
            assert f"{name}.scale" not in tensors
        else:
            assert torch.equal(tensors[f"{name}.weight"], tensors[f"{name}.weight"].round())
            assert tensors[f"{name}.weight"].abs().max() <= q_max(m.bits)
            assert torch.equal(tensors[f"{name}.scale"], m.scale.detach()), name
    for name, m in net.named_modules():  # BN entries: scale then shift at the stored width
        if isinstance(m, nn.BatchNorm2d) and net.is_task_module(name, m):
            scale, shift = fused_bn(m)
            dtype = torch.float16 if m.stored_bits == 16 else torch.float32
            assert torch.equal(tensors[name], torch.stack([scale.to(dtype).float(), shift.to(dtype).float()])), name

    # a fresh net (other random task weights, not finalized) loaded from the file computes the same
    target = TransferNet(copy.deepcopy(vgg_base), spec, 4)
    _randomise(target, seed=99)
    target.eval()
    with torch.no_grad():
        assert not torch.allclose(target(x), expected, atol=1e-3)  # the load has something to do
    load_packed_into(target, path)
    for m in target.modules():
        if isinstance(m, (AdapterConv, QuantLinear)) and m.bits != 32:
            assert bool(m.frozen)
    with torch.no_grad():
        got = target(x)
    # finalize fused every BN; the base's come fused from the base file (tests/test_export.py):
    # fused here the same way, the loaded network computes exactly what the source does
    for n, m in target.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not target.is_task_module(n, m):
            fuse_bn_(m)
    with torch.no_grad():
        assert torch.equal(target(x), expected)


def test_fixed_scale_function_matches_module():
    # `fixed_scale` with the mask is what an un-frozen layer runs with
    conv = _random_conv(4, seed=8)
    prune_to([conv], 0.4)
    assert torch.equal(conv.levels_and_scale()[1], fixed_scale(conv.weight, 4, conv.mask))
    q = quant_levels(conv.weight, fixed_scale(conv.weight, 4, conv.mask), 4) * conv.mask
    assert torch.equal(conv.levels_and_scale()[0], q)
