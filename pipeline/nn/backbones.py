"""Backbones, each built in `binary` or `fp32` precision from one definition.

A backbone is `features` (an nn.Sequential) -> global average pool -> `head` (dense, with bias).
Its quantised 3x3 convs live in `ConvBlock`s (conv + BN), the places adapters attach to;
`model.blocks` lists them in forward order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from pipeline.config import ParamsError
from pipeline.nn.binary import QuantConv2d, relu, ste_sign

Precision = Literal["binary", "fp32"]


def quantizers(precision: Precision) -> dict:
    # The fp32 twin replaces sign(x) by ReLU and keeps float weights: same graph, same shapes.
    if precision == "binary":
        return {"input_quantizer": ste_sign, "kernel_quantizer": ste_sign}
    return {"input_quantizer": relu, "kernel_quantizer": None}


class ConvBlock(nn.Module):
    """Quantised 3x3 conv + BN: the unit adapters attach to (see pipeline.nn.adapters)."""

    def __init__(self, cin: int, cout: int, stride: int, precision: Precision):
        super().__init__()
        self.conv = QuantConv2d(cin, cout, 3, stride=stride, padding=1, bias=False, **quantizers(precision))
        self.bn = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
        self.adapter: Optional[nn.Module] = None  # set by attach_adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if self.adapter is not None:
            h = self.adapter(x, h)
        return h


class BiRealBlock(nn.Module):
    """Bi-Real Net unit: ConvBlock plus a real-valued shortcut around it (downsampling when the
    shape changes: 2x2 average pool + full-precision 1x1 conv + BN, as in Larq Zoo)."""

    def __init__(self, cin: int, cout: int, stride: int, precision: Precision):
        super().__init__()
        self.block = ConvBlock(cin, cout, stride, precision)
        self.shortcut: nn.Module = nn.Identity()
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(2, stride=stride, ceil_mode=True),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


@dataclass(frozen=True)
class Arch:
    """Everything needed to rebuild a backbone; stored in checkpoints and model cards."""

    name: str
    precision: Precision
    num_classes: int
    in_channels: int = 1
    input_size: int = 28
    width: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


class Backbone(nn.Module):
    def __init__(self, arch: Arch, features: nn.Sequential, feat_dim: int):
        super().__init__()
        self.arch = arch
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(feat_dim, arch.num_classes)

    @property
    def blocks(self) -> list[ConvBlock]:
        return [m for m in self.features.modules() if isinstance(m, ConvBlock)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def bnn_vgg_small(arch: Arch) -> Backbone:
    """CPU-sized VGG-style BNN: full-precision stem conv, five binary 3x3 conv+BN blocks, three
    2x2 max-pools, global pool, full-precision head. Width w gives channels w, 2w, 2w, 4w, 4w."""
    w, p = arch.width or 32, arch.precision
    f = nn.Sequential(
        nn.Conv2d(arch.in_channels, w, 3, padding=1, bias=False),
        nn.BatchNorm2d(w),
        ConvBlock(w, w, 1, p),
        nn.MaxPool2d(2),
        ConvBlock(w, 2 * w, 1, p),
        ConvBlock(2 * w, 2 * w, 1, p),
        nn.MaxPool2d(2),
        ConvBlock(2 * w, 4 * w, 1, p),
        nn.MaxPool2d(2),
        ConvBlock(4 * w, 4 * w, 1, p),
    )
    return Backbone(arch, f, 4 * w)


def birealnet18(arch: Arch) -> Backbone:
    """Bi-Real Net 18 (Liu et al. 2018) in Larq Zoo's layout: 7x7/2 full-precision stem + BN +
    3x3/2 max-pool, four stages of four binary 3x3 convs (widths w, 2w, 4w, 8w; the first conv of
    stages 2-4 has stride 2), a shortcut around every conv, global pool, dense head with bias."""
    w, p = arch.width or 64, arch.precision
    layers: list[nn.Module] = [
        nn.Conv2d(arch.in_channels, w, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(w),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    cin = w
    for stage, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
        for i in range(4):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BiRealBlock(cin, cout, stride, p))
            cin = cout
    return Backbone(arch, nn.Sequential(*layers), cin)


BACKBONES: dict[str, Callable[[Arch], Backbone]] = {
    "bnn_vgg_small": bnn_vgg_small,
    "birealnet18": birealnet18,
}


def build_backbone(arch: Arch, key: str = "model.name") -> Backbone:
    """The backbone `arch` names; an unknown name is a ParamsError naming `key` (the params key
    or CLI option it came from), raised before anything is built."""
    if arch.name not in BACKBONES:
        raise ParamsError(f"{key}: unknown model '{arch.name}'; allowed: {', '.join(BACKBONES)}")
    return BACKBONES[arch.name](arch)
