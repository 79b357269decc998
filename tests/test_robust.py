"""Robust peak statistics: a few outliers and the number of maps do not decide."""

import math

import numpy as np
import pytest

from audit.scan.robust import (
    PeakPlace,
    fixed_place_score,
    modal_place,
    peak_place,
    place_radius,
    share_lower_bound,
    share_within,
)


def cloud(kind, n, seed=0):
    """Peaks of n maps: 'corner' (a pasted cue at (0.9, 0.9), pixel jitter), 'moving' (object anywhere),
    'quadrant' (objects in the lower-left quarter), 'centre' (a fixed place at the centre)."""
    rng = np.random.default_rng(seed)
    if kind == "corner":
        return 0.9 + rng.normal(0, 0.01, n), 0.9 + rng.normal(0, 0.01, n)
    if kind == "moving":
        return rng.uniform(0.1, 0.9, n), rng.uniform(0.1, 0.9, n)
    if kind == "quadrant":
        return rng.uniform(0.1, 0.4, n), rng.uniform(0.6, 0.9, n)
    if kind == "centre":
        return 0.5 + rng.normal(0, 0.01, n), 0.5 + rng.normal(0, 0.01, n)
    raise ValueError(kind)


def with_outliers(x, y, frac, seed=1):
    """Replace a share ``frac`` of the peaks by peaks anywhere (here: the far corner and random)."""
    rng = np.random.default_rng(seed)
    x, y = x.copy(), y.copy()
    k = int(round(frac * len(x)))
    idx = rng.choice(len(x), k, replace=False)
    x[idx[: k // 2]], y[idx[: k // 2]] = 0.05, 0.05
    x[idx[k // 2:]], y[idx[k // 2:]] = rng.uniform(0, 1, k - k // 2), rng.uniform(0, 1, k - k // 2)
    return x, y


# (name, kind, n, outliers, score)
CASES = [
    ("pasted cue", "corner", 200, 0.0, 1.0),
    ("pasted cue, 4% outliers", "corner", 200, 0.04, 1.0),
    ("pasted cue, 4% outliers, 20,000 maps", "corner", 20000, 0.04, 1.0),
    ("pasted cue, 30% elsewhere", "corner", 400, 0.30, 0.22),
    ("pasted cue, 8 maps", "corner", 8, 0.0, 0.77),
    ("6 of 8 maps at one place", "corner", 8, 0.25, 0.0),
    ("objects anywhere", "moving", 400, 0.0, 0.0),
    ("objects in one quarter", "quadrant", 400, 0.0, 0.0),
    ("fixed place at the centre", "centre", 200, 0.0, 0.0),
]


@pytest.mark.parametrize("name,kind,n,frac,score", CASES, ids=[c[0] for c in CASES])
def test_fixed_place_case_table(name, kind, n, frac, score):
    x, y = with_outliers(*cloud(kind, n), frac)
    assert fixed_place_score(peak_place(x, y)) == pytest.approx(score, abs=0.05)


def test_outliers_do_not_move_the_answer():
    x, y = cloud("corner", 500)
    clean = peak_place(x, y)
    dirty = peak_place(*with_outliers(x, y, 0.04))
    assert (dirty.x, dirty.y) == pytest.approx((clean.x, clean.y), abs=0.005)
    assert clean.share == pytest.approx(1.0)
    assert dirty.share == pytest.approx(0.96, abs=0.005)
    # the standard deviation these replace is dominated by the same 4%
    assert np.hypot(*map(np.std, with_outliers(x, y, 0.04))) > 10 * np.hypot(x.std(), y.std())


def test_copies_with_noise_give_the_same_place():
    x, y = with_outliers(*cloud("corner", 200), 0.04)
    rng = np.random.default_rng(5)
    X = np.repeat(x, 100) * (1 + rng.normal(0, 0.005, 20000))
    Y = np.repeat(y, 100) * (1 + rng.normal(0, 0.005, 20000))
    a, b = peak_place(x, y), peak_place(X, Y)
    assert (b.x, b.y) == pytest.approx((a.x, a.y), abs=0.01)
    assert b.share == pytest.approx(a.share, abs=0.01)
    assert fixed_place_score(a) == fixed_place_score(b) == 1.0


def test_share_within_matches_a_float64_reference():
    rng = np.random.default_rng(3)
    x, y = rng.random(300), rng.random(300)
    x[::7] = np.nan
    ref = np.mean([math.hypot(a - 0.4, b - 0.6) <= 0.2 for a, b in zip(x, y) if not math.isnan(a)])
    assert share_within(x, y, 0.4, 0.6, 0.2) == pytest.approx(ref, abs=1e-12)


def test_mode_of_a_cluster_straddling_bin_edges():
    # 60 points around (0.5, 0.5), exactly on a bin corner for radius 0.05; 40 spread out
    rng = np.random.default_rng(0)
    x = np.r_[0.5 + rng.normal(0, 0.008, 60), rng.uniform(0, 1, 40)]
    y = np.r_[0.5 + rng.normal(0, 0.008, 60), rng.uniform(0, 1, 40)]
    mx, my = modal_place(x, y, 0.05)
    assert (mx, my) == pytest.approx((x[:60].mean(), y[:60].mean()), abs=0.01)


def test_mode_prefers_the_larger_of_two_places():
    x = np.r_[np.full(30, 0.1), np.full(31, 0.8)]
    y = np.r_[np.full(30, 0.1), np.full(31, 0.7)]
    assert modal_place(x, y) == pytest.approx((0.8, 0.7))
    assert share_within(x, y, 0.8, 0.7) == pytest.approx(31 / 61)


def test_mode_of_a_ring_has_peaks_at_it():
    # peaks on a ring around an empty centre: the densest bin's centre may have no peak within the
    # radius; the mode must still sit among peaks
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    x, y = 0.5 + 0.2 * np.cos(t), 0.5 + 0.2 * np.sin(t)
    p = peak_place(x, y, 0.05)
    assert p.share >= 2 / 40
    assert abs(np.hypot(p.x - 0.5, p.y - 0.5) - 0.2) < 0.05


@pytest.mark.parametrize("share,n,expected", [(0.75, 8, 0.5237), (1.0, 8, 8 / (8 + 1.2816 ** 2)),
                                              (0.875, 8, 0.6604), (0.96, 200, 0.9382), (0.96, 20000, 0.9582),
                                              (0.5, 100, 0.4364)])
def test_share_lower_bound_is_wilsons(share, n, expected):
    # Wilson score interval, one-sided 90% (z = 1.2816); all n of n gives n / (n + z^2)
    assert share_lower_bound(share, n) == pytest.approx(expected, abs=1e-4)
    assert math.isnan(share_lower_bound(0.5, 0))


def test_no_peaks():
    p = peak_place([np.nan, np.nan], [np.nan, 0.3])
    assert p.n == 0 and math.isnan(p.x) and math.isnan(p.share)
    assert fixed_place_score(p) == 0.0
    assert fixed_place_score(PeakPlace(0.9, 0.9, math.nan)) == 0.0


@pytest.mark.parametrize("side,expected", [(None, 0.05), (16, 0.05), (7, 0.75 / 7), (14, 0.75 / 14), (0, 0.05)])
def test_place_radius(side, expected):
    assert place_radius(side) == pytest.approx(expected)
