"""Quantizers and the quantised conv, after Larq: a quantizer is a small function carrying a
`precision` attribute (bits per value), and layers take quantizers as arguments, so "binary" is a
property the memory accounting reads rather than a class hierarchy.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        # torch.sign(0) == 0 would leave a third value; 0 maps to +1 so outputs stay binary.
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """Forward: +1 where x >= 0 else -1. Backward: gradient passed where |x| <= 1, else 0."""
    return _SignSTE.apply(x)


ste_sign.precision = 1


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


relu.precision = 32

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def precision_of(quantizer: Optional[Quantizer]) -> int:
    return 32 if quantizer is None else int(getattr(quantizer, "precision", 32))


class QuantConv2d(nn.Conv2d):
    """Conv2d whose inputs and weights pass through the given quantizers (None: full precision).

    With `kernel_quantizer=ste_sign` the latent float weights are kept for training and clipped to
    [-1, 1] after each optimiser step (see `clip_latent_weights`); inference uses their signs.
    """

    def __init__(self, *args, input_quantizer: Optional[Quantizer] = None,
                 kernel_quantizer: Optional[Quantizer] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer

    @property
    def weight_bits(self) -> int:
        return precision_of(self.kernel_quantizer)

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        return w if self.kernel_quantizer is None else self.kernel_quantizer(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, input_bits={precision_of(self.input_quantizer)}"


@torch.no_grad()
def clip_latent_weights(model: nn.Module) -> None:
    """Clip the latent weights of binary layers to [-1, 1] (outside it the STE passes no gradient)."""
    for m in model.modules():
        if isinstance(m, QuantConv2d) and m.weight_bits == 1 and m.weight.requires_grad:
            m.weight.clamp_(-1.0, 1.0)


# ------------------------------------------------------------------ k-bit weights (adapters, head)
#
# `bits` of a task weight: 1, 2, 4, 8 (uniform, 2**k levels), "ternary" ({-1, 0, +1}, stored in 2
# bits) or 32 (float). A quantised tensor is q * s: q an integer level, s one float scale per
# output channel. The k-bit levels are mid-rise, q odd in [-(2**k - 1), 2**k - 1], so 2 bits give
# four levels and 1 bit gives sign(w) * s with no level at zero (zeros only come from pruning).

Bits = Union[int, str]


def storage_bits(bits: Bits) -> int:
    """Bits per stored weight."""
    return 2 if bits == "ternary" else int(bits)


def q_max(bits: Bits) -> int:
    """The largest level |q|."""
    return 1 if bits == "ternary" else 2 ** int(bits) - 1


def fixed_scale(w: torch.Tensor, bits: Bits, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The closed-form per-output-channel scale (pruned weights ignored):
    1 bit, mean |w| (XNOR-Net's L2-optimal scale for sign(w)); ternary, 1.4 mean |w| (the rounding
    threshold s/2 is TWN's 0.7 mean |w|); k bits, max |w| / (2**k - 1) (the outer levels hit max |w|)."""
    a = w.detach().abs().flatten(1)
    live = torch.ones_like(a) if mask is None else mask.detach().flatten(1)
    if bits == 1 or bits == "ternary":
        s = (a * live).sum(1) / live.sum(1).clamp_min(1)
        s = s if bits == 1 else 1.4 * s
    else:
        s = (a * live).amax(1) / q_max(bits)
    return s.clamp_min(1e-8)


class _FloorSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def quant_levels(w: torch.Tensor, scale: torch.Tensor, bits: Bits) -> torch.Tensor:
    """Integer levels q of w / scale (straight-through: the gradient passes inside the clipping
    range, so a learned scale gets LSQ's gradient through q * scale)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    v = w / scale.view(shape)
    qm = q_max(bits)
    if bits == "ternary":
        v = v.clamp(-1.5, 1.5)
        return _FloorSTE.apply(v + 0.5).clamp(-1, 1)
    v = v.clamp(-(qm + 1), qm + 1)  # the outer levels +-qm cover up to +-(qm + 1)
    return (2 * _FloorSTE.apply(v / 2) + 1).clamp(-qm, qm)  # nearest odd integer


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, gradient times g (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def level_codes(q: torch.Tensor, bits: Bits) -> torch.Tensor:
    """Levels -> unsigned codes 0 .. 2**storage_bits - 1 (the packed form)."""
    return (q + 1) if bits == "ternary" else (q + q_max(bits)) / 2


def code_levels(c: torch.Tensor, bits: Bits) -> torch.Tensor:
    return (c - 1) if bits == "ternary" else 2 * c - q_max(bits)
