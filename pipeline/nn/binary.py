"""Quantizers and the quantised conv, after Larq: a quantizer is a small function carrying a
`precision` attribute (bits per value), and layers take quantizers as arguments, so "binary" is a
property the memory accounting reads rather than a class hierarchy.
"""

from __future__ import annotations

from typing import Callable, Optional

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
