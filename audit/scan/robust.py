"""Where do a group's heatmap peaks sit?  Robust statistics that a few outliers cannot move.

A pasted cue (a watermark, a stamp, a tag) puts the peak of nearly every map
of a class at one place.  A standard deviation of the peaks does not show it
once a few maps peak elsewhere: 4% of maps in the opposite corner raise the
spread from 0.00 to about 0.2, and the more maps a class has the more such
outliers it has.  So the scan describes the peaks by

* the **modal place**: the densest spot of the peaks (a 2-D histogram with
  bins one radius wide, smoothed over 3 x 3 bins, its fullest bin, then moved
  to the mean of the peaks within the radius until it stays put), and
* the **share within the radius** of it: 0.96 when 4% of the maps peak
  elsewhere, whatever their number and wherever they are.

Both are proportions of the group, so they do not change when the group is
copied 100 times.  Pure functions of arrays; :func:`fixed_place_score`
turns them into the verdict's fixed-place score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audit.scan.config import DEFAULT, Config

_MEAN_SHIFT_STEPS = 10


@dataclass(frozen=True)
class PeakPlace:
    """The modal place of a group's peaks and the share of peaks at it.

    ``x``, ``y``: the modal place (fractions of the image; NaN without
    peaks); ``share``: the share of the peaks within ``radius`` of it
    (0..1; NaN without peaks); ``n``: the number of finite peaks.
    """

    x: float = math.nan
    y: float = math.nan
    share: float = math.nan
    radius: float = Config.place_radius
    n: int = 0
    z: float = Config.share_z  # the bound of share_low (one-sided 90%)

    @property
    def share_low(self) -> float:
        """The lower one-sided 90% confidence bound of ``share`` (:func:`share_lower_bound`)."""
        return share_lower_bound(self.share, self.n, self.z)


def share_lower_bound(share: float, n: int, z: float = Config.share_z) -> float:
    """Wilson's lower confidence bound of a proportion ``share`` observed in ``n`` trials (NaN if n = 0).

    A few maps at one place are weak evidence: a cluster of 8 maps with 6
    peaks together has a share of 0.75 but a bound of 0.52; with many maps
    the bound is the share.
    """
    if not n or not math.isfinite(share):
        return math.nan
    z2 = z * z
    centre = share + z2 / (2 * n)
    half = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    return (centre - half) / (1 + z2 / n)


def place_radius(cam_side: float | None = None, base: float = Config.place_radius,
                 cells: float = Config.place_radius_cells) -> float:
    """The radius of a place: ``base``, or ``cells`` map cells when the map is coarser.

    Args:
        cam_side: the smaller side of the raw maps in cells (``min(cam_h,
            cam_w)``), or None when not known.
        base: the radius on fine maps, fraction of the image side.

    Returns:
        ``max(base, cells / cam_side)``.
    """
    if cam_side is None or not math.isfinite(cam_side) or cam_side <= 0:
        return base
    return max(base, cells / float(cam_side))


def _finite_xy(px, py) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(px, np.float64).ravel()
    y = np.asarray(py, np.float64).ravel()
    good = np.isfinite(x) & np.isfinite(y)
    return x[good], y[good]


def _densest_bin(x: np.ndarray, y: np.ndarray, radius: float) -> tuple[float, float]:
    """Where to start: the fullest bin of a 2-D histogram (bins ``radius`` wide) smoothed over 3 x 3 bins.

    Returns the mean of the points in the 3 x 3 bins around it (the bin's
    centre itself may have no point within the radius).
    """
    nb = max(1, int(math.ceil(1.0 / radius)))
    ix = np.clip((x * nb).astype(np.int64), 0, nb - 1)
    iy = np.clip((y * nb).astype(np.int64), 0, nb - 1)
    h = np.bincount(iy * nb + ix, minlength=nb * nb).reshape(nb, nb).astype(np.float64)
    p = np.pad(h, 1)
    s = sum(p[1 + dy:1 + dy + nb, 1 + dx:1 + dx + nb] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    # ties: the bin holding most peaks itself, then the first in row-major order
    by, bx = divmod(int(np.lexsort((-h.ravel(), -s.ravel()))[0]), nb)
    near = (np.abs(ix - bx) <= 1) & (np.abs(iy - by) <= 1)
    return float(x[near].mean()), float(y[near].mean())


def modal_place(px, py, radius: float = Config.place_radius) -> tuple[float, float]:
    """The densest place of a cloud of points (mode of a 2-D histogram, refined by mean shift).

    Args:
        px, py: the points (fractions of the image); NaN pairs are ignored.
        radius: the bin width and the mean-shift window.

    Returns:
        ``(x, y)``, or ``(nan, nan)`` without finite points.
    """
    x, y = _finite_xy(px, py)
    if len(x) == 0:
        return math.nan, math.nan
    cx, cy = _densest_bin(x, y, radius)
    r2 = radius * radius
    near = (x - cx) ** 2 + (y - cy) ** 2 <= r2
    for _ in range(_MEAN_SHIFT_STEPS):  # mean shift, as long as it gathers no fewer points
        if not near.any():
            break
        nx, ny = float(x[near].mean()), float(y[near].mean())
        moved = (x - nx) ** 2 + (y - ny) ** 2 <= r2
        if math.hypot(nx - cx, ny - cy) < 1e-6 or moved.sum() < near.sum():
            break
        cx, cy, near = nx, ny, moved
    return float(cx), float(cy)


def share_within(px, py, x: float, y: float, radius: float = Config.place_radius) -> float:
    """Share of the finite points within ``radius`` of ``(x, y)`` (NaN without points)."""
    a, b = _finite_xy(px, py)
    if len(a) == 0 or not (math.isfinite(x) and math.isfinite(y)):
        return math.nan
    return float(((a - x) ** 2 + (b - y) ** 2 <= radius * radius).mean())


def peak_place(px, py, radius: float = Config.place_radius, z: float = Config.share_z) -> PeakPlace:
    """The modal place of the peaks ``(px, py)`` and the share of peaks within ``radius`` of it.

    Args:
        px, py: the peaks of a group's maps (``peak_x``, ``peak_y``);
            NaN pairs (flat maps) are ignored.
        radius: see :func:`place_radius`.

    Returns:
        A :class:`PeakPlace` (NaN fields without finite peaks).
    """
    x, y = _finite_xy(px, py)
    if len(x) == 0:
        return PeakPlace(radius=radius, z=z)
    mx, my = modal_place(x, y, radius)
    return PeakPlace(mx, my, share_within(x, y, mx, my, radius), radius, int(len(x)), z)


def _ramp(v: float, lo: float, hi: float) -> float:
    return 0.0 if not math.isfinite(v) else min(1.0, max(0.0, (v - lo) / (hi - lo)))


def fixed_place_score(place: PeakPlace, cfg: Config = DEFAULT) -> float:
    """0..1: the peaks stay at one place away from the image centre.

    ``ramp(share_low, place_share_low -> place_share_high) x ramp(distance
    of the modal place from the centre, centre_near -> centre_far)`` (``cfg``), where
    ``share_low`` is the share's lower confidence bound (few maps are weak
    evidence).  A pasted cue keeps nearly every peak within the radius
    (share 0.9 and more even with 10% of the maps elsewhere); a healthy class
    whose objects move, or a cluster of it whose objects sit in one part of
    the image, keeps few (a spread of 0.05 of the image in each direction
    puts 0.4 of the peaks within 0.05 of the mode).
    """
    if not (math.isfinite(place.x) and math.isfinite(place.y)):
        return 0.0
    off = math.hypot(place.x - 0.5, place.y - 0.5)
    return _ramp(place.share_low, cfg.place_share_low, cfg.place_share_high) * _ramp(off, cfg.centre_near, cfg.centre_far)
