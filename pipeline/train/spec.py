"""The one run spec: everything that shapes one training run, built once (from `Params` for the
transfer stages, from a trial's parameters for sweeps) and passed explicitly. It flattens itself
into the MLflow params and the results.csv columns (one vocabulary, the report's included) and is
stored with the task state (adapter.json and the packed header)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pipeline.config import Adapter, Optim, Params, Prune
from pipeline.nn.adapters import Method, TaskSpec

ADAPTER_METHODS = ("serial", "parallel")
Precision = Literal["binary", "fp32"]

# The configuration columns of results.csv, in order: what tells two task states apart. The
# report groups seeds by exactly these.
CONFIG_COLUMNS = ("target", "method", "precision", "adapter_type", "groups", "reduction", "placement",
                  "adapter_bits", "learn_scale", "head_bits", "prune_amount", "task_bn", "bn_bits")


@dataclass(frozen=True)
class RunSpec:
    target: str
    method: Method
    precision: Precision
    state: TaskSpec  # what the task-specific state is made of, head bits included
    prune: Prune     # the adapter weights' pruning schedule (amount 0: dense)
    lr: float
    seed: int
    optim: Optim     # the budget and optimiser: the one training rule's settings

    @property
    def variant(self) -> str:
        """The arm's folder and file name: the method, with the base precision unless binary."""
        return self.method if self.precision == "binary" else f"{self.method}_{self.precision}"

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS

    @property
    def pruned(self) -> bool:
        return self.is_adapter and self.prune.amount > 0

    @property
    def epoch_cap(self) -> int:
        """Pruned runs: a dense phase (up to the cap), the rounds, then the sparse network under
        the same rule."""
        o, p = self.optim, self.prune
        return 2 * o.max_epochs + p.rounds * p.epochs if self.pruned else o.max_epochs

    def with_seed(self, seed: int) -> "RunSpec":
        return replace(self, seed=seed)

    def columns(self) -> dict[str, Any]:
        """The configuration columns (CONFIG_COLUMNS) and the seed. Methods without adapters carry
        the same keys with neutral values, so any two runs compare side by side."""
        s, adapter = self.state, self.is_adapter
        placement = s.placement if isinstance(s.placement, str) else ",".join(map(str, s.placement))
        return {
            "target": self.target,
            "method": self.method,
            "precision": self.precision,
            "adapter_type": self.method if adapter else "none",
            "groups": s.groups if adapter else 0,
            "reduction": s.reduction if adapter else 0,
            "placement": placement if adapter else "none",
            "adapter_bits": s.bits if adapter else 0,
            "learn_scale": bool(s.learn_scale) if adapter else False,
            "head_bits": s.head_bits,
            "prune_amount": self.prune.amount if adapter else 0.0,
            "task_bn": bool(s.task_bn) if adapter else self.method in ("full", "bn"),
            "bn_bits": s.bn_bits,
            "seed": self.seed,
        }

    def mlflow_params(self) -> dict[str, Any]:
        """What MLflow shows for the run: the columns plus the training settings."""
        o = self.optim
        return {**self.columns(), "lr": self.lr, "batch_size": o.batch_size, "max_epochs": self.epoch_cap,
                "patience": o.patience, "min_delta": o.min_delta}

    def to_dict(self) -> dict[str, Any]:
        """As stored beside the task state (adapter.json, packed header)."""
        return {"target": self.target, "method": self.method, "precision": self.precision, "seed": self.seed,
                "spec": self.state.to_dict(), "lr": self.lr, "prune": asdict(self.prune), "optim": asdict(self.optim)}


def task_spec(method: str, adapter: Adapter, head_bits: int) -> TaskSpec:
    """The params' adapter section -> the task state it builds (the adapter knobs only for adapter
    methods; `bn` stores the base's BN at the adapter section's width)."""
    if method in ADAPTER_METHODS:
        return TaskSpec(method, groups=adapter.groups, reduction=adapter.reduction, placement=adapter.placement,
                        task_bn=adapter.task_bn, bits=adapter.bits, head_bits=head_bits, bn_bits=adapter.bn_bits,
                        learn_scale=adapter.learn_scale)
    return TaskSpec(method, head_bits=head_bits, bn_bits=adapter.bn_bits if method == "bn" else 32)


def head_bits(params: Params, method: str) -> int:
    """Every method that trains a new head stores it alike; full finetuning keeps a whole float copy."""
    return 32 if method == "full" else params.transfer.head_bits


def from_params(params: Params, target: str, method: str, precision: str, lr: float, seed: int) -> RunSpec:
    """A transfer arm's run: the adapter section and the transfer budget of params.yaml."""
    return RunSpec(target, method, precision, task_spec(method, params.adapter, head_bits(params, method)),
                   params.adapter.prune, lr, seed, params.transfer.optim)


def from_trial(params: Params, target: str, values: dict[str, Any], seed: int, max_epochs: int | None = None) -> RunSpec:
    """A sweep trial's configuration (its sampled `values`: method, adapter knobs, head_bits, lr);
    the knobs the sweep does not search come from the adapter section. `max_epochs` caps a trial's
    budget below transfer.optim's (the Pareto retrains use the full budget)."""
    a = params.adapter
    adapter = replace(a, groups=values["groups"], reduction=values["reduction"], placement=values["placement"],
                      task_bn=values["task_bn"], bits=values["bits"])
    optim = params.transfer.optim if max_epochs is None else replace(params.transfer.optim, max_epochs=max_epochs)
    return RunSpec(target, values["method"], "binary", task_spec(values["method"], adapter, values["head_bits"]),
                   replace(a.prune, amount=values["prune_amount"]), values["lr"], seed, optim)
