"""Sweep proposals that do not depend on timing.

Proposal n (0, 1, 2, ...) is a function of the study's settings, the target, n, and the outcomes
of proposals 0..n - in_flight; the ones in between count as running, by their (known)
configurations. The anchors come first, then random start-up proposals drawn from a generator
seeded by (seed, target, n), then the sampler's model, fitted afresh on exactly those outcomes.
So any worker on any machine that computes proposal n gets the same configuration, whichever
worker asks and whenever, and a killed proposal is retried as itself. A configuration proposed
before is drawn again (up to REDRAWS times) instead of being trained twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline.config import Params, SearchSpace
from pipeline.io import sha256
from pipeline.nn.binary import storage_bits

KNOBS = ("method", "groups", "reduction", "placement", "task_bn", "bits", "prune_amount", "head_bits")
REDRAWS = 10
LR_DIGITS = 3  # significant digits: an lr is proposed and stored at this precision, so "the same
#                configuration" is an exact test


@dataclass(frozen=True)
class Earlier:
    """What a proposal needs to know of an earlier one: its configuration and, once it is
    finished, its outcome: (val accuracy, task memory) for a COMPLETE trial, None for a failed one."""

    values: dict[str, Any]
    finished: bool
    outcome: Optional[tuple[float, float]] = None


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    dists: dict[str, BaseDistribution] = {k: CategoricalDistribution(getattr(space, k)) for k in KNOBS}
    dists["lr"] = FloatDistribution(space.lr.low, space.lr.high, log=space.lr.log)
    return dists


def sample(trial: optuna.trial.BaseTrial, space: SearchSpace) -> dict[str, Any]:
    """The knobs in a fixed order (a sampler's random stream depends on it)."""
    values = {k: trial.suggest_categorical(k, getattr(space, k)) for k in KNOBS}
    values["lr"] = trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log)
    return values


def rounded(values: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    lr = float(f"{values['lr']:.{LR_DIGITS}g}")
    return {**values, "lr": min(max(lr, space.lr.low), space.lr.high)}


def key(values: dict[str, Any]) -> tuple:
    return tuple(values[k] for k in (*KNOBS, "lr"))


def _placement_size(p: str) -> float:
    return float("inf") if p == "all" else int(p[5:]) if p.startswith("last:") else len(p.split(","))


def anchors(params: Params) -> list[dict[str, Any]]:
    """The smallest and the largest configuration of each adapter type in the space (every knob at
    its cheapest or dearest end), so the front's two ends are measured, not left to chance."""
    sp = params.sweep.space
    lr = sp.lr.low * (sp.lr.high / sp.lr.low) ** 0.5 if sp.lr.log else (sp.lr.low + sp.lr.high) / 2
    ends = {
        "groups": (max(sp.groups), min(sp.groups)),
        "reduction": (max(sp.reduction), min(sp.reduction)),
        "placement": (min(sp.placement, key=_placement_size), max(sp.placement, key=_placement_size)),
        "bits": (min(sp.bits, key=storage_bits), max(sp.bits, key=storage_bits)),
        "prune_amount": (max(sp.prune_amount), min(sp.prune_amount)),
        "task_bn": (min(sp.task_bn), max(sp.task_bn)),
        "head_bits": (min(sp.head_bits), max(sp.head_bits)),
    }
    return [rounded({"method": m, **{k: v[end] for k, v in ends.items()}, "lr": lr}, sp)
            for m in sp.method for end in (0, 1)]


def seed_for(params: Params, target: str, n: int) -> int:
    """Each target and each proposal its own stream: targets no longer draw alike."""
    return int(sha256({"seed": params.sweep.seed, "target": target, "proposal": n}, length=8), 16)


def needs(params: Params, n: int) -> int:
    """How many earlier proposals must be finished before proposal n can be made."""
    s = params.sweep
    first_model = (len(anchors(params)) if s.anchors else 0) + s.n_startup_trials
    return 0 if n < first_model else max(0, n - s.in_flight + 1)


def _model_study(params: Params, target: str, n: int, earlier: list[Earlier]) -> optuna.Study:
    """An in-memory study holding what proposal n may see: the finished outcomes of proposals
    0..n - in_flight, the ones after them as running trials (the sampler's constant liar)."""
    s = params.sweep
    seed = seed_for(params, target, n)
    sampler = optuna.samplers.NSGAIISampler(seed=seed) if s.sampler == "nsga2" else \
        optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    dists, seen = distributions(s.space), needs(params, n)
    for i, e in enumerate(earlier):
        if i < seen and e.outcome is not None:
            study.add_trial(create_trial(params=e.values, distributions=dists, values=list(e.outcome)))
        elif i < seen:
            study.add_trial(create_trial(state=TrialState.FAIL, params=e.values, distributions=dists))
        else:
            study.add_trial(create_trial(state=TrialState.RUNNING, params=e.values, distributions=dists))
    return study


def propose(params: Params, target: str, n: int, earlier: list[Earlier]) -> tuple[dict[str, Any], Optional[int]]:
    """Proposal n's configuration, and the number of the earlier proposal it repeats when every
    redraw repeated one (None: a new configuration). `earlier` holds proposals 0..n-1, the first
    `needs(params, n)` of them finished."""
    s = params.sweep
    assert len(earlier) == n and all(e.finished for e in earlier[:needs(params, n)])
    seen = {key(e.values): i for i, e in enumerate(earlier)}
    fixed = anchors(params) if s.anchors else []
    if n < len(fixed):
        return fixed[n], seen.get(key(fixed[n]))
    quiet = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if n < len(fixed) + s.n_startup_trials:
            study = optuna.create_study(directions=["maximize", "minimize"],
                                        sampler=optuna.samplers.RandomSampler(seed=seed_for(params, target, n)))
        else:
            study = _model_study(params, target, n, earlier)
        for _ in range(REDRAWS):
            trial = study.ask()
            values = rounded(sample(trial, s.space), s.space)
            if key(values) not in seen:
                return values, None
            study.tell(trial, state=TrialState.FAIL)  # not again: the sampler draws on
        return values, seen[key(values)]
    finally:
        optuna.logging.set_verbosity(quiet)
