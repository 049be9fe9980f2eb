"""BatchNorm fused into the scale and shift the packed files store: `finalize` fuses a task
state's BN, the base's BN is fused as every finalized network runs it, and the packed format
writes and reads BN in this form."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fused_bn(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale * x + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


# A fused BN keeps a positive eps (some torch versions refuse eps 0) with var + eps == 1 exactly
# in float32, so it computes scale * x + shift and nothing else.
FUSED_EPS = 2.0 ** -24
FUSED_VAR = 1.0 - FUSED_EPS  # the float32 just below 1


def is_fused(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.eps == FUSED_EPS


@torch.no_grad()
def set_fused_(bn: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor, shift: torch.Tensor) -> None:
    bn.weight.copy_(scale)
    bn.bias.copy_(shift)
    bn.running_mean.zero_()
    bn.running_var.fill_(FUSED_VAR)
    bn.eps = FUSED_EPS


@torch.no_grad()
def fuse_bn_(bn: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype = torch.float32) -> None:
    """Rewrite `bn` in place as its fused scale and shift (rounded through `dtype`)."""
    scale, shift = fused_bn(bn)
    set_fused_(bn, scale.to(dtype).float(), shift.to(dtype).float())
