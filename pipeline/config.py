"""The one config loader: params.yaml -> one typed, validated `Params` object.

Every mistake raises `ParamsError` naming the key and what is allowed; the CLI prints it as one
line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.errors import UserError


# Fixed output locations (DESIGN.md's output contract); dvc.yaml names the same paths.
PREPARED = Path("data/prepared")
BASE_DIR = Path("models/base")
METRICS_DIR = Path("reports/metrics")


class ParamsError(UserError):
    pass


def _range(**bounds: float) -> dict:
    return {"range": bounds}


# ---------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Split:
    train: float = field(default=0.7, metadata=_range(gt=0, lt=1))
    val: float = field(default=0.15, metadata=_range(gt=0, lt=1))
    test: float = field(default=0.15, metadata=_range(gt=0, lt=1))

    def check(self, path: str) -> None:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ParamsError(f"{path}: train + val + test = {total:g}; they must sum to 1")


@dataclass(frozen=True)
class DatasetSpec:
    """A prepared dataset: a registry source, an optional class subset (relabelled 0..k-1)."""

    source: str
    classes: Optional[list[int]] = None
    path: Optional[str] = None  # for `npz`: the user's file
    max_per_class: Optional[int] = field(default=None, metadata=_range(ge=1))

    def check(self, path: str) -> None:
        from pipeline.data.registry import SOURCES

        if self.source not in SOURCES:
            raise ParamsError(f"{path}.source: unknown dataset '{self.source}'; allowed: {', '.join(SOURCES)}")
        info = SOURCES[self.source]
        if self.source == "npz" and not self.path:
            raise ParamsError(f"{path}.path: required for source 'npz' (a .npz file with arrays x and y)")
        if self.classes is not None:
            if not self.classes:
                raise ParamsError(f"{path}.classes: empty list; give at least 2 classes or omit it")
            if len(set(self.classes)) != len(self.classes):
                raise ParamsError(f"{path}.classes: {self.classes} repeats a class")
            if info.num_classes is not None:
                bad = [c for c in self.classes if not 0 <= c < info.num_classes]
                if bad:
                    raise ParamsError(
                        f"{path}.classes: {bad} not in dataset '{self.source}'; "
                        f"allowed: 0..{info.num_classes - 1}"
                    )


@dataclass(frozen=True)
class Data:
    raw_dir: str = "data/raw"  # downloaded / user-supplied files; outputs go to data/prepared
    input_size: int = field(default=28, metadata=_range(ge=8, le=512))
    channels: int = field(default=1, metadata=_range(ge=1, le=3))
    seed: int = 0
    split: Split = Split()
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)

    def check(self, path: str) -> None:
        for name in self.datasets:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ParamsError(f"{path}.datasets: name '{name}' must use letters, digits, '_' or '-'")


@dataclass(frozen=True)
class Model:
    name: str = "bnn_vgg_small"
    width: int = field(default=32, metadata=_range(ge=1, le=1024))

    def check(self, path: str) -> None:
        from pipeline.nn.backbones import BACKBONES

        if self.name not in BACKBONES:
            raise ParamsError(f"{path}.name: unknown model '{self.name}'; allowed: {', '.join(BACKBONES)}")


@dataclass(frozen=True)
class Optim:
    """How one stage trains: shared shape for pretrain and transfer sections. The training rule
    of every arm: up to `max_epochs`, early stopping on val accuracy after `patience` epochs
    without a gain above `min_delta`, the best-val weights restored."""

    max_epochs: int = field(default=10, metadata=_range(ge=1))
    patience: int = field(default=5, metadata=_range(ge=1))
    min_delta: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    batch_size: int = field(default=128, metadata=_range(ge=1))
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = field(default=0.005, metadata=_range(gt=0, le=10))
    weight_decay: float = field(default=0.0, metadata=_range(ge=0))
    scheduler: Literal["none", "cosine", "step"] = "cosine"
    step_size: int = field(default=5, metadata=_range(ge=1))  # epochs, for `step`
    gamma: float = field(default=0.1, metadata=_range(gt=0, le=1))  # decay, for `step`


@dataclass(frozen=True)
class Trainer:
    """Hardware and reproducibility, passed to Lightning as is."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "cpu"
    devices: Union[int, str, list[int]] = 1  # a count, "auto", -1 (all) or a list of device indices
    strategy: str = "auto"  # auto, ddp, ddp_spawn, fsdp, deepspeed, ... (Lightning's names)
    precision: Literal["32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true"] = "32-true"
    deterministic: bool = True
    num_workers: int = field(default=0, metadata=_range(ge=0))
    progress_bar: bool = True
    threads: int = field(default=0, metadata=_range(ge=0))  # torch threads; 0 = torch's default

    def check(self, path: str) -> None:
        d = self.devices
        if isinstance(d, str) and d != "auto" or isinstance(d, int) and d < 1 and d != -1 \
                or isinstance(d, list) and (not d or min(d) < 0):
            raise ParamsError(f"{path}.devices: {d!r} is not allowed; allowed: a count >= 1, -1 (all), 'auto' or a list of device indices")
        if not self.strategy.replace("_", "").isalnum():
            raise ParamsError(f"{path}.strategy: {self.strategy!r} is not a strategy name; allowed: auto, ddp, ddp_spawn, fsdp, ...")


@dataclass(frozen=True)
class Pretrain:
    source: str = "mnist_0to4"
    precisions: list[Literal["binary", "fp32"]] = field(default_factory=lambda: ["binary", "fp32"])
    optim: Optim = Optim()


@dataclass(frozen=True)
class Prune:
    amount: float = field(default=0.0, metadata=_range(ge=0, lt=1))  # target sparsity of adapter weights
    rounds: int = field(default=3, metadata=_range(ge=1))
    epochs: int = field(default=1, metadata=_range(ge=1))  # finetune epochs after each round
    scope: Literal["layer", "global"] = "layer"


@dataclass(frozen=True)
class Adapter:
    """The task-specific state of the `serial` and `parallel` methods."""

    groups: int = field(default=1, metadata=_range(ge=1))
    reduction: int = field(default=1, metadata=_range(ge=1))
    placement: Union[str, list[int]] = "all"  # all | last:K | list of block indices
    task_bn: bool = False
    bits: Literal[32, 8, 4, 2, 1, "ternary"] = 32  # k-bit levels + a scale per output channel
    bn_bits: Literal[32, 16] = 32  # adapter and task BN (fused) and adapter weight scales
    learn_scale: bool = False      # LSQ step sizes instead of the closed-form scales
    prune: Prune = Prune()

    def check(self, path: str) -> None:
        p = self.placement
        if isinstance(p, str) and p != "all" and not (p.startswith("last:") and p[5:].isdigit() and int(p[5:]) >= 1):
            raise ParamsError(f"{path}.placement: '{p}' is not allowed; allowed: all, last:K (K >= 1), or a list of block indices")
        if isinstance(p, list) and (not p or min(p) < 0 or len(set(p)) != len(p)):
            raise ParamsError(f"{path}.placement: {p}: give distinct block indices >= 0")


@dataclass(frozen=True)
class Transfer:
    targets: list[str] = field(default_factory=lambda: ["mnist_5to9", "uci_digits"])
    # Two lists, two DVC stages: a change to the adapter section reruns only the adapter methods.
    baselines: list[Literal["full", "head"]] = field(default_factory=lambda: ["full", "head"])
    adapters: list[Literal["serial", "parallel"]] = field(default_factory=lambda: ["serial", "parallel"])
    # Every method that trains a new head (head, serial, parallel) stores it at these bits.
    head_bits: Literal[32, 8, 4, 2] = 8
    # Each method's lr is chosen on val from this grid (first seed); the other seeds repeat it.
    lr_grid: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03])
    optim: Optim = Optim()

    def check(self, path: str) -> None:
        for key in ("targets", "baselines", "adapters", "lr_grid"):
            values = getattr(self, key)
            if len(set(values)) != len(values):  # DVC would define the same stage twice
                raise ParamsError(f"{path}.{key}: {values} repeats an entry; list each once")
        if not self.lr_grid or any(not 0 < lr <= 10 for lr in self.lr_grid):
            raise ParamsError(f"{path}.lr_grid: {self.lr_grid}; allowed: a non-empty list of learning rates in (0, 10]")


@dataclass(frozen=True)
class FloatRange:
    low: float = field(default=1e-3, metadata=_range(gt=0))
    high: float = field(default=1e-2, metadata=_range(gt=0))
    log: bool = True

    def check(self, path: str) -> None:
        if self.low > self.high:
            raise ParamsError(f"{path}: low {self.low:g} > high {self.high:g}; allowed: low <= high")


@dataclass(frozen=True)
class SearchSpace:
    """Choices per knob; a one-element list fixes it."""

    method: list[Literal["serial", "parallel"]] = field(default_factory=lambda: ["serial", "parallel"])
    groups: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    reduction: list[int] = field(default_factory=lambda: [1])
    placement: list[str] = field(default_factory=lambda: ["all", "last:4", "last:3", "last:2", "last:1"])
    bits: list[Literal[32, 8, 4, 2, 1, "ternary"]] = field(default_factory=lambda: [32, 8, 4, 2, 1])
    prune_amount: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.9])
    task_bn: list[bool] = field(default_factory=lambda: [False, True])
    head_bits: list[Literal[32, 8, 4, 2]] = field(default_factory=lambda: [8])  # near the small end the head is most of a task
    lr: FloatRange = FloatRange(low=0.003, high=0.03, log=True)

    def check(self, path: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and not value:
                raise ParamsError(f"{path}.{f.name}: empty list; give at least one choice")
        for i, g in enumerate(self.groups + self.reduction):
            if g < 1:
                raise ParamsError(f"{path}: groups/reduction {g} out of range; allowed: integers >= 1")
        for a in self.prune_amount:
            if not 0 <= a < 1:
                raise ParamsError(f"{path}.prune_amount: {a} out of range; allowed: 0 <= amount < 1")
        for p in self.placement:
            Adapter(placement=p).check(f"{path}.placement")


@dataclass(frozen=True)
class Sweep:
    n_trials: int = field(default=12, metadata=_range(ge=1))
    workers: int = field(default=1, metadata=_range(ge=1, le=64))
    storage: Optional[str] = None  # None: journal file reports/sweep/<target>/optuna.journal
    study_name: Optional[str] = None  # None: derived from a hash of the settings (reruns resume)
    sampler: Literal["tpe", "nsga2"] = "tpe"
    n_startup_trials: int = field(default=10, metadata=_range(ge=0))  # random trials before the sampler's model
    anchors: bool = True  # first trials: the smallest and largest configuration of each adapter type
    seed: int = 0
    # Trials follow the training rule with transfer.optim, capped at these epochs; the Pareto
    # points are then retrained on every seed at transfer.optim's own budget.
    max_epochs: int = field(default=10, metadata=_range(ge=1))
    stale_after_s: int = field(default=60, metadata=_range(ge=1))  # RUNNING trial without heartbeat
    max_failures_in_a_row: int = field(default=10, metadata=_range(ge=1))  # then stop: something is wrong beyond one trial
    reference_accuracy: float = field(default=0.0, metadata=_range(ge=0, le=1))  # hypervolume reference point
    reference_memory_pct: float = field(default=100.0, metadata=_range(gt=0))
    space: SearchSpace = SearchSpace()


@dataclass(frozen=True)
class Report:
    band_low: float = field(default=0.07, metadata=_range(ge=0, le=1))  # the prior study's band
    band_high: float = field(default=0.12, metadata=_range(gt=0, le=10))
    max_ratio: float = field(default=0.12, metadata=_range(gt=0))  # "small adapter" budget for question 1
    n_tasks: int = field(default=10, metadata=_range(ge=1, le=1000))
    dpi: int = field(default=110, metadata=_range(ge=30, le=600))

    def check(self, path: str) -> None:
        if self.band_low >= self.band_high:
            raise ParamsError(f"{path}: band_low {self.band_low} >= band_high {self.band_high}; allowed: band_low < band_high")


@dataclass(frozen=True)
class Tracking:
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db
    experiment: str = "bnn-adapters"

    SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")

    def check(self, path: str) -> None:
        if self.uri is not None:
            scheme = self.uri.split("://", 1)[0].split("+", 1)[0] if "://" in self.uri else ""
            if scheme not in self.SCHEMES:
                raise ParamsError(f"{path}.uri: {self.uri!r} is not a tracking URI; allowed: null or a URI with scheme "
                                  f"{', '.join(self.SCHEMES)}")
        if not self.experiment.strip():
            raise ParamsError(f"{path}.experiment: empty; give an experiment name")


@dataclass(frozen=True)
class Params:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: Data = Data()
    model: Model = Model()
    trainer: Trainer = Trainer()
    pretrain: Pretrain = Pretrain()
    adapter: Adapter = Adapter()
    transfer: Transfer = Transfer()
    sweep: Sweep = Sweep()
    report: Report = Report()
    tracking: Tracking = Tracking()

    def check(self, path: str) -> None:
        if not self.seeds:
            raise ParamsError("seeds: empty list; give at least one seed")
        for i, seed in enumerate(self.seeds):
            if not 0 <= seed < 2**32:
                raise ParamsError(f"seeds[{i}]: {seed} is out of range; allowed: 0 <= seed < 2**32")
        if len(set(self.seeds)) != len(self.seeds):
            raise ParamsError(f"seeds: {self.seeds} repeats a seed")
        if self.pretrain.source not in self.data.datasets:
            raise ParamsError(
                f"pretrain.source: '{self.pretrain.source}' is not a dataset in data.datasets; "
                f"allowed: {', '.join(self.data.datasets) or '(none defined)'}"
            )
        for i, t in enumerate(self.transfer.targets):
            if t not in self.data.datasets:
                raise ParamsError(
                    f"transfer.targets[{i}]: '{t}' is not a dataset in data.datasets; "
                    f"allowed: {', '.join(self.data.datasets)}"
                )


# ---------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    wrong = ParamsError(f"{path}: {value!r} has the wrong type; allowed: {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ParamsError:
                continue
        raise wrong
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{path}: {value!r} is not allowed; allowed: {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if not math.isfinite(value):
            raise ParamsError(f"{path}: {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported params type {tp!r} at {path}")  # a bug in this file, not user input


def _check_range(value: Any, bounds: dict, path: str) -> None:
    ops = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
           "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}
    if value is None:
        return
    for key, bound in bounds.items():
        ok, sym = ops[key]
        if not ok(value, bound):
            allowed = " and ".join(f"{ops[k][1]} {b:g}" for k, b in bounds.items())
            raise ParamsError(f"{path}: {value!r} is out of range; allowed: {allowed}")


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "params"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected {_type_name(cls)}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ParamsError(f"{key}: unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{key}: missing; expected {_type_name(hints[name])}")
        if "range" in f.metadata and name in kwargs:
            _check_range(kwargs[name], f.metadata["range"], key)
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(where)
    if dataclasses.is_dataclass(obj):
        for name in fields:
            value = getattr(obj, name)
            if isinstance(value, dict):
                for k, v in value.items():
                    if hasattr(v, "check") and dataclasses.is_dataclass(v):
                        v.check(f"{path}.{name}.{k}" if path else f"{name}.{k}")
    return obj


def parse_params(raw: Any) -> Params:
    return _build(Params, raw, "")


def project_root(start: Optional[Path] = None) -> Path:
    """The folder holding params.yaml (the current one, or the nearest parent)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").exists():
            return folder
    return here


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    try:
        return parse_params(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def as_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a params dataclass to `a.b.c: value` (for MLflow params and model cards)."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else obj.items()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(as_flat_dict(v, key + "."))
        else:
            out[key] = v
    return out
