"""Pareto set and 2-D hypervolume (accuracy: maximise, memory: minimise), checked against hand
computations and against two independent exact computations of the union area."""

from __future__ import annotations

import itertools
import random

import pytest

from pipeline.train.pareto import hypervolume, pareto_mask


# ------------------------------------------------------------------------------ pareto_mask


def test_pareto_mask_hand_made_set():
    points = [
        (0.90, 10.0),  # 0: non-dominated
        (0.80, 5.0),   # 1: non-dominated (least memory)
        (0.95, 50.0),  # 2: non-dominated (best accuracy)
        (0.90, 10.0),  # 3: duplicate of 0: neither is strictly better, both stay
        (0.90, 12.0),  # 4: ties 0 on accuracy, more memory -> dominated by 0
        (0.85, 5.0),   # 5: ties 1 on memory, better accuracy -> dominates 1
        (0.70, 60.0),  # 6: dominated on both axes
        (0.95, 50.0),  # 7: duplicate of 2
    ]
    assert pareto_mask(points) == [True, False, True, True, False, True, False, True]


def test_pareto_mask_tie_on_one_axis_only():
    # same memory, lower accuracy -> dominated; same accuracy, more memory -> dominated
    assert pareto_mask([(0.5, 3.0), (0.4, 3.0)]) == [True, False]
    assert pareto_mask([(0.5, 4.0), (0.5, 3.0)]) == [False, True]
    # a trade-off: neither dominates
    assert pareto_mask([(0.5, 4.0), (0.4, 3.0)]) == [True, True]


def test_pareto_mask_single_and_empty():
    assert pareto_mask([(0.1, 99.0)]) == [True]
    assert pareto_mask([]) == []


def test_pareto_mask_all_duplicates_kept():
    assert pareto_mask([(0.7, 20.0)] * 3) == [True, True, True]


# ------------------------------------------------------------------------------ hypervolume


def test_hypervolume_by_hand():
    # Reference (accuracy 0.0, memory 100). Boxes [memory, 100] x [0, accuracy]:
    #   (0.80, 5):  [5, 100]  x [0, 0.80]
    #   (0.90, 10): [10, 100] x [0, 0.90]
    #   (0.95, 50): [50, 100] x [0, 0.95]
    # Union, strip by strip along memory:
    #   [5, 10]:   height 0.80 -> 5 * 0.80  = 4.0
    #   [10, 50]:  height 0.90 -> 40 * 0.90 = 36.0
    #   [50, 100]: height 0.95 -> 50 * 0.95 = 47.5
    # total 87.5
    points = [(0.9, 10.0), (0.8, 5.0), (0.95, 50.0)]
    assert hypervolume(points, 0.0, 100.0) == pytest.approx(87.5, abs=1e-12)


def test_hypervolume_nonzero_reference_accuracy():
    # Reference (0.5, 20). (0.9, 10) -> box [10, 20] x [0.5, 0.9] = 10 * 0.4 = 4.0;
    # (0.8, 5) -> [5, 20] x [0.5, 0.8]; union adds strip [5, 10] x 0.3 = 1.5 -> 5.5.
    # (0.95, 50) has memory beyond the reference: nothing.
    assert hypervolume([(0.9, 10.0), (0.8, 5.0), (0.95, 50.0)], 0.5, 20.0) == pytest.approx(5.5, abs=1e-12)


def test_hypervolume_points_outside_reference_add_nothing():
    base = [(0.9, 10.0), (0.8, 5.0), (0.95, 50.0)]
    outside = [
        (0.99, 100.0),  # memory == reference
        (0.99, 150.0),  # memory beyond reference
        (0.0, 1.0),     # accuracy == reference
        (-0.2, 1.0),    # accuracy below reference
    ]
    assert hypervolume(base + outside, 0.0, 100.0) == pytest.approx(87.5, abs=1e-12)
    assert hypervolume(outside, 0.0, 100.0) == 0.0


def test_hypervolume_dominated_and_duplicate_points_add_nothing():
    base = [(0.9, 10.0), (0.8, 5.0), (0.95, 50.0)]
    extra = [(0.85, 20.0), (0.9, 10.0), (0.8, 5.0), (0.5, 99.0)]
    assert hypervolume(base + extra, 0.0, 100.0) == pytest.approx(87.5, abs=1e-12)


def test_hypervolume_empty_and_single():
    assert hypervolume([], 0.0, 100.0) == 0.0
    # one box: [25, 100] x [0, 0.6] = 75 * 0.6 = 45
    assert hypervolume([(0.6, 25.0)], 0.0, 100.0) == pytest.approx(45.0, abs=1e-12)


def test_hypervolume_order_independent():
    points = [(0.9, 10.0), (0.8, 5.0), (0.95, 50.0), (0.85, 7.0), (0.3, 1.0)]
    # by hand: strips [1,5] 0.3*4=1.2; [5,7] 0.8*2=1.6; [7,10] 0.85*3=2.55; [10,50] 0.9*40=36; [50,100] 0.95*50=47.5
    expected = 1.2 + 1.6 + 2.55 + 36.0 + 47.5
    for perm in itertools.permutations(points):
        assert hypervolume(list(perm), 0.0, 100.0) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------ independent exact areas


def _boxes(points, ref_a, ref_m):
    """Each point's box [m, ref_m] x [ref_a, a], only if it has positive area."""
    return [(m, ref_m, ref_a, a) for a, m in points if a > ref_a and m < ref_m]


def _area_inclusion_exclusion(points, ref_a, ref_m) -> float:
    """Union area = sum over non-empty subsets of (-1)^(|S|+1) * area(intersection of S). All
    boxes share the corner (ref_m, ref_a), so an intersection is [max m, ref_m] x [ref_a, min a]."""
    boxes = _boxes(points, ref_a, ref_m)
    total = 0.0
    for k in range(1, len(boxes) + 1):
        for subset in itertools.combinations(boxes, k):
            left = max(b[0] for b in subset)
            top = min(b[3] for b in subset)
            total += (-1) ** (k + 1) * (ref_m - left) * (top - ref_a)
    return total


def _area_grid(points, ref_a, ref_m) -> float:
    """Coordinate compression on both axes: a grid cell counts if its centre lies in any box."""
    boxes = _boxes(points, ref_a, ref_m)
    xs = sorted({b[0] for b in boxes} | {ref_m})
    ys = sorted({b[3] for b in boxes} | {ref_a})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if any(b[0] <= cx <= b[1] and b[2] <= cy <= b[3] for b in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area


def test_independent_areas_agree_on_the_hand_example():
    points = [(0.9, 10.0), (0.8, 5.0), (0.95, 50.0)]
    assert _area_inclusion_exclusion(points, 0.0, 100.0) == pytest.approx(87.5, abs=1e-12)
    assert _area_grid(points, 0.0, 100.0) == pytest.approx(87.5, abs=1e-12)


@pytest.mark.parametrize("seed", range(25))
def test_hypervolume_matches_independent_exact_union(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    # a coarse grid of values makes ties (equal accuracy / equal memory / duplicates) common
    points = [(rng.choice([0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0]) + rng.choice([0.0, 0.0, 0.013]),
               rng.choice([2.0, 5.0, 10.0, 12.5, 40.0, 80.0, 100.0, 120.0])) for _ in range(n)]
    ref_a, ref_m = rng.choice([(0.0, 100.0), (0.3, 90.0), (0.5, 50.0)])
    expected = _area_inclusion_exclusion(points, ref_a, ref_m)
    assert _area_grid(points, ref_a, ref_m) == pytest.approx(expected, abs=1e-9)
    assert hypervolume(points, ref_a, ref_m) == pytest.approx(expected, abs=1e-9)
    # the Pareto subset alone spans the same area
    front = [p for p, keep in zip(points, pareto_mask(points)) if keep]
    assert hypervolume(front, ref_a, ref_m) == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------ the sweep's retrain set


def _trial(number: int, acc: float, memory: float, state=None):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    return create_trial(state=state or TrialState.COMPLETE, values=None if state else [acc, memory],
                        params={"x": float(number)}, distributions={"x": FloatDistribution(0, 100)},
                        user_attrs={"proposal": number})


def test_retrain_set_is_the_front_below_the_base_then_the_next_layers():
    from optuna.trial import TrialState

    from pipeline.train.sweep import to_retrain

    # (number, val accuracy, memory bytes); the base is 100 bytes
    trials = [_trial(0, 0.90, 10), _trial(1, 0.95, 50), _trial(2, 0.99, 150),   # front; 2 is above the base
              _trial(3, 0.85, 20), _trial(4, 0.93, 60),                         # second layer (below the base)
              _trial(5, 0.80, 30), _trial(6, 0.50, 5.0, TrialState.FAIL),      # third layer; a failed trial
              _trial(7, 0.97, 100)]                                             # exactly the base's size: never
    numbers = lambda ts: [t.user_attrs["proposal"] for t in ts]  # noqa: E731
    # front below the base: 0 (10 B) and 1 (50 B); 7 at 100 B and 2 at 150 B are not below it
    assert numbers(to_retrain(trials, 100.0, 1)) == [0, 1]
    assert numbers(to_retrain(trials, 100.0, 2)) == [0, 1]
    # 3 wanted: the whole second layer (3 at 20 B, 4 at 60 B) joins, by memory
    assert numbers(to_retrain(trials, 100.0, 3)) == [0, 3, 1, 4]
    assert numbers(to_retrain(trials, 100.0, 5)) == [0, 3, 5, 1, 4]
    assert numbers(to_retrain(trials, 100.0, 50)) == [0, 3, 5, 1, 4]  # all there is below the base
    assert to_retrain(trials, 5.0, 6) == []


def test_log_memory_hypervolume_by_hand():
    from pipeline.train.sweep import log_hypervolume

    # (accuracy, memory % of base): strips in log10 memory from 1% (0) to 100% (2)
    # 0.5% counts at 1% (log 0): 0.8 over [0, 1) (1% to 10%), then 0.9 over [1, 2): 0.8 + 0.9
    assert log_hypervolume([(0.8, 0.5), (0.9, 10.0)], 0.0) == pytest.approx(1.7, abs=1e-12)
    # a point at or above 100% adds nothing; reference accuracy 0.5 lowers each strip's height
    assert log_hypervolume([(0.8, 1.0), (0.99, 100.0)], 0.5) == pytest.approx(2 * 0.3, abs=1e-12)
