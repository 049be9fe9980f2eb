"""Pareto sets and 2-D hypervolume for (accuracy: maximise, memory: minimise)."""

from __future__ import annotations


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """True for points not dominated by another: no other point has accuracy >= and memory <=
    with at least one strictly better. Points are (accuracy, memory)."""
    keep = []
    for i, (a, m) in enumerate(points):
        dominated = any(
            (a2 >= a and m2 <= m) and (a2 > a or m2 < m) for j, (a2, m2) in enumerate(points) if j != i
        )
        keep.append(not dominated)
    return keep


def hypervolume(points: list[tuple[float, float]], ref_accuracy: float, ref_memory: float) -> float:
    """Area dominated by `points` and bounded by the reference point (ref_accuracy, ref_memory):
    the union of boxes [memory, ref_memory] x [ref_accuracy, accuracy]. Points with accuracy <=
    ref_accuracy or memory >= ref_memory add nothing."""
    inside = sorted((m, a) for a, m in points if a > ref_accuracy and m < ref_memory)
    area, best = 0.0, ref_accuracy
    # Sweep memory from small to large: each strip [m_i, m_{i+1}] is covered up to the best
    # accuracy reached by any point with memory <= m_i.
    for i, (m, a) in enumerate(inside):
        best = max(best, a)
        right = inside[i + 1][0] if i + 1 < len(inside) else ref_memory
        area += (right - m) * (best - ref_accuracy)
    return area
