"""params.yaml validation: every bad value is a ParamsError naming its key; the CLI prints it as one
line and exits 2. Each bad case starts from the project's own params.yaml and changes one thing."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, ParamsError, load_params
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
PIPELINE_BIN = ROOT / ".venv" / "bin" / "pipeline"


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def _set(path: str, value):
    def mutate(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        d[last] = value

    return mutate


def _class_12(d: dict) -> None:
    d["data"]["datasets"]["mnist_0to4"] = {"source": "mnist5k", "classes": [0, 1, 12]}


def _unknown_source(d: dict) -> None:
    d["data"]["datasets"]["mnist_0to4"]["source"] = "imagenet22k"


# (id, mutation, key the message must name)
BAD_CASES = [
    ("unknown-top-level-key", _set("epochs", 3), "epochs"),
    ("unknown-nested-key", _set("pretrain.optim.foo", 1), "pretrain.optim.foo"),
    ("wrong-type", _set("pretrain.optim.max_epochs", "ten"), "pretrain.optim.max_epochs"),
    ("negative-lr", _set("pretrain.optim.lr", -0.01), "pretrain.optim.lr"),
    ("zero-lr", _set("pretrain.optim.lr", 0), "pretrain.optim.lr"),
    ("split-not-one", _set("data.split", {"train": 0.7, "val": 0.2, "test": 0.2}), "data.split"),
    ("class-12-mnist5k", _class_12, "data.datasets.mnist_0to4.classes"),
    ("unknown-source", _unknown_source, "data.datasets.mnist_0to4.source"),
    ("unknown-model", _set("model.name", "resnet50"), "model.name"),
    ("pretrain-source-undefined", _set("pretrain.source", "cifar_all"), "pretrain.source"),
    ("empty-seeds", _set("seeds", []), "seeds"),
    ("bool-for-int", _set("pretrain.optim.batch_size", True), "pretrain.optim.batch_size"),
    ("bool-in-int-list", _set("seeds", [0, False]), "seeds[1]"),
    ("float-for-int", _set("pretrain.optim.max_epochs", 2.5), "pretrain.optim.max_epochs"),
    ("literal-not-allowed", _set("pretrain.optim.optimizer", "rmsprop"), "pretrain.optim.optimizer"),
    ("literal-in-list", _set("pretrain.precisions", ["binary", "int8"]), "pretrain.precisions[1]"),
    ("int-out-of-range", _set("data.input_size", 4), "data.input_size"),
    ("section-not-mapping", _set("trainer", 5), "trainer"),
    ("nan-lr", _set("pretrain.optim.lr", float("nan")), "pretrain.optim.lr"),
    ("max-per-class-zero", _set("data.datasets.mnist_0to4.max_per_class", 0), "data.datasets.mnist_0to4.max_per_class"),
    ("repeated-class", _set("data.datasets.mnist_0to4.classes", [1, 1]), "data.datasets.mnist_0to4.classes"),
    ("npz-without-path", _set("data.datasets.mnist_0to4", {"source": "npz"}), "data.datasets.mnist_0to4.path"),
]


@pytest.mark.parametrize("mutate,key", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_params_name_the_key(tmp_path, base, mutate, key):
    raw = copy.deepcopy(base)
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert f"{key}:" in msg, msg
    assert "\n" not in msg
    assert isinstance(exc.value, UserError) and exc.value.exit_code == 2


def test_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seeds: [0\nmodel:\n  name: bnn_vgg_small\n")
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "YAML" in msg
    assert "\n" not in msg


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_unknown_key_lists_allowed_keys(tmp_path, base):
    raw = copy.deepcopy(base)
    raw["pretrain"]["optim"]["learning_rate"] = 0.1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    assert "lr" in str(exc.value) and "max_epochs" in str(exc.value)


def _assert_matches_raw(obj, raw, where=""):
    """Every value written in the YAML comes back in the typed object (floats may widen ints)."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            child = getattr(obj, k) if dataclasses.is_dataclass(obj) else obj[k]
            _assert_matches_raw(child, v, f"{where}.{k}")
    else:
        assert obj == raw, where
        if isinstance(raw, bool):
            assert isinstance(obj, bool), where


def test_default_params_load(base):
    params = load_params(PARAMS)
    assert isinstance(params, Params)
    _assert_matches_raw(params, base)
    assert params.pretrain.source in params.data.datasets
    assert isinstance(params.pretrain.optim.lr, float)


def test_cli_bad_params_one_line_exit_2(tmp_path, base):
    raw = copy.deepcopy(base)
    raw["pretrain"]["optim"]["lr"] = -1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([str(PIPELINE_BIN), "--params", str(bad), "prepare", "mnist_0to4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "pretrain.optim.lr" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "data").exists()  # nothing prepared

