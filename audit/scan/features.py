"""What the scan knows about a group of records (a class or a cluster), from its heatmaps.

:func:`group_features` turns the records of a group (their per-map statistics)
and their maps on a small grid into a :class:`GroupFeatures`: counts,
accuracy, the mean of every statistic, how the peaks spread, the candidate
cue :class:`Place` s and the mean map's hot area.  :func:`spurious_gap`
relates where the model looks to whether it is right.  Pure functions of
arrays and data frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from audit.engine.stats import box_mask, normalize
from audit.scan.config import BORDER_AREA, DEFAULT, Config
from audit.scan.grids import cells_box, hot_cells
from audit.scan.robust import PeakPlace, peak_place, place_radius

STAT_MEANS = ("energy_object", "pointing_hit", "energy_border", "entropy", "peak_x", "peak_y",
              "centroid_x", "centroid_y", "concentration", "object_x", "object_y")


@dataclass(frozen=True)
class Place:
    """A candidate cue place and the group's mean attention on it.

    ``kind``: ``region`` (a named region of the job), ``border`` (the outer
    10% band) or ``fixed`` (where the peaks stay); ``share``: mean share of the
    energy there; ``area``: its share of the image; ``box``: (x0, y0, x1, y1)
    as fractions, or None.
    """

    kind: str
    name: str
    share: float = math.nan
    area: float = math.nan
    box: list | None = None


@dataclass
class GroupFeatures:
    """Everything the verdict needs about a group of records."""

    n_total: int  # records of the group, any status
    n: int  # status ok: the heatmaps that count
    n_flat: int = 0
    n_error: int = 0
    accuracy: float = math.nan
    means: dict = field(default_factory=dict)  # mean of each statistic over the ok rows
    n_masked: int = 0
    peak_place: PeakPlace = field(default_factory=PeakPlace)  # modal place of the peaks, share at it
    object_spread: float = math.nan
    peak_object_dist: float = math.nan
    places: list = field(default_factory=list)  # [Place]
    mean_map: np.ndarray | None = None  # (g, g), max 1
    hot_box: list | None = None
    hot_xy: tuple = (math.nan, math.nan)
    hot_area: float = math.nan


def _accuracy(rows, status) -> float:
    if "correct" not in rows:
        return math.nan
    c = rows.loc[status != "error", "correct"].dropna()
    return float(c.astype(float).mean()) if len(c) else math.nan


def _spread(x: np.ndarray, y: np.ndarray) -> float:
    good = np.isfinite(x) & np.isfinite(y)
    return float(np.sqrt(x[good].var() + y[good].var())) if good.sum() >= 2 else math.nan


def _cam_side(ok) -> float | None:
    """The smaller side of the group's raw maps in cells (the median over its maps), or None."""
    if "cam_h" not in ok or "cam_w" not in ok or not len(ok):
        return None
    side = np.minimum(ok["cam_h"].to_numpy(dtype=float, na_value=np.nan),
                      ok["cam_w"].to_numpy(dtype=float, na_value=np.nan))
    side = side[np.isfinite(side)]
    return float(np.median(side)) if len(side) else None


def _places(means: dict, regions: dict, size) -> list[Place]:
    """Each named region and the border band, with the group's mean share on it."""
    places = [Place("region", r, means[f"energy_{r}"], float(box_mask(box, size).mean()),
                    [float(v) for v in box]) for r, box in regions.items()]
    places.append(Place("border", "border", means["energy_border"], BORDER_AREA, None))
    return places


def _add_mean_map(f: GroupFeatures, grids) -> None:
    """Mean map, its hot cells' box, weighted centre and area."""
    if grids is None or not len(grids):
        return
    mm = np.asarray(grids).mean(axis=0, dtype=np.float64)
    f.mean_map = normalize(mm)
    hot = hot_cells(mm)
    f.hot_box = cells_box(hot)
    g = mm.shape[0]
    cy, cx = np.nonzero(hot)
    w = mm[hot]
    if w.sum() > 0:
        f.hot_xy = (float(((cx + 0.5) / g * w).sum() / w.sum()), float(((cy + 0.5) / g * w).sum() / w.sum()))
    f.hot_area = float(hot.mean())


def group_features(rows, grids=None, regions=None, cfg: Config = DEFAULT, size=(224, 224)) -> GroupFeatures:
    """Everything :func:`audit.scan.verdict.assess` needs about a group of records.

    Args:
        rows: pandas DataFrame of records (status, correct, statistics); only
            ``status == "ok"`` rows count for the attention, all non-error rows
            for the accuracy.
        grids: (m, g, g) energy distributions of (a sample of) the ok rows, or None.
        regions: ``{name: box}`` of the job.
        cfg: the scan's thresholds.
        size: the model input (H, W), for the pixel area of each region.

    Returns:
        A :class:`GroupFeatures`.
    """
    regions = dict(regions or {})
    status = rows["status"].to_numpy() if "status" in rows else np.full(len(rows), "ok", object)
    ok = rows[status == "ok"]

    def col(name):
        return ok[name].to_numpy(dtype=float, na_value=np.nan) if name in ok else np.full(len(ok), np.nan)

    def mean(name):
        v = col(name)
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else math.nan

    means = {name: mean(name) for name in STAT_MEANS}
    for r in regions:
        means[f"energy_{r}"] = mean(f"energy_{r}")
    px, py, ox, oy = col("peak_x"), col("peak_y"), col("object_x"), col("object_y")
    both = np.isfinite(px) & np.isfinite(py) & np.isfinite(ox) & np.isfinite(oy)
    f = GroupFeatures(
        n_total=int(len(rows)), n=int(len(ok)), n_flat=int((status == "flat").sum()),
        n_error=int((status == "error").sum()), accuracy=_accuracy(rows, status), means=means,
        n_masked=int(np.isfinite(col("energy_object")).sum()),
        peak_place=peak_place(px, py, place_radius(_cam_side(ok), cfg.place_radius, cfg.place_radius_cells), cfg.share_z),
        object_spread=_spread(ox, oy),
        peak_object_dist=float(np.hypot(px[both] - ox[both], py[both] - oy[both]).mean()) if both.any()
        else math.nan,
        places=_places(means, regions, size))
    _add_mean_map(f, grids)
    return f


# ----------------------------------------------------------------------------
# Spurious gap
# ----------------------------------------------------------------------------


def spurious_gap(score, correct, min_quarter: int = 3) -> float:
    """Accuracy of the quarter with the highest ``score`` minus the quarter with the lowest.

    ``score`` is off-object or cue attention per image.  Negative: the more
    the attention sits on the cue, the more often the model is wrong (on data
    where the cue does not hold).  NaN with too few labelled images.
    """
    s = np.asarray(score, float)
    c = np.asarray(correct, float)
    ok = np.isfinite(s) & np.isfinite(c)
    s, c = s[ok], c[ok]
    q = len(s) // 4
    if q < min_quarter:
        return math.nan
    order = np.argsort(s, kind="stable")
    return float(c[order[-q:]].mean() - c[order[:q]].mean())


def gap_scores(rows, f: GroupFeatures, masked: bool, cue_kind: str, cue: str, grids=None,
               grid_index=None) -> np.ndarray:
    """Per-row score for the spurious gap (NaN where not known).

    With masks: the attention off the object; else the share on the cue
    (region, border) or in the hot area of the group's mean map.
    """
    n = len(rows)
    if masked:
        return 1.0 - rows["energy_object"].to_numpy(dtype=float, na_value=np.nan)
    if cue_kind == "region":
        return rows[f"energy_{cue.split(':', 1)[1]}"].to_numpy(dtype=float, na_value=np.nan)
    if cue_kind == "border":
        return rows["energy_border"].to_numpy(dtype=float, na_value=np.nan)
    out = np.full(n, np.nan)
    if grids is not None and grid_index is not None and f.mean_map is not None:
        hot = hot_cells(f.mean_map)
        share = np.asarray(grids)[:, hot].sum(axis=1, dtype=np.float64)
        gi = np.asarray(grid_index, np.int64)
        out[gi >= 0] = share[gi[gi >= 0]]
    return out
