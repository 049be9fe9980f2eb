"""Intervals: means over seeds with a 95% Student t interval, and (crossed_ci, paired_ci) means
over seeds x test images whose interval counts both seed-to-seed and test-image variation. Two
arms are compared by paired_ci, never by whether two separate intervals overlap (a test with
almost no power at a few seeds)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy.stats import t as student_t


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the `level` confidence interval). One value: half-width NaN (unknown)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return float("nan"), float("nan")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def crossed_ci(x, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, half-width, degrees of freedom) of the mean of `x`, a seeds x images matrix (a
    correctness matrix, or the difference of two on the same seeds and images), with seeds and
    images both random: the test images are a sample too, shared by every seed. Two-way ANOVA
    without replication gives Var(mean) = (MS_seed + MS_image - MS_residual) / (S I) and
    Satterthwaite's degrees of freedom for the t quantile. One seed: the images' variance alone.
    Identical rows and columns (e.g. identical predictions) give half-width 0."""
    d = np.asarray(x, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"crossed_ci: expected a seeds x images matrix, got shape {d.shape}")
    s, i = d.shape
    mean = float(d.mean())
    if i < 2:
        return mean, float("nan"), float("nan")
    seed_means, image_means = d.mean(1), d.mean(0)
    ms_image = s * float(((image_means - mean) ** 2).sum()) / (i - 1)
    if s == 1:
        terms = [(ms_image, i - 1)]
    else:
        ms_seed = i * float(((seed_means - mean) ** 2).sum()) / (s - 1)
        resid = d - seed_means[:, None] - image_means[None, :] + mean
        ms_resid = float((resid ** 2).sum()) / ((s - 1) * (i - 1))
        terms = [(ms_seed, s - 1), (ms_image, i - 1), (-ms_resid, (s - 1) * (i - 1))]
    combo = sum(ms for ms, _ in terms)
    if combo <= 0:  # the components' estimates fell below zero: keep the larger main effect alone
        terms = [max(terms[:2], key=lambda t: t[0])]
        combo = terms[0][0]
    if combo <= 0:
        return mean, 0.0, float("inf")
    df = combo ** 2 / sum(ms ** 2 / df for ms, df in terms)
    half = float(student_t.ppf(0.5 + level / 2, df)) * math.sqrt(combo / (s * i))
    return mean, half, float(df)


def paired_ci(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """Accuracy of A minus B, paired on the same seeds and images: `a` and `b` are seeds x images
    correctness matrices (1 correct, 0 wrong), row k of both from seed k. (difference, half-width,
    degrees of freedom) by `crossed_ci`; the two are apart when the interval excludes 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_ci: A is {a.shape} but B is {b.shape}; pair the same seeds and images")
    return crossed_ci(a - b, level)
