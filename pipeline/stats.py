"""Means over seeds with a 95% Student t interval: the form of every number the report prints."""

from __future__ import annotations

import math
from typing import Iterable

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


def distinguishable(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two (mean, half-width) intervals that do not overlap. Unknown widths never separate."""
    (ma, ha), (mb, hb) = a, b
    if math.isnan(ha) or math.isnan(hb):
        return False
    return abs(ma - mb) > ha + hb
