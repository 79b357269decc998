"""A minority strategy inside a one-cluster class: the maps peaking at one off-centre place are split off."""

import numpy as np
import pandas as pd
import pytest

from audit.scan.config import DEFAULT
from audit.scan.pipeline import ClassGroup, minority_split
from audit.scan.robust import peak_place


def _group(n_corner: int, n_rest: int, corner=(0.1, 0.9), seed=0):
    """A class whose ``n_corner`` maps peak at ``corner`` (small jitter) and ``n_rest`` peak anywhere."""
    rng = np.random.default_rng(seed)
    px = np.concatenate([corner[0] + rng.normal(0, 0.01, n_corner), rng.uniform(0.1, 0.9, n_rest)])
    py = np.concatenate([corner[1] + rng.normal(0, 0.01, n_corner), rng.uniform(0.1, 0.9, n_rest)])
    n = n_corner + n_rest
    rows = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "peak_x": px, "peak_y": py})
    g = ClassGroup(0, "c", rows, rows["image_id"].to_numpy(), grids=np.zeros((n, 4, 4), np.float16),
                   row_grid=np.arange(n))
    f = type("F", (), {"peak_place": peak_place(px, py, DEFAULT.place_radius)})()
    return g, f


@pytest.mark.parametrize("n_corner, n_rest, split", [
    (25, 75, True),    # a quarter of the class stamps a corner: its own group
    (40, 60, True),
    (5, 95, False),    # below the minority share: no group
    (80, 20, False),   # most of the class: the class as a whole has the fixed place
    (6, 14, False),    # too few maps for a group of the minimum size
])
def test_minority_split_case_table(n_corner, n_rest, split):
    g, f = _group(n_corner, n_rest)
    labels, k = minority_split(g, f, DEFAULT, min_size=8)
    assert (k == 2) == split
    if split:
        assert labels[:n_corner].all()  # every corner map is in the group
        assert labels[n_corner:].sum() <= 0.05 * n_rest + 1  # and (nearly) none of the others


def test_central_place_is_never_split_off():
    g, f = _group(30, 70, corner=(0.55, 0.45))
    labels, k = minority_split(g, f, DEFAULT, min_size=8)
    assert k == 1 and not labels.any()
