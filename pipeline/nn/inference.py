"""The one batched-inference loop: what transfer records, `pipeline evaluate` and the banks
compute, so every recorded number goes through the same arithmetic."""

from __future__ import annotations

import torch


@torch.no_grad()
def logits(net: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was = net.training
    net.eval()
    out = torch.cat([net(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)
    net.train(was)
    return out


def predict(net: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The predicted class of each input."""
    return logits(net, x, batch_size).argmax(1) if len(x) else torch.empty(0, dtype=torch.long)


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    if not len(y):
        return 0.0
    return int((predict(net, x, batch_size) == y).sum()) / len(y)
