"""Memory accounting: hand-computed bit counts for small layers, pruned tensors, BN at 16 bits, the
breakdown by kind, the report's dict form and the `pipeline memory` command. (k-bit adapter and
head weights with their per-channel scales: test_quant.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from pipeline.cli import main
from pipeline.nn.binary import QuantConv2d, ste_sign
from pipeline.nn.memory import BREAKDOWN, breakdown, index_bits, memory_report, sparse_bits, storage_plan


# ------------------------------------------------------------------------------ single layers


def test_binary_conv_one_bit_per_weight():
    # 8 out * 4 in * 3 * 3 = 288 weights at 1 bit, no bias
    model = nn.Sequential(QuantConv2d(4, 8, 3, bias=False, kernel_quantizer=ste_sign))
    report = memory_report(model)
    assert report.bits == 288
    assert report.params == 288


def test_binary_conv_bias_stays_float():
    # 288 sign bits + 8 float32 biases
    model = nn.Sequential(QuantConv2d(4, 8, 3, bias=True, kernel_quantizer=ste_sign))
    assert memory_report(model).bits == 288 + 8 * 32


def test_binary_inputs_do_not_make_weights_binary():
    # Only the kernel quantizer decides weight storage: sign inputs with float weights -> 32 bits.
    model = nn.Sequential(QuantConv2d(4, 8, 3, bias=False, input_quantizer=ste_sign, kernel_quantizer=None))
    assert memory_report(model).bits == 288 * 32


def test_float_conv_with_bias():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, bias=True))
    assert memory_report(model).bits == (288 + 8) * 32 == 9_472


def test_batchnorm_two_floats_per_channel():
    model = nn.Sequential(nn.BatchNorm2d(8))
    report = memory_report(model)
    assert report.bits == 2 * 8 * 32 == 512
    assert report.params == 16  # running stats fold into scale and shift


def test_batchnorm_at_16_bits():
    # a BN stored at 16 bits (task BN with bn_bits 16): 2 * 8 values * 16 bits
    bn = nn.BatchNorm2d(8)
    bn.stored_bits = 16
    (entry,) = storage_plan(nn.Sequential(bn))
    assert (entry.encoding, entry.numel, entry.bits, entry.value_bits) == ("bn_fused", 16, 256, 16)


def test_linear_with_bias():
    model = nn.Sequential(nn.Linear(10, 3))
    assert memory_report(model).bits == (30 + 3) * 32 == 1_056


def _small_model(*extra: nn.Module) -> nn.Sequential:
    """sign conv 4->8 3x3 (288 bits), float conv with bias (9,472), BN(8) (512), dense 10->3 (1,056)."""
    return nn.Sequential(
        QuantConv2d(4, 8, 3, bias=False, kernel_quantizer=ste_sign),
        nn.Conv2d(4, 8, 3, bias=True),
        nn.BatchNorm2d(8),
        nn.Linear(10, 3),
        *extra,
    )


def test_small_model_total_is_sum_of_layers():
    model = _small_model()
    report = memory_report(model)
    expected_bits = 288 + 9_472 + 512 + 1_056
    assert report.bits == expected_bits == 11_328
    assert report.params == 288 + 296 + 16 + 33
    assert [layer.layer for layer in report.layers] == ["0", "1", "2", "3"]
    assert [layer.bits for layer in report.layers] == [288, 9_472, 512, 1_056]
    assert [layer.params for layer in report.layers] == [288, 296, 16, 33]


def test_include_picks_modules():
    model = nn.Sequential(nn.Linear(10, 3), nn.BatchNorm2d(8))
    report = memory_report(model, include=lambda name, m: isinstance(m, nn.BatchNorm2d))
    assert report.bits == 512


def test_report_to_dict():
    model = nn.Sequential(QuantConv2d(4, 8, 3, bias=False, kernel_quantizer=ste_sign), nn.BatchNorm2d(8))
    d = memory_report(model).to_dict()
    assert {"params", "bits", "bytes", "layers"} <= set(d)
    assert d["bits"] == 288 + 512
    assert d["params"] == 288 + 16
    assert d["bytes"] == d["bits"] / 8 == 100.0
    assert [layer["bits"] for layer in d["layers"]] == [288, 512]
    assert d["layers"][0]["bits_per_param"] == 1.0
    assert d["layers"][1]["bits_per_param"] == 32.0
    json.dumps(d)  # serialisable as is


# ----------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("numel,expected", [(2, 1), (3, 2), (4, 2), (64, 6), (65, 7), (100, 7), (288, 9), (1024, 10)])
def test_index_bits(numel, expected):
    # ceil(log2(numel)) bits address one of numel positions
    assert index_bits(numel) == expected


@pytest.mark.parametrize(
    "numel,nnz,value_bits,expected",
    [
        (100, 5, 32, 5 * 32 + 5 * 7),      # indices 35 bits < mask 100 bits
        (100, 60, 32, 60 * 32 + 100),      # mask 100 bits < indices 420 bits
        (64, 4, 1, 4 + 4 * 6),             # 64 positions: exactly 6 index bits
        (64, 20, 1, 20 + 64),              # 120 index bits > 64-bit mask
        (100, 0, 32, 0),                   # all pruned: nothing stored
    ],
)
def test_sparse_bits_by_hand(numel, nnz, value_bits, expected):
    assert sparse_bits(numel, nnz, value_bits) == expected


def _with_nonzeros(module: nn.Module, nnz: int) -> nn.Module:
    with torch.no_grad():
        w = module.weight
        flat = torch.zeros(w.numel())
        flat[:nnz] = torch.linspace(0.1, 0.9, nnz) if nnz else flat[:0]
        w.copy_(flat.view_as(w))
    module.pruned = True
    return module


def test_pruned_float_linear_few_nonzeros_uses_indices():
    # 10x10 weights, 5 non-zeros at 32 bits, 5 indices of ceil(log2 100) = 7 bits
    lin = _with_nonzeros(nn.Linear(10, 10, bias=False), 5)
    assert memory_report(nn.Sequential(lin)).bits == 5 * 32 + 5 * 7 == 195
    (entry,) = storage_plan(nn.Sequential(lin))
    assert entry.encoding == "sparse"
    assert entry.nnz == 5
    assert entry.numel == 100


def test_pruned_float_linear_many_nonzeros_uses_mask():
    # 60 non-zeros: 60 * 7 = 420 index bits > 100-bit mask
    lin = _with_nonzeros(nn.Linear(10, 10, bias=False), 60)
    assert memory_report(nn.Sequential(lin)).bits == 60 * 32 + 100 == 2_020


def test_pruned_linear_bias_stays_dense_float():
    lin = _with_nonzeros(nn.Linear(10, 10, bias=True), 5)
    assert memory_report(nn.Sequential(lin)).bits == 195 + 10 * 32


def test_pruned_binary_conv_both_regimes():
    # 4*2*3*3 = 72 weights, ceil(log2 72) = 7 index bits, 1 bit per value
    few = _with_nonzeros(QuantConv2d(2, 4, 3, bias=False, kernel_quantizer=ste_sign), 3)
    many = _with_nonzeros(QuantConv2d(2, 4, 3, bias=False, kernel_quantizer=ste_sign), 50)
    assert memory_report(nn.Sequential(few)).bits == 3 + 21 == 24
    assert memory_report(nn.Sequential(many)).bits == 50 + 72 == 122


def test_unpruned_module_with_zeros_is_dense():
    lin = _with_nonzeros(nn.Linear(10, 10, bias=False), 5)
    lin.pruned = False
    assert memory_report(nn.Sequential(lin)).bits == 100 * 32


def test_breakdown_by_kind():
    # sign conv 288 bits + float conv (288 + 8) * 32 = 9,472 bits: weights (9,760 bits = 1,220 bytes);
    # BN 2 * 8 * 32 = 512 bits (64 bytes); the dense layer named as the head: 1,056 bits (132 bytes);
    # a pruned float linear with 5 non-zeros: 5 * 32 value bits (20 bytes) + 5 * 7 index bits
    # (4.375 bytes of "masks")
    model = _small_model(_with_nonzeros(nn.Linear(10, 10, bias=False), 5))
    plan = storage_plan(model)
    got = breakdown(plan, head="3")
    assert tuple(got) == BREAKDOWN == ("weights", "scales", "bn", "head", "masks")
    assert got == {"weights": 1_220 + 20, "scales": 0.0, "bn": 64, "head": 132, "masks": 35 / 8}
    assert sum(got.values()) == memory_report(model).bytes == (11_328 + 195) / 8


# ----------------------------------------------------------------------------------------- CLI


def vgg_bits(w: int, cin: int, classes: int) -> int:
    stem = 3 * 3 * cin * w * 32
    binary = 9 * (w * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w + 4 * w * 4 * w)  # 1 bit each
    bn = 64 * (w + w + 2 * w + 2 * w + 4 * w + 4 * w)  # stem BN + 5 block BNs
    head = (4 * w * classes + classes) * 32
    return stem + binary + bn + head


def test_cli_memory_json_vgg(capsys):
    rc = main(["memory", "--model", "bnn_vgg_small", "--num-classes", "5", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    data = json.loads(captured.out)
    expected = vgg_bits(32, 1, 5)
    assert expected == 9_216 + 285_696 + 2_048 + 26_624 + 20_640 == 344_224
    assert data["bits"] == expected
    assert data["bytes"] == expected / 8
    assert sum(layer["bits"] for layer in data["layers"]) == expected


def test_cli_memory_json_fp32_and_width(capsys):
    rc = main(["memory", "--model", "bnn_vgg_small", "--num-classes", "3", "--width", "8",
               "--in-channels", "3", "--precision", "fp32", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    w = 8
    binary_weights = 9 * (w * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w + 4 * w * 4 * w)
    # fp32 twin: the same weights at 32 bits instead of 1
    assert data["bits"] == vgg_bits(w, 3, 3) + 31 * binary_weights


def test_cli_memory_table_output(capsys):
    rc = main(["memory", "--model", "bnn_vgg_small", "--num-classes", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "344,224 bits" in out
    assert "43,028 bytes" in out  # 344,224 / 8


def test_cli_memory_unknown_model(capsys):
    rc = main(["memory", "--model", "resnet9000", "--json"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error:")
    assert "resnet9000" in lines[0]


@pytest.mark.parametrize("flag", ["--num-classes", "--input-size", "--in-channels", "--width"])
def test_cli_memory_rejects_non_positive_sizes(capsys, flag):
    rc = main(["memory", "--model", "bnn_vgg_small", flag, "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert flag in err
