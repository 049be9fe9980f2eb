"""The one config loader: params.yaml -> one typed, validated `Params` object.

Every mistake raises `ParamsError` naming the key and what is allowed; the CLI prints it as one
line and exits with code 2.

params.yaml is the only source of values: a field here has no default unless params.yaml does not
hold its key and leaving it out is a real choice (each such default says why), so a key missing
from params.yaml is one line naming it. Names that live in the layers above (dataset sources,
model names) are checked where they are used: `pipeline.data.registry` and
`pipeline.nn.backbones.build_backbone`; this module imports nothing of the pipeline but its errors.
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


class ParamsError(UserError):
    pass


def _range(**bounds: float) -> dict:
    return {"range": bounds}


# ---------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Split:
    """Fractions of the images (0 < f < 1, summing to 1), or counts per class: `train: 200,
    val: 100, test: all` (test `all`: every image left, or every official test image). A source
    with an official test split (pipeline.data.registry) keeps it as its test split, so it takes
    counts: train and val are drawn from its training images, test from its test images."""

    train: Union[int, float]
    val: Union[int, float]
    test: Union[int, float, Literal["all"]]

    @property
    def counts(self) -> bool:
        return isinstance(self.train, int)

    def check(self, path: str) -> None:
        sizes = {"train": self.train, "val": self.val, "test": self.test}
        allowed = "allowed: fractions 0 < f < 1 summing to 1, or counts per class >= 1 (test may be 'all')"
        for k, v in sizes.items():  # train's kind (fraction or count) sets the others'
            if self.counts and not (isinstance(v, int) and v >= 1 or k == "test" and v == "all"):
                raise ParamsError(f"{path}.{k}: {v!r} is not a count per class >= 1 like train's {self.train}; {allowed}")
            if not self.counts and not (isinstance(v, float) and 0 < v < 1):
                raise ParamsError(f"{path}.{k}: {v!r} is not a fraction 0 < f < 1 like train's {self.train}; {allowed}")
        total = sum(sizes.values()) if not self.counts else 1.0
        if abs(total - 1.0) > 1e-6:
            raise ParamsError(f"{path}: fractions sum to {total:g}; allowed: train, val and test that sum to 1")


@dataclass(frozen=True)
class DatasetSpec:
    """A prepared dataset: a registry source, an optional class subset (relabelled 0..k-1).
    `source` and the classes' range are checked against the registry when the dataset is
    prepared (`pipeline.data.registry.source_of`)."""

    source: str
    # Optional per dataset, so params.yaml writes them only where they apply:
    classes: Optional[list[int]] = None  # None: every class of the source
    path: Optional[str] = None  # only for `npz`: the user's file
    max_per_class: Optional[int] = field(default=None, metadata=_range(ge=1))  # None: no cap (training images)
    split: Optional[Split] = None  # None: data.split

    def check(self, path: str) -> None:
        if self.source == "npz" and not self.path:
            raise ParamsError(f"{path}.path: required for source 'npz' (a .npz file with arrays x and y)")
        if self.classes is not None:
            if not self.classes:
                raise ParamsError(f"{path}.classes: empty list; give at least 2 classes or omit it")
            if len(set(self.classes)) != len(self.classes):
                raise ParamsError(f"{path}.classes: {self.classes} repeats a class")


@dataclass(frozen=True)
class Data:
    raw_dir: str  # downloaded / user-supplied files; outputs go to data/prepared
    input_size: int = field(metadata=_range(ge=8, le=512))
    channels: int = field(metadata=_range(ge=1, le=3))
    seed: int
    split: Split
    datasets: dict[str, DatasetSpec]

    def check(self, path: str) -> None:
        for name in self.datasets:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ParamsError(f"{path}.datasets: name '{name}' must use letters, digits, '_' or '-'")


@dataclass(frozen=True)
class Model:
    name: str  # checked when the backbone is built (`pipeline.nn.backbones.build_backbone`)
    width: int = field(metadata=_range(ge=1, le=1024))


@dataclass(frozen=True)
class Optim:
    """How one stage trains, without the lr (`transfer.optim`: each arm's lr comes from
    transfer.lr_search). The training rule of every arm: up to `max_epochs`, early stopping on val
    accuracy after `patience` epochs without a gain above `min_delta`, the best-val weights
    restored."""

    max_epochs: int = field(metadata=_range(ge=1))
    patience: int = field(metadata=_range(ge=1))
    min_delta: float = field(metadata=_range(ge=0, lt=1))
    batch_size: int = field(metadata=_range(ge=1))
    optimizer: Literal["adam", "adamw", "sgd"]
    weight_decay: float = field(metadata=_range(ge=0))
    scheduler: Literal["none", "cosine", "step"]
    # Read only by scheduler `step`, so params.yaml (cosine) leaves them out:
    step_size: int = field(default=5, metadata=_range(ge=1))  # epochs between decays
    gamma: float = field(default=0.1, metadata=_range(gt=0, le=1))  # decay factor


@dataclass(frozen=True, kw_only=True)  # kw_only: a field without default after Optim's defaults
class PretrainOptim(Optim):
    """`pretrain.optim`: the budget and optimiser of Optim plus the one lr."""

    lr: float = field(metadata=_range(gt=0, le=10))


@dataclass(frozen=True)
class Trainer:
    """Hardware and reproducibility, passed to Lightning as is."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
    devices: Union[int, str, list[int]]  # a count, "auto", -1 (all) or a list of device indices
    strategy: str  # auto, ddp, ddp_spawn, fsdp, deepspeed, ... (Lightning's names)
    precision: Literal["32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
    deterministic: bool
    num_workers: int = field(metadata=_range(ge=0))
    progress_bar: bool
    threads: int = field(metadata=_range(ge=0))  # torch threads; 0 = torch's default

    def check(self, path: str) -> None:
        d = self.devices
        if isinstance(d, str) and d != "auto" or isinstance(d, int) and d < 1 and d != -1 \
                or isinstance(d, list) and (not d or min(d) < 0):
            raise ParamsError(f"{path}.devices: {d!r} is not allowed; allowed: a count >= 1, -1 (all), 'auto' or a list of device indices")
        if not self.strategy.replace("_", "").isalnum():
            raise ParamsError(f"{path}.strategy: {self.strategy!r} is not a strategy name; allowed: auto, ddp, ddp_spawn, fsdp, ...")


@dataclass(frozen=True)
class Pretrain:
    source: str
    precisions: list[Literal["binary", "fp32"]]
    optim: PretrainOptim


@dataclass(frozen=True)
class Prune:
    amount: float = field(metadata=_range(ge=0, lt=1))  # target sparsity of adapter weights
    rounds: int = field(metadata=_range(ge=1))
    epochs: int = field(metadata=_range(ge=1))  # finetune epochs after each round
    scope: Literal["layer", "global"]


@dataclass(frozen=True)
class Adapter:
    """The task-specific state of the `serial` and `parallel` methods."""

    groups: int = field(metadata=_range(ge=1))
    reduction: int = field(metadata=_range(ge=1))
    placement: Union[str, list[int]]  # all | last:K | list of block indices
    task_bn: bool
    bits: Literal[32, 8, 4, 2, 1, "ternary"]  # k-bit levels + a scale per output channel
    bn_bits: Literal[32, 16]  # adapter and task BN (fused) and adapter weight scales
    learn_scale: bool         # LSQ step sizes instead of the closed-form scales
    prune: Prune

    def check(self, path: str) -> None:
        check_placement(self.placement, f"{path}.placement")


def check_placement(p: Union[str, list[int]], key: str) -> None:
    """An adapter placement: `all`, `last:K` (K >= 1) or a list of distinct block indices."""
    if isinstance(p, str) and p != "all" and not (p.startswith("last:") and p[5:].isdigit() and int(p[5:]) >= 1):
        raise ParamsError(f"{key}: '{p}' is not allowed; allowed: all, last:K (K >= 1), or a list of block indices")
    if isinstance(p, list) and (not p or min(p) < 0 or len(set(p)) != len(p)):
        raise ParamsError(f"{key}: {p}: give distinct block indices >= 0")


@dataclass(frozen=True)
class LrSearch:
    """Each arm's lr, chosen on val with the selection seed: the `start` values (about `step`
    apart), then one `step` past whichever end wins, until the winner is interior or the next
    step would leave [low, high]. A run whose val accuracy trails the median of the finished runs
    at the same epoch stops after `prune_warmup` epochs (Optuna's MedianPruner)."""

    start: list[float]
    step: float = field(metadata=_range(gt=1))
    low: float = field(metadata=_range(gt=0, le=10))
    high: float = field(metadata=_range(gt=0, le=10))
    prune_warmup: int = field(metadata=_range(ge=0))

    @property
    def fixed(self) -> bool:
        """One start value with low = high = it: that lr, no search run."""
        return len(self.start) == 1 and self.low == self.high == self.start[0]

    def check(self, path: str) -> None:
        s = sorted(self.start)
        if self.fixed:
            return
        if len(s) < 2 or len(set(s)) != len(s):
            raise ParamsError(f"{path}.start: {self.start}; allowed: at least 2 different learning rates, or one "
                              f"with low = high = it (a fixed lr)")
        ratios = [b / a for a, b in zip(s, s[1:])]
        if any(not self.step / 1.25 <= r <= self.step * 1.25 for r in ratios):
            raise ParamsError(f"{path}.start: {self.start} is not log-spaced by step {self.step:g} (ratios "
                              f"{', '.join(f'{r:.3g}' for r in ratios)}); allowed: neighbours step apart, within 25%")
        if not self.low <= s[0] <= s[-1] <= self.high:
            raise ParamsError(f"{path}: start {self.start} leaves [low {self.low:g}, high {self.high:g}]; "
                              f"allowed: low <= every start value <= high")


@dataclass(frozen=True)
class Transfer:
    targets: list[str]
    # Two lists, two DVC stages: a change to the adapter section reruns only the adapter methods.
    baselines: list[Literal["full", "head"]]
    adapters: list[Literal["serial", "parallel"]]
    # Every method that trains a new head (head, serial, parallel) stores it at these bits.
    head_bits: Literal[32, 8, 4, 2]
    lr_search: LrSearch
    # The reported seeds of an arm run this many side by side, one thread each.
    workers: int = field(metadata=_range(ge=1, le=64))
    optim: Optim  # no lr: it comes from lr_search

    def check(self, path: str) -> None:
        for key in ("targets", "baselines", "adapters"):
            values = getattr(self, key)
            if len(set(values)) != len(values):  # DVC would define the same stage twice
                raise ParamsError(f"{path}.{key}: {values} repeats an entry; list each once")


@dataclass(frozen=True)
class FloatRange:
    low: float = field(metadata=_range(gt=0))
    high: float = field(metadata=_range(gt=0))
    log: bool

    def check(self, path: str) -> None:
        if self.low > self.high:
            raise ParamsError(f"{path}: low {self.low:g} > high {self.high:g}; allowed: low <= high")


@dataclass(frozen=True)
class SearchSpace:
    """Choices per knob; a one-element list fixes it."""

    method: list[Literal["serial", "parallel"]]
    groups: list[int]
    reduction: list[int]
    placement: list[str]
    bits: list[Literal[32, 8, 4, 2, 1, "ternary"]]
    prune_amount: list[float]
    task_bn: list[bool]
    head_bits: list[Literal[32, 8, 4, 2]]  # near the small end the head is most of a task
    lr: FloatRange

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
            check_placement(p, f"{path}.placement")


@dataclass(frozen=True)
class Sweep:
    n_trials: int = field(metadata=_range(ge=1))
    workers: int = field(metadata=_range(ge=1, le=64))
    storage: Optional[str]  # None: journal file reports/sweep/<target>/optuna.journal
    study_name: Optional[str]  # None: derived from a hash of the settings (reruns resume)
    sampler: Literal["tpe", "nsga2"]
    n_startup_trials: int = field(metadata=_range(ge=0))  # random trials before the sampler's model
    anchors: bool  # first trials: the smallest and largest configuration of each adapter type
    seed: int
    # The sampler proposes trial n from the results of trials 0..n - in_flight (pipeline.train.proposals),
    # whatever the timing. Best: the workers on all machines together (fewer idles some workers
    # while the model waits; more lets it see fewer results).
    in_flight: int = field(metadata=_range(ge=1, le=64))
    # Trials follow the training rule with transfer.optim, capped at these epochs; the Pareto
    # points are then retrained on every seed at transfer.optim's own budget.
    max_epochs: int = field(metadata=_range(ge=1))
    # Retrained on the reported seeds: the trials' Pareto set below the base's size, then the next
    # non-dominated layers until at least this many.
    min_retrain: int = field(metadata=_range(ge=1))
    stale_after_s: int = field(metadata=_range(ge=1))  # RUNNING trial without heartbeat
    max_failures_in_a_row: int = field(metadata=_range(ge=1))  # then stop: something is wrong beyond one trial
    reference_accuracy: float = field(metadata=_range(ge=0, le=1))  # hypervolume reference point
    reference_memory_pct: float = field(metadata=_range(gt=0))
    space: SearchSpace


@dataclass(frozen=True)
class Report:
    band_low: float = field(metadata=_range(ge=0, le=1))  # the prior study's band
    band_high: float = field(metadata=_range(gt=0, le=10))
    max_ratio: float = field(metadata=_range(gt=0))  # "small adapter" budget for question 1
    n_tasks: int = field(metadata=_range(ge=1, le=1000))
    dpi: int = field(metadata=_range(ge=30, le=600))

    def check(self, path: str) -> None:
        if self.band_low >= self.band_high:
            raise ParamsError(f"{path}: band_low {self.band_low} >= band_high {self.band_high}; allowed: band_low < band_high")


@dataclass(frozen=True)
class Tracking:
    uri: Optional[str]  # None: MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db
    experiment: str

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
    seeds: list[int]
    selection_seed: int  # every choice (lr searches, sweep trials) trains on it, never a reported seed
    data: Data
    model: Model
    trainer: Trainer
    pretrain: Pretrain
    adapter: Adapter
    transfer: Transfer
    sweep: Sweep
    report: Report
    tracking: Tracking

    def dataset(self, name: str, where: str, noun: str = "target") -> DatasetSpec:
        """data.datasets[name], or a ParamsError `<where>: unknown <noun> '<name>'; allowed
        (data.datasets): ...` (where: the command or the params key that named it)."""
        if name not in self.data.datasets:
            raise ParamsError(f"{where}: unknown {noun} '{name}'; allowed (data.datasets): "
                              f"{', '.join(self.data.datasets) or '(none defined)'}")
        return self.data.datasets[name]

    def check(self, path: str) -> None:
        if not self.seeds:
            raise ParamsError("seeds: empty list; give at least one seed")
        for i, seed in enumerate(self.seeds):
            if not 0 <= seed < 2**32:
                raise ParamsError(f"seeds[{i}]: {seed} is out of range; allowed: 0 <= seed < 2**32")
        if len(set(self.seeds)) != len(self.seeds):
            raise ParamsError(f"seeds: {self.seeds} repeats a seed")
        if self.selection_seed in self.seeds or not 0 <= self.selection_seed < 2**32:
            raise ParamsError(f"selection_seed: {self.selection_seed}; allowed: 0 <= seed < 2**32 and not one of "
                              f"seeds {self.seeds} (a reported seed never takes part in a choice)")
        self.dataset(self.pretrain.source, "pretrain.source", "dataset")
        for i, t in enumerate(self.transfer.targets):
            self.dataset(t, f"transfer.targets[{i}]")


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
