"""Adapters on a frozen base: identity at initialisation, grouped/strided 1x1 convs counted by hand,
placement and group refusals, a real short training that leaves the base untouched, k-bit codes,
magnitude pruning, adapter files (safetensors + json) and their refusals, the adapter bank and the
packed export of the task state. Expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import replace
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import backbone_with_bn_stats, tiny_params
from pipeline.config import Optim, parse_params
from pipeline.data.prepare import prepare_dataset
from pipeline.errors import UserError
from pipeline.nn.adapter_io import read_adapter, save_adapter
from pipeline.nn.adapters import ResidualAdapter, AdapterConv, TaskSpec, QuantLinear, TransferNet, resolve_placement
from pipeline.nn.backbones import Arch
from pipeline.nn.checkpoint import load_base, save_base
from pipeline.nn.export import export_packed, read_packed
from pipeline.nn.fusion import FUSED_EPS
from pipeline.nn.memory import memory_report, storage_plan
from pipeline.nn.pruning import prune_to, sparsity
from pipeline.runtime.bank import Bank
from pipeline.runtime.loader import attach, read_state
from pipeline.train.datamodule import PreparedData
from pipeline.train.fit import fit_and_evaluate


# width 4: stem 4 channels, blocks 4->4, 4->8, 8->8, 8->16, 16->16 (12 -> 6 -> 3 -> 1 pixels)
ARCH = Arch("bnn_vgg_small", "binary", 3, in_channels=1, input_size=12, width=4)


def _make_base(arch: Arch = ARCH, seed: int = 0):
    """A binary backbone whose BNs hold non-trivial affine parameters and running statistics."""
    net = backbone_with_bn_stats(arch, seed, batch=8)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # the statistics really moved away from (0, 1)
            assert m.running_mean.abs().sum() > 0 and not torch.equal(m.running_var, torch.ones_like(m.running_var))
    return net


@pytest.fixture(scope="module")
def vgg_base():
    return _make_base()


def _x(n=4, seed=7, size=12):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 1.5


def _adapters(net: TransferNet) -> list[ResidualAdapter]:
    return [m for m in net.modules() if isinstance(m, ResidualAdapter)]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("bits", [32, 4])
@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("placement, blocks", [("all", [0, 1, 2, 3, 4]), ("last:2", [3, 4]), ([0, 3], [0, 3])])
@pytest.mark.parametrize("method", ["serial", "parallel"])
def test_identity_at_init(vgg_base, method, placement, blocks, groups, reduction, bits):
    reference = copy.deepcopy(vgg_base).eval()
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec(method, groups, reduction, placement, bits=bits), 5)
    net.eval()
    assert [i for i, b in enumerate(net.base.blocks) if b.adapter is not None] == blocks
    assert len(_adapters(net)) == len(blocks)
    x = _x()
    with torch.no_grad():
        assert torch.equal(net.base.features(x), reference.features(x))
        # the adapters are in the forward path: once BN_a's gamma is non-zero the features move
        for a in _adapters(net):
            a.bn.weight.fill_(1.0)
        assert not torch.equal(net.base.features(x), reference.features(x))


@pytest.mark.parametrize("method", ["serial", "parallel"])
def test_identity_at_init_in_train_mode_keeps_base_bn_frozen(vgg_base, method):
    # train(): the base BNs stay in eval (running statistics), BN_a normalises with batch
    # statistics but its gamma is 0, so the features are still exactly the base's.
    reference = copy.deepcopy(vgg_base).eval()
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec(method, 2, 2, "all", bits=4), 5)
    net.train()
    base_bns = [m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and ".adapter" not in n]
    assert len(base_bns) == 6 and not any(m.training for m in base_bns)
    assert all(a.bn.training for a in _adapters(net))
    x = _x(8)
    with torch.no_grad():
        assert torch.equal(net.base.features(x), reference.features(x))


# ------------------------------------------------------------------------- parameter counts


def test_grouped_adapter_conv_weight_count():
    conv = AdapterConv(64, 64, groups=8, stride=1, bits=32)
    assert tuple(conv.weight.shape) == (64, 8, 1, 1)
    assert conv.weight.numel() == 64 * 64 // 8 == 512
    assert conv.bias is None


def test_serial_adapter_reduction_and_groups_count():
    a = ResidualAdapter("serial", 64, 64, stride=1, groups=4, reduction=2, bits=32)
    # 64 -> 32 and 32 -> 64, both in groups of 4, then BN_a over 64 channels (gamma, beta)
    assert [c.weight.numel() for c in a.convs] == [64 * 32 // 4, 32 * 64 // 4] == [512, 512]
    assert a.bn.weight.numel() + a.bn.bias.numel() == 2 * 64
    assert sum(p.numel() for p in a.parameters()) == 512 + 512 + 128 == 1152


def test_parallel_adapter_reads_block_input_channels():
    # parallel: the 1x1 conv sees the block input (32 channels), output 64, reduction 2 -> mid 32
    a = ResidualAdapter("parallel", 32, 64, stride=2, groups=4, reduction=2, bits=32)
    assert [(c.in_channels, c.out_channels) for c in a.convs] == [(32, 32), (32, 64)]
    assert sum(p.numel() for p in a.parameters()) == 32 * 32 // 4 + 32 * 64 // 4 + 2 * 64 == 896


def test_memory_of_frozen_4bit_adapter_conv():
    conv = AdapterConv(64, 64, groups=8, stride=1, bits=4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    conv.make_pruning_permanent()
    conv.freeze_codes()
    assert bool(conv.frozen) and not conv.pruned
    assert conv.scale.shape == (64,) and bool((conv.scale > 0).all())  # one scale per output channel
    report = memory_report(conv)
    # 512 weights at 4 bits + 64 float32 scales
    assert report.bits == 512 * 4 + 64 * 32 == 4096
    assert report.params == 512 + 64


def test_memory_of_8bit_head():
    head = QuantLinear(16, 3, bits=8)
    # 48 weights at 8 bits + 3 float32 scales (one per class), 3 float32 biases
    assert memory_report(head).bits == 48 * 8 + 3 * 32 + 3 * 32 == 576


# --------------------------------------------------------------------- strides (Bi-Real Net)


@pytest.fixture(scope="module")
def bireal_base():
    return _make_base(Arch("birealnet18", "binary", 10, 1, 32, width=8))


@pytest.mark.parametrize("reduction", [1, 2])
def test_parallel_adapters_take_block_stride(bireal_base, reduction):
    net = TransferNet(copy.deepcopy(bireal_base), TaskSpec("parallel", reduction=reduction, placement="all"), 4)
    blocks = net.base.blocks
    assert len(blocks) == 16
    # the first conv of stages 2-4 has stride 2 (blocks 4, 8, 12)
    assert [i for i, b in enumerate(blocks) if b.conv.stride == (2, 2)] == [4, 8, 12]
    for b in blocks:
        convs = list(b.adapter.convs)
        assert len(convs) == (1 if reduction == 1 else 2)
        assert convs[0].stride == b.conv.stride          # the conv that reads x takes the stride
        assert all(c.stride == (1, 1) for c in convs[1:])
        assert convs[0].in_channels == b.conv.in_channels
    net.eval()
    with torch.no_grad():
        for a in _adapters(net):
            a.bn.weight.fill_(1.0)  # make the adapter branch contribute
        out = net(_x(2, size=32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_serial_adapters_have_stride_one(bireal_base):
    net = TransferNet(copy.deepcopy(bireal_base), TaskSpec("serial", reduction=2, placement="all"), 4)
    convs = net.adapter_convs()
    assert len(convs) == 32
    assert all(c.stride == (1, 1) for c in convs)
    net.eval()
    with torch.no_grad():
        for a in _adapters(net):
            a.bn.weight.fill_(1.0)
        out = net(_x(2, size=32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("method, groups, reduction, placement", [
    ("serial", 3, 1, "all"),        # 3 divides none of 4, 8, 16
    ("parallel", 8, 1, [1]),        # block 1 is 4 -> 8: 8 divides the output, not the input 4
    ("serial", 8, 4, [3]),          # block 3 is 8 -> 16: reduction 4 gives a width of 4
    ("serial", 1, 3, [4]),          # 16 channels are not divisible by reduction 3
    ("parallel", 4, 2, "all"),      # block 0 (4 -> 4) with reduction 2 has a width of 2
])
def test_groups_that_do_not_divide_are_user_errors(vgg_base, method, groups, reduction, placement):
    with pytest.raises(UserError) as exc:
        TransferNet(copy.deepcopy(vgg_base), TaskSpec(method, groups, reduction, placement), 3)
    assert f"groups={groups}" in _one_line(exc)


@pytest.mark.parametrize("method, groups, reduction, placement", [
    ("serial", 8, 1, [1]),          # serial on 4 -> 8 only has widths 8
    ("serial", 8, 1, [3]),          # 8 -> 16: widths 16
    ("parallel", 2, 2, "all"),      # widths (in, out, mid) 4,4,2 / 4,8,4 / 8,8,4 / 8,16,8 / 16,16,8
])
def test_groups_that_divide_are_accepted(vgg_base, method, groups, reduction, placement):
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec(method, groups, reduction, placement), 3)
    assert net.adapter_convs() and all(c.groups == groups for c in net.adapter_convs())


@pytest.mark.parametrize("placement", ["last:0", "last:99", "first:2", "last:", "last:-1", "some", [7], [-1], [],
                                       [1, 1]])
def test_bad_placements_are_user_errors(vgg_base, placement):
    with pytest.raises(UserError) as exc:
        TransferNet(copy.deepcopy(vgg_base), TaskSpec("serial", placement=placement), 3)
    assert "placement" in _one_line(exc)
    with pytest.raises(UserError):
        resolve_placement(placement, 5)


def test_resolve_placement_forms():
    assert resolve_placement("all", 5) == [0, 1, 2, 3, 4]
    assert resolve_placement("last:1", 5) == [4]
    assert resolve_placement("last:5", 5) == [0, 1, 2, 3, 4]
    assert resolve_placement([3, 0], 5) == [0, 3]


# ------------------------------------------------------------------- frozen means frozen (fit)


def _toy_images(seed=0):
    """3 classes x 30 images 12x12 uint8: class 0 a bright horizontal bar, class 1 a vertical
    bar, class 2 the main diagonal; the bar position jitters by one pixel, plus noise."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(3):
        for i in range(30):
            img = rng.integers(0, 60, size=(12, 12))
            o = int(rng.integers(-1, 2))
            if c == 0:
                img[5 + o: 7 + o, :] += 180
            elif c == 1:
                img[:, 5 + o: 7 + o] += 180
            else:
                idx = np.arange(12)
                img[idx, np.clip(idx + o, 0, 11)] += 180
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.array(ys, dtype=np.int64)


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    x, y = _toy_images()
    npz = root / "toy.npz"
    np.savez(npz, x=x, y=y)
    params = parse_params(tiny_params(**{
        "data.raw_dir": str(root / "raw"), "data.input_size": 12, "data.datasets": {"toy": {"source": "npz", "path": str(npz)}},
        "pretrain.source": "toy", "transfer.targets": ["toy"],
        "trainer.deterministic": True, "trainer.threads": 0,
        "tracking.uri": "sqlite:///" + str(root / "mlflow.db"),
    }))
    out = root / "prepared" / "toy"
    manifest = prepare_dataset("toy", params.data.datasets["toy"], params.data, out)
    assert manifest["num_classes"] == 3
    return params, out, root


@pytest.fixture(scope="module")
def saved_base(vgg_base, tmp_path_factory):
    """(path, sha256) of the base saved as a model file."""
    path = tmp_path_factory.mktemp("base") / "model.pt"
    return path, save_base(vgg_base, path)


def _budget(**changes) -> Optim:
    """The toy runs' budget: transfer.optim of params.yaml at batch 16, no lr schedule, `changes`."""
    return replace(parse_params(tiny_params()).transfer.optim, batch_size=16, scheduler="none", **changes)


def _fit(toy_task, net: TransferNet, name: str, monkeypatch, optim: Optional[Optim] = None, lr: float = 0.02,
         ckpt_dir=None):
    params, folder, root = toy_task
    monkeypatch.chdir(root)  # anything Lightning or MLflow writes relative to the cwd stays here
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    threads = torch.get_num_threads()
    try:
        data = PreparedData(folder, batch_size=16)
        optim = optim or _budget(max_epochs=2)
        return fit_and_evaluate(params, net, data, optim, lr=lr, run_name=name, tags={"stage": "test"},
                                flat_params={"name": name}, ckpt_dir=ckpt_dir)
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        torch.set_num_threads(threads)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _base_hashes(backbone: nn.Module) -> dict[str, str]:
    """sha256 of every base tensor (weights and BN running stats), head and adapters excluded."""
    return {k: _sha(v) for k, v in backbone.state_dict().items()
            if not k.startswith("head.") and ".adapter." not in k}


def _task_values(net: TransferNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()
            if k.startswith("base.head.") or ".adapter." in k}


def _loaded_base(saved_base, mode: str):
    """The base as `load_base` hands it over (nn.Module default: train mode), or put in eval."""
    base = load_base(saved_base[0])
    assert base.training and all(m.training for m in base.modules())
    return base if mode == "train" else base.eval()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_serial_adapters_leaves_base_bit_identical(saved_base, toy_task, monkeypatch, mode):
    base = _loaded_base(saved_base, mode)
    before = _base_hashes(base)
    # stem conv + 5 block convs, and 6 BNs with weight, bias, running_mean, running_var, count
    assert len(before) == 6 + 6 * 5
    net = TransferNet(base, TaskSpec("serial", task_bn=False), 3)
    task_before = _task_values(net)
    result = _fit(toy_task, net, f"frozen-{mode}", monkeypatch)
    assert 0.0 <= result.val_acc <= 1.0
    after = _base_hashes(net.base)
    assert [k for k in before if after[k] != before[k]] == []
    # training really ran: the task state moved (so the comparison above is not vacuous)
    task_after = _task_values(net)
    changed = [k for k in task_before if not torch.equal(task_before[k], task_after[k])]
    assert "base.head.weight" in changed
    assert any(k.endswith("adapter.bn.weight") for k in changed)
    assert any(k.endswith("adapter.bn.running_mean") for k in changed)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_with_task_bn_updates_base_bn_stats_only(saved_base, toy_task, monkeypatch, mode):
    base = _loaded_base(saved_base, mode)
    before = _base_hashes(base)
    net = TransferNet(base, TaskSpec("serial", task_bn=True), 3)
    _fit(toy_task, net, f"task-bn-{mode}", monkeypatch)
    after = _base_hashes(net.base)
    conv_keys = [k for k in before if k == "features.0.weight" or k.endswith("conv.weight")]
    assert len(conv_keys) == 6
    assert [k for k in conv_keys if after[k] != before[k]] == []
    bn_stat_keys = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert len(bn_stat_keys) == 12
    assert [k for k in bn_stat_keys if after[k] == before[k]] == []


def test_training_bn_method_moves_only_base_bn_and_head(saved_base, toy_task, monkeypatch):
    base = _loaded_base(saved_base, "eval")
    before = _base_hashes(base)
    net = TransferNet(base, TaskSpec("bn"), 3)
    assert not net.adapter_convs()
    head_before = net.base.head.weight.detach().clone()
    _fit(toy_task, net, "bn-method", monkeypatch)
    after = _base_hashes(net.base)
    conv_keys = [k for k in before if k == "features.0.weight" or k.endswith("conv.weight")]
    assert len(conv_keys) == 6
    assert [k for k in conv_keys if after[k] != before[k]] == []
    # every BN of the base trains: gamma, beta and running statistics of all 6 moved
    bn_keys = [k for k in before if k.endswith(("bn.weight", "bn.bias", "running_mean", "running_var"))
               or k in ("features.1.weight", "features.1.bias")]
    assert len(bn_keys) == 6 * 4
    assert [k for k in bn_keys if after[k] == before[k]] == []
    assert not torch.equal(net.base.head.weight.detach(), head_before)


# --------------------------------------------------------------------------------- k-bit codes


def test_quantize_by_hand():
    # One output channel w = 0.9, -0.3, 0.5, 0.1 (more cases, per-channel scales: test_quant.py).
    conv = AdapterConv(4, 1, groups=1, stride=1, bits=2)
    w = torch.tensor([0.9, -0.3, 0.5, 0.1]).view(1, 4, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(w)
    # 2 bits, mid-rise levels -3, -1, 1, 3: s = 0.9 / 3 = 0.3, w / s = 3, -1, 1.67, 0.33 -> nearest
    # odd 3, -1, 1, 1 -> values 0.9, -0.3, 0.3, 0.3
    assert torch.allclose(conv.effective_weight().detach().view(-1), torch.tensor([0.9, -0.3, 0.3, 0.3]),
                          rtol=1e-6, atol=0)
    conv4 = AdapterConv(4, 1, groups=1, stride=1, bits=4)
    with torch.no_grad():
        conv4.weight.copy_(w)
    # 4 bits, levels -15 .. 15 odd: s = 0.9 / 15 = 0.06 -> w / s = 15, -5, 8.33, 1.67 -> 15, -5, 9, 1
    conv4.freeze_codes()
    assert conv4.weight.view(-1).tolist() == [15.0, -5.0, 9.0, 1.0]
    assert conv4.scale.shape == (1,) and torch.isclose(conv4.scale, torch.tensor([0.9 / 15])).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8, "ternary"])
def test_quantised_weights_take_few_values_and_finalize_to_integer_codes(vgg_base, bits):
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("serial", reduction=2, bits=bits, head_bits=bits), 3)
    g = torch.Generator().manual_seed(7)
    layers = net.adapter_convs() + [net.base.head]
    assert isinstance(net.base.head, QuantLinear) and net.base.head.bits == bits
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    qmax = 1 if bits == "ternary" else 2 ** bits - 1
    allowed = {-1.0, 0.0, 1.0} if bits == "ternary" else set(range(-qmax, qmax + 1, 2))  # odd levels
    before = {}
    for m in layers:
        eff = m.effective_weight().detach().flatten(1)
        w = m.weight.detach().flatten(1)
        for c in range(eff.shape[0]):  # per output channel: at most 2**k values, multiples of its step
            assert torch.unique(eff[c]).numel() <= (3 if bits == "ternary" else 2 ** bits)
            if bits == "ternary":  # step 1.4 mean|w|
                step = 1.4 * w[c].abs().mean()
            elif bits == 1:        # step mean|w|
                step = w[c].abs().mean()
            else:                  # step max|w| / (2**k - 1): the outer level is max|w|
                step = w[c].abs().max() / qmax
            k = eff[c] / step
            assert torch.allclose(k, k.round(), atol=1e-4)
            assert set(k.round().tolist()) <= allowed
            if bits not in (1, "ternary"):
                assert k.abs().max().round() == qmax
        before[id(m)] = m.effective_weight().detach()
    net.finalize()
    for m in layers:
        w = m.weight.detach()
        assert bool(m.frozen) and torch.equal(w, w.round())
        assert set(w.unique().tolist()) <= allowed
        assert m.scale.shape == (w.shape[0],) and bool((m.scale > 0).all())
        assert torch.equal(m.effective_weight().detach(), before[id(m)])  # finalising keeps the function


# ------------------------------------------------------------------------------------ pruning


def _conv_with(values: torch.Tensor, cin: int, cout: int, groups: int = 1, bits: int = 32) -> AdapterConv:
    conv = AdapterConv(cin, cout, groups=groups, stride=1, bits=bits)
    assert conv.weight.numel() == values.numel()
    with torch.no_grad():
        conv.weight.copy_(values.view_as(conv.weight))
    return conv


def _signed_perm(values: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = values[torch.randperm(values.numel(), generator=g)]
    signs = torch.where(torch.rand(v.numel(), generator=g) < 0.5, -1.0, 1.0)
    return v * signs


def test_layer_pruning_exact_counts_and_smallest_magnitudes():
    # magnitudes 1..n in random order and sign: the masked ones must be exactly those <= k
    a = _conv_with(_signed_perm(torch.arange(1, 101, dtype=torch.float32), 0), 10, 10)           # n = 100
    b = _conv_with(_signed_perm(torch.arange(1, 129, dtype=torch.float32), 1), 16, 8)            # n = 128
    c = _conv_with(_signed_perm(torch.arange(1, 33, dtype=torch.float32), 2), 8, 8, groups=2)    # n = 32
    prune_to([a, b, c], 0.3, "layer")
    # round(0.3 * 100) = 30, round(0.3 * 128) = round(38.4) = 38, round(0.3 * 32) = round(9.6) = 10
    for conv, k in ((a, 30), (b, 38), (c, 10)):
        assert int((conv.mask == 0).sum()) == k
        assert torch.equal(conv.mask == 0, conv.weight.abs() <= k)


def test_global_pruning_removes_globally_smallest():
    # A: magnitudes 1, 2, ..., 100; B: 50.5, 51.5, ..., 177.5. 0.3 * 228 = 68.4 -> 68 zeros:
    # 1..50 (A), then 50.5 .. 59 alternating B, A: A loses 1..59 (59), B loses 50.5..58.5 (9).
    a = _conv_with(_signed_perm(torch.arange(1, 101, dtype=torch.float32), 3), 10, 10)
    b = _conv_with(_signed_perm(torch.arange(128, dtype=torch.float32) + 50.5, 4), 16, 8)
    prune_to([a, b], 0.3, "global")
    assert int((a.mask == 0).sum()) == 59
    assert int((b.mask == 0).sum()) == 9
    assert torch.equal(a.mask == 0, a.weight.abs() <= 59)
    assert torch.equal(b.mask == 0, b.weight.abs() <= 58.5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_only_grow(scope):
    g = torch.Generator().manual_seed(5)
    a = _conv_with(torch.randn(100, generator=g), 10, 10)
    b = _conv_with(torch.randn(100, generator=g), 10, 10)
    prune_to([a, b], 0.1, scope)
    first = [(c.mask == 0).clone() for c in (a, b)]
    # round(0.1 * 100) = 10 per layer; round(0.1 * 200) = 20 overall
    assert sum(int(m.sum()) for m in first) == 20
    if scope == "layer":
        assert [int(m.sum()) for m in first] == [10, 10]
    # training moves the latent values of masked weights: make them the largest of all
    with torch.no_grad():
        for c in (a, b):
            c.weight[c.mask == 0] = 1000.0
    prune_to([a, b], 0.3, scope)
    for c, m in zip((a, b), first):
        assert torch.all(c.mask[m] == 0)  # still masked
    assert sum(int((c.mask == 0).sum()) for c in (a, b)) == 60
    if scope == "layer":
        assert [int((c.mask == 0).sum()) for c in (a, b)] == [30, 30]


@pytest.mark.parametrize("amount, zeros, bits", [
    (0.3, 77, 179 * 32 + 256),   # round(76.8) = 77; 179 non-zeros; mask (256) < indices (179 * 8)
    (0.9, 230, 26 * 32 + 208),   # round(230.4) = 230; 26 non-zeros; indices 26 * 8 = 208 < 256
])
def test_memory_of_pruned_32bit_conv(amount, zeros, bits):
    conv = _conv_with(torch.randn(256, generator=torch.Generator().manual_seed(9)), 16, 16)  # n = 256
    prune_to([conv], amount)
    conv.make_pruning_permanent()
    assert conv.pruned
    assert int((conv.weight == 0).sum()) == zeros
    assert memory_report(conv).bits == bits
    assert sparsity([conv]) == zeros / 256


# ------------------------------------------------------------------------------ adapter files


def _randomise(net: TransferNet, seed: int) -> None:
    """Random adapter weights, head and task BN values (BN_a's gamma included, so adapters act)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in net.named_modules():
            if not net.is_task_module(name, m):
                continue
            if isinstance(m, (AdapterConv, QuantLinear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (), generator=g)))




@pytest.fixture(scope="module")
def base_sha(saved_base):
    return saved_base[1]


def _build(vgg_base, spec: TaskSpec, num_classes: int, seed: int, prune: float = 0.0) -> TransferNet:
    net = TransferNet(copy.deepcopy(vgg_base), spec, num_classes)
    _randomise(net, seed)
    if prune:
        prune_to(net.adapter_convs(), prune, "layer")
    net.finalize()
    net.eval()
    return net


CASES = {
    "serial-4bit-pruned": (TaskSpec("serial", groups=2, reduction=2, placement="last:3", bits=4), 0.4),
    "parallel-32bit": (TaskSpec("parallel", groups=2, placement="all", bits=32), 0.0),
    "head-only": (TaskSpec("head"), 0.0),
    "head-only-8bit": (TaskSpec("head", head_bits=8), 0.0),
    "serial-1bit": (TaskSpec("serial", groups=2, bits=1, head_bits=2), 0.0),
    "parallel-ternary-pruned": (TaskSpec("parallel", groups=2, reduction=2, bits="ternary", head_bits="ternary"),
                                0.4),
    "serial-learned-scale-pruned": (TaskSpec("serial", bits=2, learn_scale=True), 0.3),
    "serial-bn16-task-bn": (TaskSpec("serial", placement="last:2", bits=4, task_bn=True, bn_bits=16,
                                        learn_scale=True), 0.0),
    "bn-method-bn16": (TaskSpec("bn", bn_bits=16, head_bits=8), 0.0),
    "bn-method": (TaskSpec("bn"), 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_safetensors_round_trip_is_bit_exact(vgg_base, base_sha, tmp_path, case):
    spec, prune = CASES[case]
    net = _build(vgg_base, spec, 4, seed=11, prune=prune)
    if prune:
        assert all(c.pruned for c in net.adapter_convs())
    x = _x(6)
    with torch.no_grad():
        expected = net(x)
    config = save_adapter(net, tmp_path / "adapter", {"base_sha256": base_sha})
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "adapter.json").exists()

    stored = load_file(str(tmp_path / "adapter.safetensors"))
    assert not any(k.endswith(".mask") for k in stored)
    quant = {n: m for n, m in net.named_modules() if isinstance(m, (AdapterConv, QuantLinear))}
    for name, m in quant.items():
        # k-bit weights as their integer levels (8 bits reach +-255: int16), float weights as floats
        assert stored[f"{name}.weight"].dtype == (torch.int16 if m.bits != 32 else torch.float32)
        assert torch.equal(stored[f"{name}.weight"].float(), m.weight.detach())
        if m.bits != 32:
            assert bool(stored[f"{name}.frozen"]) and torch.equal(stored[f"{name}.scale"], m.scale.detach())
            assert stored[f"{name}.scale"].shape == (m.weight.shape[0],)
    assert config["format"] == "bnn-adapter/2"
    # 3 blocks x 2 convs; 5 x 1; 5 x 1; 5 x 2; 5 x 1; 2 x 1
    n_adapter = {"serial-4bit-pruned": 6, "parallel-32bit": 5, "serial-1bit": 5, "parallel-ternary-pruned": 10,
                 "serial-learned-scale-pruned": 5, "serial-bn16-task-bn": 2}.get(case, 0)
    assert len(net.adapter_convs()) == n_adapter
    # task BN (task_bn, or the `bn` method) travels with the adapter: the base's 6 BNs
    task_bn = {k.rsplit(".", 1)[0] for k in stored if k.startswith("base.features.") and ".adapter." not in k}
    assert len(task_bn) == (6 if spec.task_bn or spec.method == "bn" else 0)
    assert sorted(config["pruned_layers"]) == sorted(n for n, m in quant.items() if isinstance(m, AdapterConv)
                                                     and prune)

    cfg, _ = read_adapter(tmp_path / "adapter.safetensors")
    assert cfg == json.loads((tmp_path / "adapter.json").read_text())
    loaded = attach(copy.deepcopy(vgg_base), base_sha, read_state(tmp_path / "adapter.safetensors"))
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for a, b in zip(net.adapter_convs(), loaded.adapter_convs()):
        assert torch.equal(a.effective_weight(), b.effective_weight())
        assert isinstance(b.scale, nn.Parameter) == (spec.learn_scale and a.bits != 32)
    for (na, a), (nb, b) in zip(net.named_modules(), loaded.named_modules()):
        if isinstance(a, nn.BatchNorm2d):  # a float16 task BN was fused (eps 0) and loads that way
            assert na == nb and a.eps == b.eps and a.stored_bits == b.stored_bits, na
    # the loaded net accounts memory the way the saved one did
    assert memory_report(loaded, include=loaded.is_task_module).bits == memory_report(net, include=net.is_task_module).bits


# ------------------------------------------------------------------------------ file refusals


@pytest.fixture
def adapter_file(vgg_base, base_sha, tmp_path):
    net = _build(vgg_base, TaskSpec("serial", bits=4, placement="last:2"), 3, seed=3)
    save_adapter(net, tmp_path / "ad", {"base_sha256": base_sha})
    return tmp_path / "ad"


def test_attach_refuses_other_base(vgg_base, base_sha, adapter_file):
    other = hashlib.sha256(b"another base").hexdigest()
    with pytest.raises(UserError) as exc:
        attach(copy.deepcopy(vgg_base), other, read_state(adapter_file))
    msg = _one_line(exc)
    assert base_sha[:12] in msg and other[:12] in msg


def test_read_refuses_truncated_safetensors(adapter_file):
    st = adapter_file.with_suffix(".safetensors")
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as exc:
        read_adapter(st)
    assert "sha256" in _one_line(exc)


@pytest.mark.parametrize("content", [b'{"hello": 1}', b"[1, 2, 3]", b"not json at all", b'{"format": "other/1"}',
                                     b"\xff\xfe\x00\x81 binary"])
def test_read_refuses_non_adapter_json(adapter_file, content):
    js = adapter_file.with_suffix(".json")
    js.write_bytes(content)
    with pytest.raises(UserError) as exc:
        read_adapter(js)
    assert "not an adapter config" in _one_line(exc)


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.json", "missing"])
def test_read_refuses_missing_file(tmp_path, name):
    with pytest.raises(UserError) as exc:
        read_adapter(tmp_path / name)
    assert "not found" in _one_line(exc)


def test_read_refuses_missing_json_next_to_safetensors(adapter_file):
    adapter_file.with_suffix(".json").unlink()
    with pytest.raises(UserError) as exc:
        read_adapter(adapter_file.with_suffix(".safetensors"))
    assert "ad.json" in _one_line(exc)


# --------------------------------------------------------------------------------------- bank


def test_bank_swaps_without_residue(vgg_base, base_sha, tmp_path):
    a = _build(vgg_base, TaskSpec("serial", groups=2, placement="last:2", bits=4), 3, seed=21, prune=0.3)
    b = _build(vgg_base, TaskSpec("parallel", reduction=2, placement=[0, 3], task_bn=True, head_bits=8), 5,
               seed=22)
    save_adapter(a, tmp_path / "a", {"base_sha256": base_sha})
    save_adapter(b, tmp_path / "b", {"base_sha256": base_sha})
    state_a, state_b = read_state(tmp_path / "a"), read_state(tmp_path / "b")
    # b carries the base's BN tensors (task BN); a does not
    assert any(k.startswith("base.features.1.") for k in state_b.tensors)
    assert not any(k.startswith("base.features.1.") for k in state_a.tensors)

    x = _x(5)
    with torch.no_grad():
        want_a = attach(copy.deepcopy(vgg_base), base_sha, state_a)(x)
        want_b = attach(copy.deepcopy(vgg_base), base_sha, state_b)(x)
    assert want_a.shape == (5, 3) and want_b.shape == (5, 5)

    shared = copy.deepcopy(vgg_base)
    bank = Bank(shared, base_sha)  # holds the base fused, as every finalized network runs it
    untouched = copy.deepcopy(shared.state_dict())
    bank.add("a", state_a)
    bank.add("b", tmp_path / "b")  # or from its file
    with torch.no_grad():
        got_a1 = bank.activate("a")(x)
        assert bank.active == "a"
        got_b = bank.activate("b")(x)
        assert bank.active == "b"
        got_a2 = bank.activate("a")(x)
    assert torch.equal(got_a1, want_a)
    assert torch.equal(got_b, want_b)
    assert torch.equal(got_a2, want_a)
    # and the base's own tensors are back to the originals once `a` (no task BN) is active
    now = shared.state_dict()
    for k, v in untouched.items():
        if not k.startswith("head."):
            assert torch.equal(now[k], v), k


# ------------------------------------------------------------------------------ packed export


def test_packed_export_of_task_state(vgg_base, tmp_path):
    net = _build(vgg_base, TaskSpec("serial", groups=2, reduction=2, placement="all", bits=4), 3, seed=31,
                 prune=0.3)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, AdapterConv)}
    assert len(convs) == 10 and all(m.pruned for m in convs.values())
    plan = storage_plan(net, include=net.is_task_module)
    sizes = export_packed(net, tmp_path / "task.bnnpack", {}, include=net.is_task_module)
    # 10 adapter convs and their 10 per-channel scales, 5 adapter BNs, head weight and bias
    assert sizes["tensors"] == 10 + 10 + 5 + 2
    # every tensor padded to whole bytes; a sparse one in two parts (mask, then the kept values)
    by_hand = sum(-(-e.where_bits // 8) + -(-(e.bits - e.where_bits) // 8) for e in plan)
    assert sizes["payload_bytes"] == by_hand
    assert sizes["accounted_bytes"] == sum(e.bits for e in plan) / 8
    _, tensors = read_packed(tmp_path / "task.bnnpack")
    for name, m in convs.items():
        # the levels (integers, 0 where pruned) and one scale per output channel, as frozen
        assert torch.equal(tensors[f"{name}.weight"], m.weight.detach()), name
        assert torch.equal(tensors[f"{name}.weight"] == 0, m.mask == 0), name
        assert torch.equal(tensors[f"{name}.scale"], m.scale), name
        scale = tensors[f"{name}.scale"].view(-1, 1, 1, 1)
        assert torch.equal(tensors[f"{name}.weight"] * scale, m.effective_weight().detach()), name
    assert torch.equal(tensors["base.head.weight"], net.base.head.weight.detach())
    assert torch.equal(tensors["base.head.bias"], net.base.head.bias.detach())


def test_bank_swaps_float16_task_bn_without_residue(vgg_base, base_sha, tmp_path):
    # `bn` with bn_bits 16 rewrites the base's BNs as float16-rounded scale/shift; the next
    # adapter (no task BN) must see the base's own fused (float32) BN again.
    a = _build(vgg_base, TaskSpec("bn", bn_bits=16), 3, seed=41)
    b = _build(vgg_base, TaskSpec("serial", bits=1, placement="last:2"), 4, seed=42)
    assert all(m.eps == FUSED_EPS for m in a.modules() if isinstance(m, nn.BatchNorm2d))
    save_adapter(a, tmp_path / "a", {"base_sha256": base_sha})
    save_adapter(b, tmp_path / "b", {"base_sha256": base_sha})
    x = _x(5)
    with torch.no_grad():
        want_a, want_b = a(x), b(x)
    shared = copy.deepcopy(vgg_base)
    base_eps = lambda: [m.eps for n, m in shared.features.named_modules()
                        if isinstance(m, nn.BatchNorm2d) and "adapter" not in n.split(".")]
    assert base_eps() == [1e-5] * 6
    bank = Bank(shared, base_sha)
    untouched = copy.deepcopy(shared.state_dict())
    eps = base_eps()
    assert eps == [FUSED_EPS] * 6
    state_a = read_state(tmp_path / "a")
    fp16 = {k: v for k, v in state_a.tensors.items() if k.endswith(".weight") and k.startswith("base.features.1.")}
    assert fp16 and not torch.equal(fp16["base.features.1.weight"], untouched["features.1.weight"])
    bank.add("a", state_a)
    bank.add("b", tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(bank.activate("a")(x), want_a)
        assert torch.equal(bank.activate("b")(x), want_b)
        now = shared.state_dict()
        assert base_eps() == eps
        assert all(torch.equal(now[k], v) for k, v in untouched.items() if not k.startswith("head."))
        assert torch.equal(bank.activate("a")(x), want_a)


def test_last_checkpoint_is_the_last_epoch_not_the_best(toy_task, vgg_base, monkeypatch, tmp_path):
    """A killed run resumes from last.ckpt, so it must hold the last epoch. Lightning writes
    last.ckpt only when it also saves a top-k checkpoint: with one callback, a run whose val
    accuracy stopped improving after epoch 0 left last.ckpt at epoch 0 and redid the rest."""
    net = TransferNet(copy.deepcopy(vgg_base), TaskSpec("head"), 3)
    flat = _budget(max_epochs=3, patience=3)  # with lr 1e-9 val accuracy never improves
    _fit(toy_task, net, "last-ckpt", monkeypatch, optim=flat, lr=1e-9, ckpt_dir=tmp_path / "ckpt")
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (0, 2)
    assert sorted(f.name for f in (tmp_path / "ckpt").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]


# ------------------------------------------------------------------------- shared frozen prefix


class _Data:
    """The two attributes of PreparedData that the shared-prefix path reads."""

    def __init__(self, x: torch.Tensor, sha: str):
        self.manifest, self.splits = {"sha256": {"test": sha}}, {"test": (x, torch.zeros(len(x), dtype=torch.long))}


@pytest.mark.parametrize("method, placement", [("parallel", "last:2"), ("serial", "last:1"), ("head", "all")])
def test_prefix_shared_prediction_is_the_whole_networks(vgg_base, method, placement):
    """Fitted.predict (frozen prefix computed once per process, the rest per run) gives exactly the
    predictions of the finalised network run whole, in the same batches; a second run on the same
    base reuses the prefix, another base (other prefix weights) does not."""
    from pipeline.nn.inference import BATCH, predict
    from pipeline.train import transfer

    x = _x(n=2 * BATCH + 37, seed=3)  # three batches, the last one partial
    fitted = []
    for seed, base in ((0, vgg_base), (1, vgg_base), (2, _make_base(seed=5))):
        torch.manual_seed(seed)
        net = TransferNet(copy.deepcopy(base), TaskSpec(method, 2, 1, placement, bits=4, head_bits=8), 5)
        k = net.frozen_prefix()
        assert 0 < k < len(net.base.features) or method == "head"
        with torch.no_grad():  # trained-looking adapters and head, so predictions vary between images
            for n, p in net.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.5)
        net.finalize()
        net.eval()
        f = transfer.Fitted(None, net, None, _Data(x, "split-sha"), 0.0, "", {}, k)
        whole = predict(net, x)
        assert len(set(whole.tolist())) > 1
        assert torch.equal(f.predict("test"), whole)
        assert net.start == 0  # left as found: the packed file's network runs whole
        fitted.append((k, transfer._PREFIX["test"][1]))
    (k0, a), (_, b), (_, c) = fitted
    assert b is a and c is not a  # same base: features reused; another base: recomputed
    assert torch.equal(a, torch.cat([vgg_base_features(vgg_base, x[i: i + BATCH], k0) for i in range(0, len(x), BATCH)]))


def vgg_base_features(base, x, k):
    """The frozen prefix of the finalised base, run here without the cache (an independent path)."""
    net = TransferNet(copy.deepcopy(base), TaskSpec("head", head_bits=8), 5)
    net.finalize()
    with torch.no_grad():
        return net.eval().base.features[:k](x)
