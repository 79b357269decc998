"""Spurious-attention statistics of a batch of heatmaps (pure NumPy).

:func:`map_stats` turns raw CAM maps into the per-map statistics of the
records table (docs/scan.md, "Per-map statistics").  Conventions, all in one place:

* Every map is first resized (bilinear, OpenCV half-pixel centres, the same
  as :func:`audit.review.viz.resize_map`) to the model input size (H, W); then
  ``energy = ReLU(map)`` and ``p = energy / energy.sum()`` (a distribution
  over the H*W pixels).
* **Pixel centres.**  Pixel (row i, column j) sits at
  ``x = (j + 0.5) / W``, ``y = (i + 0.5) / H`` (fractions of width and
  height, 0 = left/top, 1 = right/bottom).  Peaks, centroids and object
  centres use these coordinates; a box ``(x0, y0, x1, y1)`` (fractions)
  contains the pixels whose centre satisfies ``x0 <= x < x1`` and
  ``y0 <= y < y1`` (``x1 = 1`` / ``y1 = 1`` include the last column/row).
* ``energy_border``: share of energy in the pixels *outside* the box
  (0.1, 0.1, 0.9, 0.9), i.e. the outer 10% band on every side.
* ``energy_<region>``: share of energy inside the named region box.
* ``entropy``: Shannon entropy of ``p`` divided by ``log(H*W)`` (0 = all
  energy on one pixel, 1 = uniform).
* ``concentration``: share of energy in the ``ceil(0.1 * H * W)``
  highest-energy pixels (0.1 = uniform, 1 = all inside the top 10%).
* ``peak_x``/``peak_y``: centre of the highest-energy pixel (the first one in
  row-major order on ties).  ``centroid_x``/``centroid_y``: energy-weighted
  mean of pixel centres.
* With an object mask: ``energy_object`` = share of energy on the mask
  (relevance mass accuracy), ``pointing_hit`` = 1.0 when the peak pixel is on
  the mask else 0.0, ``object_x``/``object_y`` = mean of the mask's pixel
  centres.  Without a mask, or with an empty mask (the object is absent from
  the image), these four are NaN.
* ``pointing_hit`` is returned as float32 1.0 / 0.0 / NaN (the records table
  stores it as a nullable bool: NaN -> null, see :func:`to_arrow_columns`).
* A map that is all zero after ReLU or that has any non-finite value gets
  ``status = "flat"`` and NaN (null) in every statistic.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

BORDER = 0.1  # width of the border band, fraction of each side
TOP_FRACTION = 0.1  # concentration: share of energy in this top fraction of pixels
_CV_MAX_CHANNELS = 128  # cv2.resize takes at most 128 channels per call (OpenCV 5; 512 in 4.x)
STAT_NAMES = (
    "energy_object", "pointing_hit", "energy_border", "entropy", "peak_x", "peak_y",
    "centroid_x", "centroid_y", "concentration", "object_x", "object_y",
)


def stat_columns(regions=()) -> list[str]:
    """Names of the per-map statistic columns, in the records schema's order."""
    return list(STAT_NAMES) + [f"energy_{r}" for r in regions]


def resize_maps(maps: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to (N, H, W), whole batch per OpenCV call."""
    maps = np.asarray(maps, np.float32)
    n, h, w = maps.shape
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return maps.copy()
    out = np.empty((n, H, W), np.float32)
    for s in range(0, n, _CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(maps[s:s + _CV_MAX_CHANNELS].transpose(1, 2, 0))
        r = cv2.resize(chunk, (W, H), interpolation=cv2.INTER_LINEAR)
        out[s:s + chunk.shape[2]] = r.reshape(H, W, -1).transpose(2, 0, 1)
    return out


def box_mask(box, size) -> np.ndarray:
    """(H, W) bool mask of a fractional box ``(x0, y0, x1, y1)`` by pixel centres."""
    H, W = int(size[0]), int(size[1])
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = (np.arange(W) + 0.5) / W
    ys = (np.arange(H) + 0.5) / H
    inx = (xs >= x0) & ((xs < x1) | (x1 >= 1.0))
    iny = (ys >= y0) & ((ys < y1) | (y1 >= 1.0))
    return iny[:, None] & inx[None, :]


def border_mask(size, width: float = BORDER) -> np.ndarray:
    """(H, W) bool mask of the outer band (``width`` of each side)."""
    return ~box_mask((width, width, 1.0 - width, 1.0 - width), size)


def _as_masks(masks, n, size):
    m = np.asarray(masks)
    if m.ndim == 2:
        m = np.broadcast_to(m, (n, *m.shape))
    if m.shape[0] != n:
        raise ValueError(f"masks has {m.shape[0]} entries for {n} maps")
    m = m != 0
    H, W = int(size[0]), int(size[1])
    if m.shape[1:] != (H, W):  # nearest-neighbour to the input size
        m = resize_maps(m.astype(np.float32), size) >= 0.5
    return m


@functools.lru_cache(maxsize=16)
def _linear_basis(size, regions):
    """(x of each pixel, y of each pixel, (H*W, 3 + R) matrix: x, y, border band, region boxes)."""
    H, W = size
    gx = np.tile((np.arange(W) + 0.5) / W, H)  # row-major pixel centres
    gy = np.repeat((np.arange(H) + 0.5) / H, W)
    cols = [gx, gy, border_mask((H, W)).reshape(-1)]
    cols += [box_mask(box, (H, W)).reshape(-1) for _, box in regions]
    lin = np.stack(cols, axis=1).astype(np.float64)
    for a in (gx, gy, lin):
        a.setflags(write=False)
    return gx, gy, lin


def _top_k_sums(e: np.ndarray, total: np.ndarray, k: int) -> np.ndarray:
    """Sum of the ``k`` largest values of each row of ``e`` (float32, >= 0), in float64.

    A row with at most ``k`` positive values (a CAM after ReLU is often mostly
    zero) sums to its total without any selection: that is also where
    ``np.partition`` is slowest (many equal values).  The other rows are
    partitioned as int32: non-negative float32 values order like their bit
    patterns, and the integer selection is faster.
    """
    out = np.array(total, np.float64)
    npx = e.shape[1]
    big = (e > 0).sum(axis=1) > k
    if big.any():
        bits = np.ascontiguousarray(e[big] if not big.all() else e).view(np.int32)
        top = np.partition(bits, npx - k, axis=1)[:, npx - k:].view(np.float32)
        out[big] = top.sum(axis=1, dtype=np.float64)
    return out


def map_stats(maps, size, masks=None, has_mask=None, regions=None) -> dict[str, np.ndarray]:
    """Statistics of a batch of raw maps; see the module docstring for definitions.

    Args:
        maps: (N, h, w) raw maps, any scale; NaN/inf allowed (-> ``flat``).
        size: (H, W) model input size; maps are resized to it.
        masks: None or (N, H, W) bool object masks (non-zero = object).
        has_mask: (N,) bool, which rows have a real mask; None means all rows
            do when ``masks`` is given.
        regions: ``{name: (x0, y0, x1, y1)}`` boxes as fractions of the image.

    Returns:
        ``{column: (N,) float32}`` for every name in
        :func:`stat_columns` (NaN = null) plus ``"status"``,
        an (N,) object array of ``"ok"`` / ``"flat"``.
    """
    regions = dict(regions or {})
    raw = np.asarray(maps, np.float32)
    if raw.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {raw.shape}")
    n = raw.shape[0]
    H, W = int(size[0]), int(size[1])
    out = {c: np.full(n, np.nan, np.float32) for c in stat_columns(list(regions))}
    out["status"] = np.full(n, "flat", dtype=object)
    if n == 0:
        return out
    e, total, ok = _energy(raw, (H, W))
    out["status"][ok] = "ok"
    if not ok.any():
        return out
    e_ok = e if ok.all() else e[ok]
    tot = total[ok]
    p = e_ok.astype(np.float64)
    p /= tot[:, None]  # (k, H*W) distribution per map
    peak = e_ok.argmax(axis=1)  # p is e scaled per row: same order, same first-on-ties
    for name, values in _place_stats(p, e_ok, tot, peak, (H, W), regions).items():
        out[name][ok] = np.asarray(values, np.float32)
    if masks is not None:
        _object_stats(out, p, peak, ok, _as_masks(masks, n, (H, W)).reshape(n, H * W), has_mask, (H, W))
    return out


def _energy(raw: np.ndarray, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, H*W) float32 ReLU'd energy at ``size``, its (N,) float64 totals, and which maps are usable."""
    n = raw.shape[0]
    finite_px = np.isfinite(raw)
    finite = finite_px.reshape(n, -1).all(axis=1)
    e = resize_maps(raw if finite.all() else np.where(finite_px, raw, 0.0), size)
    np.maximum(e, 0.0, out=e)
    e = e.reshape(n, -1)
    total = e.sum(axis=1, dtype=np.float64)
    return e, total, finite & (total > 0) & np.isfinite(total)


def _place_stats(p, e_ok, tot, peak, size, regions) -> dict[str, np.ndarray]:
    """Peak, centroid, border and region shares, entropy and concentration of usable maps."""
    H, W = size
    npx = H * W
    # every linear statistic in one product: x, y of pixel centres, the border band, the regions
    gx, gy, lin = _linear_basis((H, W), tuple((k, tuple(float(v) for v in b)) for k, b in regions.items()))
    proj = p @ lin
    res = {"peak_x": gx[peak], "peak_y": gy[peak], "centroid_x": proj[:, 0], "centroid_y": proj[:, 1],
           "energy_border": proj[:, 2]}
    for j, name in enumerate(regions):
        res[f"energy_{name}"] = proj[:, 3 + j]
    logp = np.zeros_like(p)
    np.log(p, out=logp, where=p > 0)
    logp *= p
    res["entropy"] = np.abs(logp.sum(axis=1)) / math.log(npx) if npx > 1 else np.zeros(len(p))
    top = _top_k_sums(e_ok, tot, max(1, math.ceil(TOP_FRACTION * npx)))
    res["concentration"] = np.minimum(top / tot, 1.0)
    return res


def _object_stats(out, p, peak, ok, m, has_mask, size) -> None:
    """Fill the object columns of ``out`` for usable maps whose mask has object pixels."""
    n = len(ok)
    gx, gy, _ = _linear_basis(size, ())
    hm = np.ones(n, bool) if has_mask is None else np.asarray(has_mask, bool).reshape(n)
    area = m.sum(axis=1)
    valid = hm & (area > 0)  # a mask with no object pixel: the object is absent
    rows = valid & ok
    if not rows.any():
        return
    sel = valid[ok]  # rows of p that have a usable mask
    mo = m[rows].astype(np.float64)
    out["energy_object"][rows] = (p[sel] * mo).sum(axis=1)
    out["pointing_hit"][rows] = m[rows, peak[sel]].astype(np.float32)
    out["object_x"][rows] = (mo @ gx) / area[rows]
    out["object_y"][rows] = (mo @ gy) / area[rows]


def to_arrow_columns(stats: dict[str, np.ndarray]) -> dict:
    """Stats as pyarrow arrays for the records table (NaN -> null, pointing_hit -> bool)."""
    import pyarrow as pa

    cols = {}
    for name, v in stats.items():
        if name == "status":
            continue
        v = np.asarray(v, np.float32)
        null = np.isnan(v)
        if name == "pointing_hit":
            cols[name] = pa.array(v > 0.5, pa.bool_(), mask=null)
        else:
            cols[name] = pa.array(v, pa.float32(), mask=null)
    return cols


def normalize(cam: np.ndarray) -> np.ndarray:
    """ReLU then scale to [0, 1] by the maximum; an all-zero or non-finite map gives zeros."""
    m = np.nan_to_num(np.asarray(cam, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    m = np.maximum(m, 0.0)
    top = float(m.max()) if m.size else 0.0
    return m / top if top > 0 else np.zeros_like(m)


def resize_map(cam: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of a (h, w) map to ``size`` = (H, W)."""
    h, w = int(size[0]), int(size[1])
    return cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
