"""Plain evaluation of a network on prepared tensors (what `pipeline evaluate` and the bank use,
and what transfer records, so both go through the same arithmetic)."""

from __future__ import annotations

import torch


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    was = net.training
    net.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((net(x[i: i + batch_size]).argmax(1) == y[i: i + batch_size]).sum())
    net.train(was)
    return correct / max(len(y), 1)
