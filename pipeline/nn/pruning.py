"""Magnitude pruning of adapter weights through masks; `AdapterConv.make_pruning_permanent`
turns masks into zeros the memory accounting and the packed export see."""

from __future__ import annotations

from typing import Literal

import torch

from pipeline.nn.adapters import AdapterConv


@torch.no_grad()
def prune_to(convs: list[AdapterConv], amount: float, scope: Literal["layer", "global"] = "layer") -> None:
    """Mask the smallest-magnitude weights so that exactly round(amount * n) are zero, per layer
    or over all layers together. Already-masked weights count as the smallest (masks only grow)."""
    if not convs:
        return
    if scope == "layer":
        for conv in convs:
            _mask_smallest([conv], amount)
    else:
        _mask_smallest(convs, amount)


def _mask_smallest(convs: list[AdapterConv], amount: float) -> None:
    # Masked weights rank below every live one (-1), whatever their latent value.
    magnitude = torch.cat([torch.where(c.mask > 0, c.weight.abs(), -1.0).flatten() for c in convs])
    k = int(round(amount * magnitude.numel()))
    keep = torch.ones_like(magnitude)
    if k > 0:
        order = torch.argsort(magnitude, stable=True)
        keep[order[:k]] = 0.0
    offset = 0
    for c in convs:
        n = c.mask.numel()
        c.mask.copy_(keep[offset: offset + n].view_as(c.mask))
        offset += n


def sparsity(convs: list[AdapterConv]) -> float:
    """Fraction of stored adapter weights that are zero (counted, not assumed)."""
    total = sum(c.weight.numel() for c in convs)
    if total == 0:
        return 0.0
    zeros = sum(int((c.weight * c.mask == 0).sum()) for c in convs)
    return zeros / total
