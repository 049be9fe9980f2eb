"""Inference in numpy from the packed files: the binary 3x3 convolutions on packed bits (XNOR and
popcount over 64-bit words, `numpy.bitwise_count`), everything else (stem, adapters, fused BN,
pooling, head) in float32. No torch arithmetic: torch only decodes the files.

A binary conv's inputs are sign(x) in {-1, +1}: over K inputs sum(a * w) = K - 2 * popcount(a XOR w)
with bit 1 for +1; its zero padding contributes 0, which a per-border correction restores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.errors import UserError
from pipeline.runtime.loader import check_base, default_base, read_base, read_task

# bnn_vgg_small's features (pipeline.nn.backbones), in order: what each index is.
VGG_SMALL = ["stem", "bn", "block", "pool", "block", "block", "pool", "block", "pool", "block"]


def pack_rows(bits: np.ndarray) -> np.ndarray:
    """(R, K) booleans -> (R, ceil(K / 64)) uint64 words (zero-padded)."""
    r, k = bits.shape
    pad = -k % 64
    if pad:
        bits = np.concatenate([bits, np.zeros((r, pad), dtype=bool)], axis=1)
    return np.packbits(bits, axis=1).view(np.uint64)


def _patches(x: np.ndarray, k: int = 3, pad: int = 1) -> tuple[np.ndarray, tuple[int, int, int]]:
    """im2col: (N, C, H, W) -> (N * H' * W', C * k * k) in (C, kh, kw) order (torch's weight order)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (k, k), axis=(2, 3))  # N, C, H', W', k, k
    ho, wo = win.shape[2], win.shape[3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k), (n, ho, wo)


class BinaryConv:
    """3x3, stride 1, padding 1 conv of sign(x) with +-1 weights, on packed bits.

    The padding is packed as -1 like any other 0 bit, which adds (-1) * w for every padded tap;
    a per-border correction (the sums of w over the kernel's outer rows and columns) takes it out."""

    def __init__(self, weight: np.ndarray, chunk: int = 8192):
        s = np.where(weight >= 0, 1, -1).astype(np.int32)  # (Cout, Cin, 3, 3)
        self.cout, self.k = s.shape[0], s[0].size
        self.w = pack_rows(s.reshape(self.cout, -1) > 0)  # (Cout, words)
        self.rows, self.cols, self.taps = s.sum(axis=(1, 3)), s.sum(axis=(1, 2)), s.sum(axis=1)
        self.chunk = chunk

    def _padding(self, ho: int, wo: int) -> np.ndarray:
        """(ho, wo, Cout): sum of w over the taps that fall in the padding at each output position."""
        c = np.zeros((ho, wo, self.cout), dtype=np.int32)
        c[0] += self.rows[:, 0]
        c[-1] += self.rows[:, 2]
        c[:, 0] += self.cols[:, 0]
        c[:, -1] += self.cols[:, 2]
        for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # a corner tap is in one row and one column
            c[i, j] -= self.taps[:, 2 * (i != 0), 2 * (j != 0)]
        return c

    def __call__(self, x: np.ndarray) -> np.ndarray:
        p, (n, ho, wo) = _patches(x >= 0)  # the padding reads False, i.e. -1
        a = pack_rows(p)
        differ = np.zeros((len(a), self.cout), dtype=np.int32)
        for i in range(0, len(a), self.chunk):
            block = differ[i: i + self.chunk]
            for word in range(a.shape[1]):  # XOR then popcount, one 64-bit word of every patch at a time
                block += np.bitwise_count(a[i: i + self.chunk, word, None] ^ self.w[None, :, word])
        out = (self.k - 2 * differ).reshape(n, ho, wo, self.cout) + self._padding(ho, wo)
        return out.transpose(0, 3, 1, 2).astype(np.float32)


def float_conv3(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    p, (n, ho, wo) = _patches(x.astype(np.float32))
    out = p @ weight.reshape(weight.shape[0], -1).T
    return out.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


def conv1x1(x: np.ndarray, weight: np.ndarray, groups: int) -> np.ndarray:
    n, c, h, w = x.shape
    cout = weight.shape[0]
    wg = weight.reshape(groups, cout // groups, c // groups)
    out = wg[None] @ x.reshape(n, groups, c // groups, h * w)
    return out.reshape(n, cout, h, w)


def bn(x: np.ndarray, fused: np.ndarray) -> np.ndarray:
    return x * fused[0][None, :, None, None] + fused[1][None, :, None, None]


def maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


class NumpyNet:
    """A base and a task state (decoded packed tensors) as numpy layers; `__call__` gives logits."""

    def __init__(self, base_tensors: dict, task_meta: dict, task_tensors: dict):
        arch, spec = task_meta["arch"], task_meta["spec"]
        if arch["name"] != "bnn_vgg_small":
            raise UserError(f"numpy runtime: arch '{arch['name']}' is not supported; allowed: bnn_vgg_small")
        t = {k: v.numpy() for k, v in base_tensors.items()}
        t.update({k[len("base."):]: v.numpy() for k, v in task_tensors.items()})  # the task's override the base's
        self.binary = arch["precision"] == "binary"
        self.kind, self.groups = spec["method"], spec["groups"]
        self.t = t
        self.convs = {i: BinaryConv(t[f"features.{i}.conv.weight"]) for i, kind in enumerate(VGG_SMALL)
                      if kind == "block" and self.binary}
        self.head = self._weight("head")

    def _weight(self, layer: str) -> np.ndarray:
        """A layer's float weight: k-bit levels times their per-output-channel scale, or the floats."""
        w = self.t[f"{layer}.weight"]
        s = self.t.get(f"{layer}.scale")
        return w if s is None else w * s.reshape((-1,) + (1,) * (w.ndim - 1))

    def _adapter(self, i: int, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        a = f"features.{i}.adapter"
        if f"{a}.bn" not in self.t:
            return h
        y = h if self.kind == "serial" else x
        j = 0
        while f"{a}.convs.{j}.weight" in self.t:
            y = conv1x1(y, self._weight(f"{a}.convs.{j}"), self.groups)
            j += 1
        return h + bn(y, self.t[f"{a}.bn"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        for i, kind in enumerate(VGG_SMALL):
            if kind == "stem":
                x = float_conv3(x, self.t[f"features.{i}.weight"])
            elif kind == "bn":
                x = bn(x, self.t[f"features.{i}"])
            elif kind == "pool":
                x = maxpool2(x)
            else:
                h = self.convs[i](x) if self.binary else \
                    float_conv3(np.maximum(x, 0), self.t[f"features.{i}.conv.weight"])
                x = self._adapter(i, x, bn(h, self.t[f"features.{i}.bn"]))
        f = x.mean(axis=(2, 3), dtype=np.float32)
        return f @ self.head.T + self.t["head.bias"]


def load_numpy_net(task_path: Path, base_path: Path | None = None) -> NumpyNet:
    """A task state's `.bnnpack` on its packed base (the pipeline's own unless given)."""
    state = read_task(task_path)
    base_path = Path(base_path) if base_path else default_base(state)
    base_meta, base_tensors = read_base(base_path)
    check_base(state, base_meta["base_sha256"], str(base_path))
    return NumpyNet(base_tensors, state.meta, state.tensors)
