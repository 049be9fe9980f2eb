"""Sweep proposals that do not depend on timing (pipeline.train.proposals) and the bookkeeping that
turns attempts into a study (pipeline.train.sweep: proposals, counted, next_proposal), in process
and without training: every outcome here is made up, so each expectation follows by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from pipeline.config import parse_params
from pipeline.train.proposals import Earlier, _model_study, anchors, distributions, needs, propose, seed_for
from pipeline.train.sweep import counted, next_proposal, proposals

ROOT = Path(__file__).resolve().parents[1]


def _params(**sweep):
    params = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    return replace(params, sweep=replace(params.sweep, **sweep))


def _run_all(params, target: str, n: int, outcome) -> list[tuple[dict, object]]:
    """Proposals 0..n-1 made one after another, each finished with outcome(i, values)."""
    earlier, made = [], []
    for i in range(n):
        values, repeats = propose(params, target, i, earlier)
        made.append((values, repeats))
        earlier.append(Earlier(values, True, outcome(i, values)))
    return made


def _score(i, values):
    """A made-up outcome: accuracy grows with the lr, memory with the bits."""
    return (0.5 + 10 * values["lr"], 1000.0 * (values["bits"] if values["bits"] != "ternary" else 2))


def test_anchors_are_each_adapter_types_ends_and_come_first():
    """The default space's corners, by hand: smallest = most groups (32), most reduction (2), fewest
    blocks (last:1), fewest bits (1), most pruning (0.9), no task BN, a 4-bit head; largest = the
    opposite ends (groups 1, reduction 1, all blocks, 32-bit, no pruning, task BN, 8-bit head); lr
    the log-midpoint of 0.003-0.03, sqrt(0.003 * 0.03) = 0.0094868, at 3 significant digits."""
    params = _params()
    got = anchors(params)
    small = {"groups": 32, "reduction": 2, "placement": "last:1", "bits": 1, "prune_amount": 0.9, "task_bn": False,
             "head_bits": 4}
    large = {"groups": 1, "reduction": 1, "placement": "all", "bits": 32, "prune_amount": 0.0, "task_bn": True,
             "head_bits": 8}
    assert [{k: v for k, v in a.items() if k != "lr"} for a in got] == \
        [{"method": "serial", **small}, {"method": "serial", **large},
         {"method": "parallel", **small}, {"method": "parallel", **large}]
    assert all(a["lr"] == 0.00949 for a in got)
    made = _run_all(params, "t", 4, _score)
    assert [v for v, _ in made] == got and all(r is None for _, r in made)
    off = _run_all(_params(anchors=False), "t", 1, _score)
    assert off[0][0] not in got


def test_proposals_are_a_function_of_settings_target_and_number():
    """Made twice from the same outcomes: equal. Another target or sweep.seed: other draws (the
    random start-up proposals of two targets no longer coincide)."""
    params = _params(n_startup_trials=3)
    a = _run_all(params, "mnist_5to9", 9, _score)
    assert _run_all(params, "mnist_5to9", 9, _score) == a
    b = _run_all(params, "uci_digits", 9, _score)
    assert [v for v, _ in a[:4]] == [v for v, _ in b[:4]]  # the anchors are the space's, not the target's
    assert all(x != y for (x, _), (y, _) in zip(a[4:], b[4:]))
    c = _run_all(replace(params, sweep=replace(params.sweep, seed=1)), "mnist_5to9", 9, _score)
    assert all(x != y for (x, _), (y, _) in zip(a[4:], c[4:]))
    assert seed_for(params, "mnist_5to9", 4) != seed_for(params, "uci_digits", 4)
    assert len({seed_for(params, "mnist_5to9", n) for n in range(50)}) == 50
    for values, _ in a:
        assert values["lr"] == float(f"{values['lr']:.3g}")
        assert params.sweep.space.lr.low <= values["lr"] <= params.sweep.space.lr.high


def test_a_model_proposal_sees_exactly_the_results_before_its_window():
    """in_flight 2, 4 anchors + 2 start-up: proposal 8 is the model's, from the outcomes of 0..6;
    proposal 7 counts as running whatever its state. So changing 7's outcome (or finishing it) leaves
    proposal 8 alone, and the model's study holds 0..6 finished and 7 RUNNING (the constant liar)."""
    params = _params(n_startup_trials=2, in_flight=2)
    assert [needs(params, n) for n in (0, 5, 6, 7, 8)] == [0, 0, 5, 6, 7]
    base = _run_all(params, "t", 8, _score)
    earlier = [Earlier(v, True, _score(i, v)) for i, (v, _) in enumerate(base)]
    p8 = propose(params, "t", 8, earlier)
    running7 = earlier[:7] + [Earlier(earlier[7].values, False)]
    other7 = earlier[:7] + [Earlier(earlier[7].values, True, (0.0, 1.0))]
    assert propose(params, "t", 8, running7) == p8 == propose(params, "t", 8, other7)
    study = _model_study(params, "t", 8, running7)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 7 + [TrialState.RUNNING]
    assert [tuple(t.values) for t in study.trials[:7]] == [e.outcome for e in earlier[:7]]
    with pytest.raises(AssertionError):  # proposal 8 cannot be made before 6 is finished
        propose(params, "t", 8, earlier[:6] + [Earlier(earlier[6].values, False)] + earlier[7:])


def test_a_configuration_already_proposed_is_not_proposed_again():
    """A space of one configuration: proposal 0 is it; proposal 1 can only repeat it, and says so
    (redrawing cannot help). A space of two: the second proposal is the other one."""
    one = {"method": ["serial"], "groups": [4], "reduction": [1], "placement": ["last:1"], "bits": [4],
           "prune_amount": [0.0], "task_bn": [False], "head_bits": [8]}
    params = _params(anchors=False, n_startup_trials=5)
    space = replace(params.sweep.space, **one, lr=replace(params.sweep.space.lr, low=0.01, high=0.01))
    params = replace(params, sweep=replace(params.sweep, space=space))
    made = _run_all(params, "t", 2, _score)
    assert made[0][1] is None and made[1] == (made[0][0], 0)
    two = replace(space, bits=[4, 8])
    made = _run_all(replace(params, sweep=replace(params.sweep, space=two)), "t", 2, _score)
    assert {made[0][0]["bits"], made[1][0]["bits"]} == {4, 8} and made[1][1] is None


# ------------------------------------------------------------------------------ attempts -> study


def _study(attempts: list[tuple[int, TrialState, str | None]]) -> optuna.Study:
    """An in-memory study of attempts (proposal, state, fail reason), in this order."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    dists = distributions(_params().sweep.space)
    values = anchors(_params())[0]
    for q, state, reason in attempts:
        attrs = {"proposal": q, **({"fail_reason": reason} if reason else {})}
        study.add_trial(create_trial(state=state, params=values, distributions=dists, user_attrs=attrs,
                                     values=[0.5, 100.0] if state == TrialState.COMPLETE else None))
    return study


C, R, F = TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL


def test_each_proposal_is_held_by_its_lowest_attempt_not_lost():
    study = _study([(0, F, "stale: worker pid 7 is gone"), (1, C, None), (0, R, None), (0, R, None),
                    (2, F, "lost: proposal 2 is held by trial 9"), (2, F, "diverged")])
    held = proposals(study)
    assert {q: t.number for q, t in held.items()} == {0: 2, 1: 1, 2: 5}


def test_the_study_ends_at_the_nth_complete_proposal_and_waits_for_results():
    """in_flight 2, 4 anchors + 0 start-up, so proposal 5 needs 0..3 finished."""
    held = lambda *a: proposals(_study(list(a)))  # noqa: E731
    two, three = _params(n_trials=2, in_flight=2, n_startup_trials=0), _params(n_trials=3, in_flight=2, n_startup_trials=0)
    # n_trials 3; 0 failed, 1 running, 2 complete: 3 may be needed (an anchor: no results to wait for)
    h = held((0, F, "diverged"), (1, R, None), (2, C, None))
    assert [t.user_attrs["proposal"] for t in counted(h, 3)] == [0, 1, 2]
    assert next_proposal(three, h) == (False, 3)
    # n_trials 2: 1 complete + 1 running fill the quota; wait in case the running one fails
    assert next_proposal(two, h) == (False, None)
    # 1 and 3 complete too: for n_trials 2 the study is 0..2, and 3 (started meanwhile) does not count
    h = held((0, F, "diverged"), (1, C, None), (2, C, None), (3, C, None))
    assert [t.user_attrs["proposal"] for t in counted(h, 2)] == [0, 1, 2]
    assert next_proposal(two, h) == (True, None)
    assert [t.user_attrs["proposal"] for t in counted(h, 3)] == [0, 1, 2, 3]
    # proposal 5 (the model's) waits for 3, which is running; 4 may run meanwhile
    params = _params(n_trials=9, in_flight=2, n_startup_trials=0)
    assert next_proposal(params, held((0, C, None), (1, C, None), (2, C, None), (3, R, None))) == (False, 4)
    assert next_proposal(params, held((0, C, None), (1, C, None), (2, C, None), (3, R, None), (4, R, None))) == \
        (False, None)
    assert next_proposal(params, held((0, C, None), (1, C, None), (2, C, None), (3, C, None), (4, R, None))) == \
        (False, 5)
    # a stale attempt frees its proposal, which comes before any later one
    assert next_proposal(params, held((0, C, None), (1, F, "stale: no heartbeat for 99s"), (2, R, None))) == \
        (False, 1)
