"""Intervals over seeds x test images (pipeline.stats.crossed_ci, paired_ci): derived by hand on
small matrices, against scipy's one-sample t interval for one seed, and by a coverage simulation
with a known gap, seed-to-seed and image-to-image variation and 5 seeds."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy import stats as sps

from conftest import ROOT
from pipeline.stats import crossed_ci, paired_ci


def test_identical_predictions_differ_by_zero_with_zero_width():
    rng = np.random.default_rng(0)
    a = rng.random((5, 300)) < 0.8
    assert paired_ci(a, a)[:2] == (0.0, 0.0)


def test_a_small_matrix_by_hand():
    """D = [[1, 0, 0], [1, 1, 0]] (2 seeds, 3 images): mean 1/2; seed means 1/3, 2/3 -> MS_seed =
    3 (1/36 + 1/36) = 1/6; image means 1, 1/2, 0 -> MS_image = 2 (1/4 + 0 + 1/4) / 2 = 1/2;
    residuals +-1/6, -+1/3, +-1/6 -> MS_res = (1/3) / 2 = 1/6. Var = (1/6 + 1/2 - 1/6) / 6 = 1/12;
    Satterthwaite df = (1/2)^2 / ((1/6)^2 / 1 + (1/2)^2 / 2 + (1/6)^2 / 2) = 1.5."""
    a = np.array([[1, 1, 0], [1, 1, 0]])
    b = np.array([[0, 1, 0], [0, 0, 0]])
    mean, half, df = paired_ci(a, b)
    assert mean == 0.5 and df == pytest.approx(1.5, rel=1e-12)
    assert half == pytest.approx(sps.t.ppf(0.975, 1.5) * math.sqrt(1 / 12), rel=1e-12)


def test_one_seed_is_the_one_sample_t_interval_over_images():
    rng = np.random.default_rng(1)
    a, b = rng.random((1, 400)) < 0.85, rng.random((1, 400)) < 0.8
    mean, half, df = paired_ci(a, b)
    ci = sps.ttest_1samp((a.astype(float) - b)[0], 0.0).confidence_interval(0.95)
    assert df == 399 and mean == pytest.approx((ci.low + ci.high) / 2, abs=1e-12)
    assert half == pytest.approx((ci.high - ci.low) / 2, rel=1e-12)


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="pair the same seeds and images"):
        paired_ci(np.ones((5, 10)), np.ones((4, 10)))


# the generative model of benchmarks/interval_coverage.py (which draws the coverage figure)
sys.path.insert(0, str(ROOT / "benchmarks"))
from interval_coverage import simulated_studies as _simulated_studies, true_gap as _true_gap  # noqa: E402


@pytest.mark.parametrize("seed_sd, image_sd", [(0.3, 0.0), (0.05, 1.0)])  # seed, then image variation dominating
def test_paired_intervals_cover_the_true_gap_95_percent_of_the_time(seed_sd, image_sd):
    """1,000 simulated studies of 5 seeds x 2,000 test images: the paired 95% interval holds the
    population gap in 93-97% of them, whichever variation dominates."""
    rng = np.random.default_rng(20261202)
    truth = _true_gap(rng, 0.2, seed_sd, image_sd)
    covered = 0
    for chunk in range(4):
        a, b = _simulated_studies(rng, 250, 5, 2000, 0.2, seed_sd, image_sd)
        for k in range(len(a)):
            mean, half, _ = paired_ci(a[k], b[k])
            covered += abs(mean - truth) <= half
    assert 0.93 <= covered / 1000 <= 0.97, covered / 1000


def test_an_absolute_accuracy_interval_includes_test_image_sampling():
    """Five identical seeds on 400 images at 80%: no seed-to-seed spread, yet the interval is the
    images' binomial one (about +-3.9 points), not zero."""
    row = np.r_[np.ones(320), np.zeros(80)]
    mean, half, _ = crossed_ci(np.tile(row, (5, 1)))
    assert mean == 0.8
    assert half == pytest.approx(sps.t.ppf(0.975, 399) * row.std(ddof=1) / math.sqrt(400), rel=1e-12)
