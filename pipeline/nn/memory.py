"""The one memory function. Rule (DESIGN.md, after Larq's `larq.models.summary`):

- binary weights: 1 bit each; float tensors: 32 bits; k-bit quantised weights (ternary: 2): k bits
  each plus one scale per output channel;
- BatchNorm: 2 values per channel (scale and shift once fused), 32 bits each, or the task
  state's `bn_bits`; the adapters' weight scales are stored at the same width (the head's
  at 32);
- a pruned tensor: its non-zeros times their bits plus the cheaper of a 1-bit mask or explicit
  indices (ceil(log2(numel)) bits each).

`storage_plan` lists every stored tensor with its encoding; `memory_report` sums it and
`pipeline.nn.export` writes the very same plan to disk, so file sizes check the accounting.
`breakdown` splits a plan into what the report names: weights, scales, BN, head, masks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from pipeline.nn.binary import QuantConv2d


@dataclass
class TensorEntry:
    name: str          # state-dict style name ("features.2.conv.weight", "features.1" for a BN)
    layer: str         # module name the tensor belongs to
    encoding: str      # "sign" | "int{k}" | "ternary" | "float32" | "float16" | "bn_fused" | "sparse"
    numel: int         # values stored before pruning
    bits: int          # exact bits this entry needs
    value_bits: int    # bits per stored value (1, 2, k, 16 or 32)
    nnz: Optional[int] = None  # for pruned tensors
    where_bits: int = 0        # for pruned tensors: the mask or index bits inside `bits`
    levels: Optional[str] = None  # for pruned tensors: how the kept values are coded (an encoding)


@dataclass
class LayerMemory:
    layer: str
    kind: str
    params: int
    bits: int

    @property
    def bits_per_param(self) -> float:
        return self.bits / self.params if self.params else 0.0

    @property
    def kib(self) -> float:
        return self.bits / 8 / 1024


@dataclass
class MemoryReport:
    layers: list[LayerMemory] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def bytes(self) -> float:
        return self.bits / 8

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "bits": self.bits,
            "bytes": self.bytes,
            "layers": [
                {**asdict(layer), "bits_per_param": layer.bits_per_param, "kib": layer.kib}
                for layer in self.layers
            ],
        }

    def table(self) -> str:
        rows = [(l.layer, l.kind, f"{l.params:,}", f"{l.bits_per_param:.2f}", f"{l.kib:.2f}") for l in self.layers]
        rows.append(("total", "", f"{self.params:,}", f"{self.bits / max(self.params, 1):.2f}", f"{self.bits / 8192:.2f}"))
        head = ("layer", "kind", "params", "bits/param", "memory KiB")
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
        fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows[:-1]] + ["  ".join("-" * w for w in widths), fmt(rows[-1])]
        return "\n".join(lines)


def index_bits(numel: int) -> int:
    return max(1, math.ceil(math.log2(numel))) if numel > 1 else 1


def sparse_bits(numel: int, nnz: int, value_bits: int) -> int:
    """Non-zeros times their bits plus the cheaper of a 1-bit mask or explicit indices."""
    return nnz * value_bits + min(numel, nnz * index_bits(numel))


def weight_bits(module: nn.Module) -> int:
    """Bits per stored weight of a conv/dense layer: read from its quantizer, as Larq does."""
    if isinstance(module, QuantConv2d):
        return module.weight_bits
    return int(getattr(module, "weight_bits", 32))


def level_encoding(module: nn.Module) -> str:
    bits = getattr(module, "bits", weight_bits(module))
    return {1: "sign", 32: "float32", "ternary": "ternary"}.get(bits, f"int{bits}")


def _weight_entries(name: str, layer: str, module: nn.Module, w: torch.Tensor) -> list[TensorEntry]:
    bits, numel = weight_bits(module), w.numel()
    levels = level_encoding(module)
    if getattr(module, "pruned", False):
        if levels == "ternary":  # levels of 0 are not stored either (latent weights: count the levels)
            with torch.no_grad():
                w = module.levels_and_scale()[0]
        nnz = int(torch.count_nonzero(w))
        where = min(numel, nnz * index_bits(numel))
        entries = [TensorEntry(name, layer, "sparse", numel, nnz * bits + where, bits, nnz, where, levels)]
    else:
        entries = [TensorEntry(name, layer, levels, numel, bits * numel, bits)]
    if getattr(module, "bits", 32) != 32:  # one scale per output channel
        sb, channels = int(getattr(module, "scale_bits", 32)), w.shape[0]
        entries.append(TensorEntry(f"{layer}.scale", layer, f"float{sb}", channels, sb * channels, sb))
    return entries


def storage_plan(model: nn.Module, include: Optional[Callable[[str, nn.Module], bool]] = None) -> list[TensorEntry]:
    """Every tensor needed at inference, with its encoding and exact bit count.

    `include(name, module)` picks modules (e.g. only the task-specific ones); default: all.
    """
    entries: list[TensorEntry] = []
    for name, m in model.named_modules():
        if include is not None and not include(name, m):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            vb = int(getattr(m, "stored_bits", 32))
            entries.append(TensorEntry(name, name, "bn_fused", 2 * m.num_features, 2 * vb * m.num_features, vb))
            continue
        for pname, p in m.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if pname == "weight" and isinstance(m, (nn.Conv2d, nn.Linear)):
                entries += _weight_entries(full, name, m, p.detach())
            elif pname != "scale":  # a learned scale is counted with its weight
                entries.append(TensorEntry(full, name, "float32", p.numel(), 32 * p.numel(), 32))
    return entries


BREAKDOWN = ("weights", "scales", "bn", "head", "masks")
BREAKDOWN_COLUMNS = [f"mem_{k}_bytes" for k in BREAKDOWN]  # in results.csv and pareto.csv


def breakdown(entries: list[TensorEntry], head: str = "base.head") -> dict[str, float]:
    """Bytes of a storage plan by kind: the head (all of it), BN, weight scales, pruning masks or
    indices, and the weights themselves (everything else)."""
    out = dict.fromkeys(BREAKDOWN, 0.0)
    for e in entries:
        if e.layer == head:
            out["head"] += e.bits / 8
        elif e.encoding == "bn_fused":
            out["bn"] += e.bits / 8
        elif e.name.endswith(".scale"):
            out["scales"] += e.bits / 8
        else:
            out["masks"] += e.where_bits / 8
            out["weights"] += (e.bits - e.where_bits) / 8
    return out


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm"
    if isinstance(module, nn.Conv2d):
        k = "x".join(map(str, module.kernel_size))
        g = f"/g{module.groups}" if module.groups > 1 else ""
        return f"Conv{k}{g} {weight_bits(module)}-bit"
    if isinstance(module, nn.Linear):
        return f"Dense {weight_bits(module)}-bit"
    return type(module).__name__


def memory_report(model: nn.Module, include: Optional[Callable[[str, nn.Module], bool]] = None) -> MemoryReport:
    """Per-layer parameters and bits of `model` (or of the modules `include` picks)."""
    modules = dict(model.named_modules())
    by_layer: dict[str, LayerMemory] = {}
    for e in storage_plan(model, include):
        row = by_layer.setdefault(e.layer, LayerMemory(e.layer or "(root)", _kind(modules[e.layer]), 0, 0))
        row.params += e.numel
        row.bits += e.bits
    return MemoryReport(list(by_layer.values()))


def training_memory(net: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """What one training step on the batch `x` holds, TinyTL's measure (activations dominate):
    the tensors autograd saves for backward (counted once per storage, the parameters apart), every
    parameter, and a gradient and two Adam moments per trainable one, in bytes as allocated. Not
    the storage accounting above: this is working memory, on a copy, so running statistics stay."""
    import copy

    m = copy.deepcopy(net)
    m.train()  # the network keeps its frozen parts in eval mode
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    trainable = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    activations = sum(saved.values())
    return {"train_activation_bytes": activations, "train_memory_bytes": activations + weights + 3 * trainable}
