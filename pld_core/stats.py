"""Evaluation statistics: success rates with Wilson score intervals."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (well-behaved at 0 and n successes)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def success_summary(outcomes: list[bool]) -> dict:
    n, k = len(outcomes), int(sum(bool(o) for o in outcomes))
    lo, hi = wilson_interval(k, n)
    return {"success_rate": k / n if n else 0.0, "ci95": [round(lo, 4), round(hi, 4)], "episodes": n, "successes": k}
