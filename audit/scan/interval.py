"""Confidence intervals of rates: every rate that enters a verdict carries its count and interval.

Pure functions (no NumPy needed): :func:`wilson` is the Wilson score
interval of a binomial proportion (Wilson 1927; Brown, Cai and DasGupta
2001 recommend it over the normal approximation for small ``n``),
:func:`difference` the interval of the difference of two such rates
(Newcombe 1998, his method 10: each rate's Wilson interval, combined), and
:func:`side` says where an interval lies against a threshold.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials: ``(low, high)``, NaN for ``n = 0``.

    Args:
        k: successes (0..n).
        n: trials.
        z: the normal quantile (default: two-sided 95%).

    Returns:
        ``(low, high)`` within 0..1.

    Raises:
        ValueError: ``k`` outside 0..n.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"wilson: {k} successes of {n} trials")
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    d = 1 + z2 / n
    return max(0.0, (centre - half) / d), min(1.0, (centre + half) / d)


def difference(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """The 95% interval of ``k1/n1 - k2/n2`` (Newcombe's hybrid score interval), NaN when either ``n`` is 0.

    Subtracting one interval's far end from the other's near end would add the two half-widths (a
    far wider interval than the difference has); Newcombe combines them in quadrature, each side with
    its own Wilson interval, and keeps the interval's coverage close to 95% on small samples.

    Args:
        k1, n1: successes and trials of the first rate.
        k2, n2: of the second.
        z: the normal quantile (default: two-sided 95%).

    Returns:
        ``(low, high)`` within -1..1.
    """
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def side(low: float, high: float, threshold: float) -> int:
    """Where the interval ``[low, high]`` lies against ``threshold``: 1 at or above it (``low >=``),
    -1 below it (``high <``), 0 when it straddles it or is unknown (NaN)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return 0
    if low >= threshold:
        return 1
    if high < threshold:
        return -1
    return 0


def pct_interval(rate: float, n: int, low: float, high: float) -> str:
    """``"91% of 32 predictions (75-97%)"``-style words for a rate, its count and its interval."""
    if not math.isfinite(rate):
        return "an unknown share"
    words = f"{round(100 * rate)}% of {n}"
    if math.isfinite(low) and math.isfinite(high):
        words += f" ({round(100 * low)}-{round(100 * high)}%)"
    return words
