"""Running from the packed files alone (pipeline.runtime): every encoding rebuilt
into exactly the network that was measured, the numpy XNOR path giving its predictions, a bank
swapping task states into one resident base, and damaged or mismatched files refused in one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import backbone_with_bn_stats
from pipeline.errors import UserError
from pipeline.nn.adapter_io import save_adapter
from pipeline.nn.adapters import TaskSpec
from pipeline.nn.checkpoint import save_base
from pipeline.nn.export import TASK_META, export_packed, read_packed
from pipeline.nn.inference import logits
from pipeline.nn.memory import memory_report
from pipeline.runtime.bank import Bank
from pipeline.runtime.loader import compare, load_task_state, read_base, read_task
from pipeline.runtime.xnor import BinaryConv, NumpyNet, load_numpy_net, pack_rows
from test_adapters import _build
from test_quant import ARCH, EXPORT_CASES

FP32 = dataclasses.replace(ARCH, precision="fp32")
CASES = {**{k: (spec, prune) for k, (spec, prune, _) in EXPORT_CASES.items()},
         "full": (TaskSpec("full"), 0.0), "head-8bit": (TaskSpec("head", head_bits=8), 0.0)}


def _x(n=40, seed=3):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{precision: (backbone, path of its packed file)}, as pretrain writes them."""
    folder = tmp_path_factory.mktemp("bases")
    out = {}
    for arch in (ARCH, FP32):
        net = backbone_with_bn_stats(arch, 0, batch=8)
        path = folder / f"{arch.precision}.bnnpack"
        export_packed(net, path, {"arch": arch.to_dict(), "base_sha256": arch.precision * 8})
        out[arch.precision] = (net, path)
    return out


def _meta(net, precision: str, base_sha256: str) -> dict:
    """The task-state header the transfer stage writes (TASK_META)."""
    n = net.base.head.out_features
    meta = {"target": "t", "method": net.spec.method, "precision": precision, "seed": 0,
            "arch": net.base.arch.to_dict(), "spec": net.spec.to_dict(), "num_classes": n,
            "classes": list(range(n)), "base_sha256": base_sha256, "dataset_sha256": "d" * 64}
    assert set(meta) == set(TASK_META)
    return meta


def _task(bases, tmp_path, spec: TaskSpec, prune: float = 0.0, precision: str = "binary", seed: int = 5,
          num_classes: int = 3, name: str = "task"):
    """A finalized task state on the base, exported as the transfer stage does; (net, path)."""
    net = _build(bases[precision][0], spec, num_classes, seed, prune)
    meta = _meta(net, precision, precision * 8)
    path = tmp_path / f"{name}.bnnpack"
    export_packed(net, path, meta, include=net.is_task_module)
    return net, path


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_network_is_the_measured_one(bases, tmp_path, case):
    """Every encoding (sign, int1-8, ternary, float32/16, fused BN, sparse by mask and by indices):
    the network rebuilt from the two files computes bit-identical logits, and the numpy path
    (XNOR-popcount binary convs, float32 elsewhere) gives the same argmax on every image."""
    spec, prune = CASES[case]
    net, path = _task(bases, tmp_path, spec, prune)
    x = _x()
    want = logits(net, x)
    packed, state = load_task_state(path, bases["binary"][1])
    assert state.meta["spec"] == spec.to_dict()
    assert torch.equal(logits(packed, x), want)
    # its accounting too: the layers stored sparse come back pruned
    assert memory_report(packed, include=packed.is_task_module).bits == memory_report(net, include=net.is_task_module).bits
    got = load_numpy_net(path, bases["binary"][1])(x.numpy())
    c = compare(torch.from_numpy(got), want)
    assert c["mismatches"] == 0 and c["max_logit_diff"] < 1e-4 * float(want.abs().max()), c


def test_fp32_full_copy_runs_from_its_file(bases, tmp_path):
    net, path = _task(bases, tmp_path, TaskSpec("full"), precision="fp32")
    x = _x()
    packed, _ = load_task_state(path, bases["fp32"][1])
    assert torch.equal(logits(packed, x), logits(net, x))
    got = load_numpy_net(path, bases["fp32"][1])(x.numpy())
    assert np.array_equal(got.argmax(1), logits(net, x).argmax(1).numpy())


def test_one_loader_and_one_bank_for_both_formats(tmp_path):
    """A task state's adapter files and its packed file, each on the checkpoint base or the packed
    one, rebuild the same network (logits and accounting), and one bank swaps both kinds."""
    base = backbone_with_bn_stats(ARCH, 0, batch=8)
    pt = tmp_path / "model.pt"
    sha = save_base(base, pt)
    packed_base = tmp_path / "model.bnnpack"
    export_packed(base, packed_base, {"arch": ARCH.to_dict(), "base_sha256": sha})
    spec = TaskSpec("parallel", groups=2, reduction=2, task_bn=True, bits="ternary", head_bits=4, bn_bits=16)
    net = _build(base, spec, 3, 7, 0.4)
    config = save_adapter(net, tmp_path / "adapter", {"base_sha256": sha})
    export_packed(net, tmp_path / "adapter.bnnpack", _meta(net, "binary", sha), include=net.is_task_module)
    assert config["pruned_layers"]
    x = _x()
    want = logits(net, x)
    bits = memory_report(net, include=net.is_task_module).bits
    for state_file in ("adapter.safetensors", "adapter.bnnpack"):
        for base_file in (pt, packed_base):
            got, state = load_task_state(tmp_path / state_file, base_file)
            assert torch.equal(logits(got, x), want), (state_file, base_file)
            assert sorted(state.pruned_layers) == sorted(config["pruned_layers"])
            assert memory_report(got, include=got.is_task_module).bits == bits
    for base_file in (pt, packed_base):
        bank = Bank.open(base_file)
        bank.add("st", tmp_path / "adapter.safetensors")
        bank.add("pk", tmp_path / "adapter.bnnpack")
        for name in ("st", "pk", "st"):
            assert torch.equal(logits(bank.activate(name), x), want), (name, base_file)


def test_xnor_popcount_conv_equals_the_signed_product_by_hand():
    # one 1-channel 3x3 image, one all-(+1) kernel: each output is the number of in-image inputs
    # with x >= 0 minus those below it (the padding counts 0). Signs of x:
    #    +1 -1 +1
    #    -1 +1 +1      corner (0,0) sees +1 -1 -1 +1 = 0; edge (0,1) sees 4 of 6 non-negative = 2;
    #    +1 -1 -1      the centre sees 5 of 9 = 1
    x = np.array([[[[1.0, -2.0, 0.0], [-1.0, 3.0, 2.0], [0.5, -0.5, -3.0]]]], dtype=np.float32)
    conv = BinaryConv(np.ones((1, 1, 3, 3), dtype=np.float32))
    want = np.array([[0, 2, 2], [0, 1, 0], [0, 0, 0]], dtype=np.float32)
    assert np.array_equal(conv(x)[0, 0], want)
    # a kernel of -1s negates it
    assert np.array_equal(BinaryConv(-np.ones((1, 1, 3, 3), dtype=np.float32))(x)[0, 0], -want)
    # and a 70-input kernel spans two 64-bit words
    assert pack_rows(np.ones((2, 70), dtype=bool)).shape == (2, 2)


def test_bank_swaps_task_states_in_place(bases, tmp_path):
    specs = {"a": TaskSpec("serial", groups=2, placement="last:2", bits=4, head_bits=8),
             "b": TaskSpec("parallel", reduction=2, placement="all", bits=1, task_bn=True, bn_bits=16),
             "c": TaskSpec("bn", bn_bits=16), "d": TaskSpec("head", head_bits=4)}
    nets, paths = {}, {}
    for i, (name, spec) in enumerate(specs.items()):
        nets[name], paths[name] = _task(bases, tmp_path, spec, 0.3 if name == "a" else 0.0, seed=10 + i,
                                        num_classes=3 + i, name=name)
    x = _x(8)
    bank = Bank.open(bases["binary"][1])
    before = {k: v.clone() for k, v in bank.base.state_dict().items()}
    for name, path in paths.items():
        bank.add(name, path)
    for name in ["a", "b", "c", "d", "a", "c", "b", "d", "b", "a"]:
        with torch.no_grad():
            assert torch.equal(bank.activate(name)(x), logits(nets[name], x)), name
    bank.activate("d")  # head only: every block, BN and tensor of the base is its own again
    now = bank.base.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items() if not k.startswith("head."))
    assert all(b.adapter is None for b in bank.base.blocks)
    times = bank.swap_seconds(list(paths), swaps=200)
    assert len(times) == 200 and all(t >= 0 for t in times)
    sizes = bank.resident_bytes()
    assert bank.active == "d" and set(sizes) == {"base", *paths}
    # the base: every parameter and buffer once (a task's modules never counted with it)
    assert sizes["base"] == sum(t.numel() * t.element_size()
                                for t in list(bases["binary"][0].parameters()) + list(bases["binary"][0].buffers()))
    head_d = nets["d"].base.head
    assert sizes["d"] == sum(t.numel() * t.element_size() for t in list(head_d.parameters()) + list(head_d.buffers()))


def test_refusals_name_the_file_and_the_problem(bases, tmp_path):
    net, task = _task(bases, tmp_path, TaskSpec("serial", bits=4))
    base = bases["binary"][1]
    with pytest.raises(UserError, match="not a packed task state \\(a base"):
        read_task(base)
    with pytest.raises(UserError, match="not a packed base"):
        read_base(task)
    with pytest.raises(UserError, match="trained on base binaryb.*give the base it was trained on"):
        load_task_state(task, bases["fp32"][1])
    # a task state whose tensors do not fit what its header names
    meta, _ = read_packed(task)
    other = tmp_path / "other.bnnpack"
    export_packed(net, other, {**meta, "spec": {**meta["spec"], "placement": "last:1"}}, include=net.is_task_module)
    with pytest.raises(UserError, match="do not fit the network its header names"):
        load_task_state(other, base)
    bank = Bank.open(base)
    _, full = _task(bases, tmp_path, TaskSpec("full"), name="full")
    with pytest.raises(UserError, match="whole network; a bank shares the binary base"):
        bank.add("f", full)


def test_numpy_runtime_refuses_other_archs(bases, tmp_path):
    _, task = _task(bases, tmp_path, TaskSpec("head"))
    meta, tensors = read_packed(task)
    with pytest.raises(UserError, match="arch 'birealnet18' is not supported; allowed: bnn_vgg_small"):
        NumpyNet({}, {**meta, "arch": {**meta["arch"], "name": "birealnet18"}}, tensors)
