"""Adapters on a frozen base (Rebuffi et al. 2017 "series", 2018 "parallel"), and the transfer
network that holds base, adapters and a new head, PEFT-style: the task-specific state is a named
subset of the network, saved and loaded apart from the base.

serial:   h = BN(qconv(x));  h = h + BN_a(conv1x1_g(h))
parallel: h = BN(qconv(x)) + BN_a(conv1x1_g(x))      (the 1x1 conv takes qconv's stride)

BN_a's gamma starts at zero, so an adapted network starts as exactly the base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.nn.backbones import Backbone, ConvBlock
from pipeline.nn.binary import Bits, fixed_scale, grad_scale, q_max, quant_levels, storage_bits
from pipeline.nn.fusion import fuse_bn_, is_fused

AdapterType = Literal["serial", "parallel"]
Method = Literal["full", "head", "bn", "serial", "parallel"]


class _QuantWeight:
    """k-bit fake quantisation (straight-through) and a pruning mask for a conv or dense weight.

    The stored form is integer levels q times one float scale per output channel (see
    `pipeline.nn.binary`); the scale is the closed-form one, or learned (LSQ) with `learn_scale`.
    `bits`, `scale_bits` and `pruned` are what the memory accounting reads. `freeze_codes()` turns
    the latent weights into the stored levels (kept in `weight`) and scales, as saved in adapter files.
    """

    def _init_quant(self, bits: Bits, learn_scale: bool = False, scale_bits: int = 32) -> None:
        self.bits = bits
        self.weight_bits = storage_bits(bits)
        self.scale_bits = scale_bits
        self.learn_scale = learn_scale and bits != 32
        self.pruned = False
        self.register_buffer("mask", torch.ones_like(self.weight))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))  # weight holds levels
        init = fixed_scale(self.weight, bits) if bits != 32 else torch.zeros(self.weight.shape[0])
        if self.learn_scale:
            self.scale = nn.Parameter(init.clone())
        else:
            self.register_buffer("scale", init.clone())

    def _scale(self) -> torch.Tensor:
        if self.learn_scale:  # LSQ: gradient scaled by 1 / sqrt(weights per channel * q_max)
            return grad_scale(self.scale.abs().clamp_min(1e-8), (self.weight[0].numel() * q_max(self.bits)) ** -0.5)
        return fixed_scale(self.weight, self.bits, self.mask)

    def levels_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored form: integer levels (0 where pruned) and the per-channel scale."""
        if bool(self.frozen):
            return self.weight, self.scale
        scale = self._scale()
        return quant_levels(self.weight, scale, self.bits) * self.mask, scale

    def effective_weight(self) -> torch.Tensor:
        if self.bits == 32:
            return self.weight * self.mask
        q, scale = self.levels_and_scale()
        return q * scale.view((-1,) + (1,) * (q.dim() - 1))

    @torch.no_grad()
    def make_pruning_permanent(self) -> None:
        self.weight.mul_(self.mask)
        self.pruned = bool((self.mask == 0).any())

    @torch.no_grad()
    def freeze_codes(self) -> None:
        if self.bits == 32 or bool(self.frozen):
            return
        q, scale = self.levels_and_scale()
        if self.scale_bits == 16:  # what is stored is what runs
            scale = scale.half().float()
        self.weight.copy_(q)
        self.scale.data = scale.detach().clone()
        self.frozen.fill_(True)


class AdapterConv(_QuantWeight, nn.Conv2d):
    """1x1 adapter conv (grouped, strided) with k-bit weights and a pruning mask."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int, bits: Bits, learn_scale: bool = False,
                 scale_bits: int = 32):
        nn.Conv2d.__init__(self, cin, cout, 1, stride=stride, groups=groups, bias=False)
        self._init_quant(bits, learn_scale, scale_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), None)


class QuantLinear(_QuantWeight, nn.Linear):
    """The task head, optionally with k-bit weights (its bias stays float32)."""

    def __init__(self, cin: int, cout: int, bits: Bits = 32):
        nn.Linear.__init__(self, cin, cout)
        self._init_quant(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class ResidualAdapter(nn.Module):
    def __init__(self, kind: AdapterType, cin: int, cout: int, stride: int, groups: int, reduction: int, bits: Bits,
                 learn_scale: bool = False, bn_bits: int = 32):
        super().__init__()
        self.kind = kind
        src = cout if kind == "serial" else cin
        mid = cout // reduction
        stride = stride if kind == "parallel" else 1
        q = dict(learn_scale=learn_scale, scale_bits=bn_bits)  # per-channel floats stored alike
        layers = [AdapterConv(src, mid, groups, stride, bits, **q)]
        if reduction > 1:
            layers.append(AdapterConv(mid, cout, groups, 1, bits, **q))
        self.convs = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cout)
        self.bn.stored_bits = bn_bits
        nn.init.zeros_(self.bn.weight)  # identity at initialisation

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.bn(self.convs(h if self.kind == "serial" else x))


@dataclass(frozen=True)
class TaskSpec:
    """What the task-specific state of one transfer run is made of."""

    method: Method
    groups: int = 1
    reduction: int = 1
    placement: Union[str, list[int]] = "all"
    task_bn: bool = False
    bits: Bits = 32
    head_bits: Bits = 32
    bn_bits: int = 32         # fused adapter/task BN and adapter weight scales (the head's stay 32)
    learn_scale: bool = False  # LSQ step sizes instead of the closed-form scales

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_placement(placement: Union[str, list[int]], n_blocks: int) -> list[int]:
    """`all`, `last:K` or a list of block indices -> sorted block indices."""
    allowed = f"allowed: all, last:K (1 <= K <= {n_blocks}), or a list of indices in 0..{n_blocks - 1}"
    if placement == "all":
        return list(range(n_blocks))
    if isinstance(placement, str):
        if placement.startswith("last:") and placement[5:].isdigit() and 1 <= int(placement[5:]) <= n_blocks:
            return list(range(n_blocks - int(placement[5:]), n_blocks))
        raise UserError(f"adapter.placement: '{placement}' is not a placement; {allowed}")
    if not placement or any(not isinstance(i, int) or not 0 <= i < n_blocks for i in placement) \
            or len(set(placement)) != len(placement):
        raise UserError(f"adapter.placement: {placement} is not a placement; {allowed}")
    return sorted(placement)


def check_groups(spec: TaskSpec, blocks: list[ConvBlock], where: list[int]) -> None:
    for i in where:
        conv = blocks[i].conv
        channels = [conv.in_channels if spec.method == "parallel" else conv.out_channels, conv.out_channels]
        channels.append(conv.out_channels // spec.reduction)
        if conv.out_channels % spec.reduction or any(c % spec.groups for c in channels):
            raise UserError(
                f"adapter.groups={spec.groups}, reduction={spec.reduction}: block {i} has {conv.in_channels}->"
                f"{conv.out_channels} channels; groups must divide every adapter width ({sorted(set(channels))})"
            )


class TransferNet(nn.Module):
    """A base backbone with a new head and (for serial/parallel) adapters.

    `start` skips the first feature modules: when they are frozen their outputs are computed once
    (see `frozen_prefix`) and the network is trained on those cached features.
    """

    def __init__(self, base: Backbone, spec: TaskSpec, num_classes: int):
        super().__init__()
        self.spec = spec
        self.base = base
        self.start = 0
        base.head = QuantLinear(base.head.in_features, num_classes, spec.head_bits)
        blocks = base.blocks
        self.adapted: list[int] = []
        if spec.method in ("serial", "parallel"):
            self.adapted = resolve_placement(spec.placement, len(blocks))
            check_groups(spec, blocks, self.adapted)
            for i in self.adapted:
                c = blocks[i].conv
                blocks[i].adapter = ResidualAdapter(spec.method, c.in_channels, c.out_channels, c.stride[0],
                                            spec.groups, spec.reduction, spec.bits, spec.learn_scale, spec.bn_bits)
        for name, m in base.features.named_modules():  # how the task BN is stored (a bank reuses the base)
            if isinstance(m, nn.BatchNorm2d) and "adapter" not in name.split("."):  # BN_a keeps its bn_bits
                m.stored_bits = spec.bn_bits if self.task_bn else 32
        for name, p in base.named_parameters():
            p.requires_grad = spec.method == "full" or self.is_task_param(name)

    # ---- which parts are task-specific
    def is_task_module(self, name: str, module: nn.Module) -> bool:
        """Modules whose tensors make up the task-specific state (names relative to self)."""
        if self.spec.method == "full":
            return True
        if name == "base.head" or ".adapter" in name:
            return True
        return self.task_bn and isinstance(module, nn.BatchNorm2d) and name.startswith("base.features")

    @property
    def task_bn(self) -> bool:
        """`bn` trains only the base's BN (in a BNN, its shift is the next sign's threshold) and the head."""
        return self.spec.method == "bn" or self.spec.task_bn

    def is_task_param(self, base_name: str) -> bool:
        modules = dict(self.named_modules())
        owner = "base." + base_name.rsplit(".", 1)[0]
        return self.is_task_module(owner, modules[owner])

    def task_state(self) -> dict[str, torch.Tensor]:
        keep = {n for n, m in self.named_modules() if n and self.is_task_module(n, m)}
        return {k: v for k, v in self.state_dict().items() if k.rsplit(".", 1)[0] in keep}

    # ---- train/eval: frozen BN keeps its running statistics
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.spec.method != "full":
            for name, m in self.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not self.is_task_module(name, m):
                    m.eval()
        return self

    def frozen_prefix(self) -> int:
        """How many leading feature modules hold nothing trainable (outputs can be cached)."""
        if self.spec.method == "full":
            return 0
        n = 0
        for m in self.base.features:
            if any(p.requires_grad for p in m.parameters()) or any(isinstance(c, ResidualAdapter) for c in m.modules()):
                break
            n += 1
        return n

    @torch.no_grad()
    def prefix_features(self, x: torch.Tensor, n: int, batch_size: int = 512) -> torch.Tensor:
        was = self.training
        self.eval()
        out = torch.cat([self.base.features[:n](x[i: i + batch_size]) for i in range(0, len(x), batch_size)])
        self.train(was)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.base.features
        for m in list(f)[self.start:]:
            x = m(x)
        return self.base.head(torch.flatten(self.base.pool(x), 1))

    def adapter_convs(self) -> list[AdapterConv]:
        return [m for m in self.modules() if isinstance(m, AdapterConv)]

    def finalize(self) -> None:
        """Make pruning permanent, freeze k-bit codes and fuse every BN into the scale and shift
        the packed files store (float16 where the task state says so): the network measured is
        then exactly the one that runs from the packed files."""
        for name, m in self.named_modules():
            if isinstance(m, _QuantWeight):
                m.make_pruning_permanent()
                m.freeze_codes()
            elif isinstance(m, nn.BatchNorm2d) and not is_fused(m):
                half = getattr(m, "stored_bits", 32) == 16 and self.is_task_module(name, m)
                fuse_bn_(m, torch.float16 if half else torch.float32)

