"""params.yaml validation: every bad value is a ParamsError naming its key; the CLI prints it as one
line and exits 2. Each bad case starts from the project's own params.yaml and changes one thing."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, ParamsError, load_params, parse_params
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
PIPELINE_BIN = ROOT / ".venv" / "bin" / "pipeline"
PYTHON_BIN = ROOT / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(PARAMS.read_text())


DROP = object()  # _set(path, DROP): leave the key out


def _set(path: str, value):
    def mutate(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        if value is DROP:
            del d[last]
        else:
            d[last] = value

    return mutate


# (id, mutation, key the message must name)
BAD_CASES = [
    ("unknown-top-level-key", _set("epochs", 3), "epochs"),
    ("unknown-nested-key", _set("pretrain.optim.foo", 1), "pretrain.optim.foo"),
    ("wrong-type", _set("pretrain.optim.max_epochs", "ten"), "pretrain.optim.max_epochs"),
    ("negative-lr", _set("pretrain.optim.lr", -0.01), "pretrain.optim.lr"),
    ("zero-lr", _set("pretrain.optim.lr", 0), "pretrain.optim.lr"),
    ("split-not-one", _set("data.split", {"train": 0.7, "val": 0.2, "test": 0.2}), "data.split"),
    ("pretrain-source-undefined", _set("pretrain.source", "cifar_all"), "pretrain.source"),
    ("transfer-target-undefined", _set("transfer.targets", ["fashion_5to9", "svhn_all"]), "transfer.targets[1]"),
    ("transfer-optim-has-no-lr", _set("transfer.optim.lr", 0.01), "transfer.optim.lr"),
    ("empty-seeds", _set("seeds", []), "seeds"),
    ("bool-for-int", _set("pretrain.optim.batch_size", True), "pretrain.optim.batch_size"),
    ("bool-in-int-list", _set("seeds", [0, False]), "seeds[1]"),
    ("float-for-int", _set("pretrain.optim.max_epochs", 2.5), "pretrain.optim.max_epochs"),
    ("literal-not-allowed", _set("pretrain.optim.optimizer", "rmsprop"), "pretrain.optim.optimizer"),
    ("literal-in-list", _set("pretrain.precisions", ["binary", "int8"]), "pretrain.precisions[1]"),
    ("int-out-of-range", _set("data.input_size", 4), "data.input_size"),
    ("section-not-mapping", _set("trainer", 5), "trainer"),
    ("nan-lr", _set("pretrain.optim.lr", float("nan")), "pretrain.optim.lr"),
    ("max-per-class-zero", _set("data.datasets.fashion_0to4.max_per_class", 0), "data.datasets.fashion_0to4.max_per_class"),
    ("repeated-class", _set("data.datasets.fashion_0to4.classes", [1, 1]), "data.datasets.fashion_0to4.classes"),
    ("npz-without-path", _set("data.datasets.fashion_0to4", {"source": "npz"}), "data.datasets.fashion_0to4.path"),
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
    proc = subprocess.run([str(PIPELINE_BIN), "--params", str(bad), "prepare", "fashion_0to4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "pretrain.optim.lr" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "data").exists()  # nothing prepared



# ------------------------------------------------------------------ params.yaml: the one source


# (key left out of params.yaml, what the line says is expected)
MISSING_CASES = [
    ("seeds", "a list of an integer"),
    ("model", "a mapping with keys name, width"),
    ("data.split.val", "an integer or a number"),  # a count per class or a fraction
    ("data.datasets.fashion_0to4.source", "a string"),
    ("adapter.prune.rounds", "an integer"),
    ("pretrain.optim.lr", "a number"),
    ("transfer.optim.max_epochs", "an integer"),
    ("sweep.storage", "a string or null"),
    ("sweep.space.lr.log", "true/false"),
    ("tracking.experiment", "a string"),
]


@pytest.mark.parametrize("key,expected", MISSING_CASES, ids=[c[0] for c in MISSING_CASES])
def test_a_key_missing_from_params_is_one_line_naming_it(base, key, expected):
    raw = copy.deepcopy(base)
    _set(key, DROP)(raw)
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    assert str(exc.value) == f"{key}: missing; expected {expected}"


def _walk(cls, raw: dict, where: str = ""):
    """(dotted key, field, raw value or MISSING) for every field of cls and its sections."""
    for f in dataclasses.fields(cls):
        key = f"{where}{f.name}"
        value = raw.get(f.name, dataclasses.MISSING) if isinstance(raw, dict) else dataclasses.MISSING
        yield key, f, value
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, value if isinstance(value, dict) else {}, key + ".")
        elif typing.get_origin(tp) is dict and isinstance(value, dict):
            item = typing.get_args(tp)[1]
            for name, sub in value.items():
                yield from _walk(item, sub, f"{key}.{name}.")


def test_params_yaml_is_the_only_source_of_values(base):
    """A field params.yaml writes has no default of its own (no second value that could
    disagree); the only defaults are the optional keys of one dataset entry and the two `step`
    scheduler settings that params.yaml (cosine) leaves out."""
    has_default = lambda f: (f.default is not dataclasses.MISSING  # noqa: E731
                             or f.default_factory is not dataclasses.MISSING)
    fields = list(_walk(Params, base))
    per_entry = lambda k: k.startswith("data.datasets.")  # noqa: E731  (optional per dataset)
    written = [k for k, f, v in fields if v is not dataclasses.MISSING and has_default(f) and not per_entry(k)]
    assert not written, f"defaults for keys params.yaml holds: {written}"
    optional = {k if not per_entry(k) else "data.datasets.*." + k.rsplit(".", 1)[1] for k, f, v in fields if has_default(f)}
    assert optional == {"data.datasets.*.classes", "data.datasets.*.path", "data.datasets.*.max_per_class",
                        "data.datasets.*.split",
                        "pretrain.optim.step_size", "pretrain.optim.gamma",
                        "transfer.optim.step_size", "transfer.optim.gamma"}


def test_transfer_optim_has_no_lr_and_pretrain_optim_has_one(base):
    params = parse_params(base)
    assert not hasattr(params.transfer.optim, "lr")
    assert params.pretrain.optim.lr == base["pretrain"]["optim"]["lr"]
    raw = copy.deepcopy(base)
    raw["transfer"]["optim"]["lr"] = 0.01
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    msg = str(exc.value)
    assert msg.startswith("transfer.optim.lr: unknown key; allowed keys here: max_epochs, patience"), msg
    assert "lr" not in msg.split("allowed keys here: ")[1].split(", ")


def test_dataset_lookup_names_the_command_and_the_allowed_names(base):
    params = parse_params(base)
    assert params.dataset("uci_digits", "sweep") == params.data.datasets["uci_digits"]
    with pytest.raises(ParamsError) as exc:
        params.dataset("svhn_all", "transfer")
    assert str(exc.value) == ("transfer: unknown target 'svhn_all'; "
                              "allowed (data.datasets): fashion_0to4, fashion_5to9, mnist, uci_digits")
    with pytest.raises(ParamsError, match=r"^prepare: unknown dataset 'x'; allowed \(data.datasets\): fashion_0to4"):
        params.dataset("x", "prepare", "dataset")


def test_names_of_the_layers_above_are_not_checked_here(base):
    """Dataset sources and model names belong to pipeline.data.registry and pipeline.nn.backbones
    (tests/test_data.py, tests/test_backbones.py check them there): the loader takes any string."""
    raw = copy.deepcopy(base)
    raw["data"]["datasets"]["fashion_0to4"] = {"source": "imagenet22k", "classes": [0, 1, 12]}
    raw["model"]["name"] = "resnet50"
    params = parse_params(raw)
    assert (params.data.datasets["fashion_0to4"].source, params.model.name) == ("imagenet22k", "resnet50")


def test_config_imports_nothing_of_the_pipeline_but_its_errors():
    code = "import sys, pipeline.config; print(sorted(m for m in sys.modules if m.startswith('pipeline')))"
    out = subprocess.run([str(PYTHON_BIN), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "['pipeline', 'pipeline.config', 'pipeline.errors']"
