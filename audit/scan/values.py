"""Small helpers for numbers that may be missing (NaN/None) in the scan's tables."""

from __future__ import annotations

import math

import numpy as np


def finite(v) -> bool:
    """True for a finite int/float (NumPy scalars included); False for None, NaN, inf, anything else."""
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def clip01(v) -> float:
    """``v`` clipped to 0..1; 0 for a non-finite value."""
    v = float(v)
    return 0.0 if not math.isfinite(v) else min(1.0, max(0.0, v))


def or_none(v):
    """``v`` if it is a finite number, else None (a null in the summary tables)."""
    return v if finite(v) else None


def pct(v) -> str:
    """0.123 -> '12%'."""
    return f"{100 * float(v):.0f}%"
