"""Heatmaps on a small grid: raw maps -> (n, g, g) energy distributions, read from the records.

The scan judges a class by its maps resized to ``Config.grid`` x ``Config.grid``
(energy distributions that sum to 1). :func:`read_class_maps` streams the
``cam`` column of the records and converts all of a view's maps, batch by
batch, into float16 grids grouped by class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audit.engine.stats import resize_maps


def grids_from_cams(cams, h: int, w: int, grid: int) -> np.ndarray:
    """Raw maps (list of row-major (h*w,) arrays) -> (n, grid, grid) energy distributions.

    Resized (bilinear) then ReLU'd, like :func:`audit.engine.stats.map_stats`, and
    normalised to sum 1.  A map without energy becomes all zeros.
    """
    n = len(cams)
    if n == 0:
        return np.zeros((0, grid, grid), np.float32)
    raw = np.stack([np.asarray(c, np.float32) for c in cams]).reshape(n, int(h), int(w))
    return grids_from_raw(raw, grid)


def grids_from_raw(raw: np.ndarray, grid: int) -> np.ndarray:
    """(n, h, w) raw maps -> (n, grid, grid) float32 energy distributions (see :func:`grids_from_cams`)."""
    raw = np.asarray(raw, np.float32)
    if len(raw) == 0:
        return np.zeros((0, grid, grid), np.float32)
    if not np.isfinite(raw).all():
        raw = np.where(np.isfinite(raw), raw, np.float32(0))
    g = resize_maps(raw, (grid, grid))
    np.maximum(g, 0, out=g)
    tot = g.sum(axis=(1, 2), keepdims=True, dtype=np.float64)
    g /= np.where(tot > 0, tot, 1.0).astype(np.float32)  # a map without energy stays all zeros
    return g


def pool2(grids: np.ndarray) -> np.ndarray:
    """Sum-pool (n, g, g) distributions by 2 -> (n, g/2, g/2)."""
    n, g, _ = grids.shape
    return grids.reshape(n, g // 2, 2, g // 2, 2).sum(axis=(2, 4))


def hot_cells(mean_map: np.ndarray, rel: float = 0.5) -> np.ndarray:
    """Cells of a mean map holding at least ``rel`` times its maximum."""
    top = float(mean_map.max()) if mean_map.size else 0.0
    return mean_map >= rel * top if top > 0 else np.zeros_like(mean_map, bool)


def cells_box(cells: np.ndarray) -> list[float] | None:
    """Bounding box (x0, y0, x1, y1 as fractions) of the True cells; None when there are none."""
    if not cells.any():
        return None
    g_h, g_w = cells.shape
    ys, xs = np.nonzero(cells)
    return [xs.min() / g_w, ys.min() / g_h, (xs.max() + 1) / g_w, (ys.max() + 1) / g_h]


@dataclass
class ClassMaps:
    """The maps of one class on the grid: ``image_ids`` (n,) object array, ``grids`` (n, g, g) float16."""

    image_ids: np.ndarray
    grids: np.ndarray


def _batch_grids(batch, grid: int):
    """(targets, image ids, float16 grids) of the well-formed maps of one record batch, vectorised."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cams = batch.column("cam")
    hs = batch.column("cam_h").to_numpy(zero_copy_only=False).astype(np.float64)
    ws = batch.column("cam_w").to_numpy(zero_copy_only=False).astype(np.float64)
    tg = batch.column("target").to_numpy(zero_copy_only=False).astype(np.float64)
    lens = pc.fill_null(pc.list_value_length(cams), -1).to_numpy(zero_copy_only=False)
    # a map whose length does not match cam_h x cam_w (malformed) or without a target is skipped
    good = np.isfinite(hs) & np.isfinite(ws) & np.isfinite(tg) & (hs > 0) & (ws > 0) & (lens == hs * ws)
    parts = []
    for h, w in {(int(a), int(b)) for a, b in zip(hs[good], ws[good])}:
        idx = np.nonzero(good & (hs == h) & (ws == w))[0]
        sub = cams.take(pa.array(idx))
        raw = pc.list_flatten(sub).to_numpy(zero_copy_only=False).reshape(len(idx), h, w)
        parts.append((idx, grids_from_raw(raw, grid).astype(np.float16)))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, object), np.zeros((0, grid, grid), np.float16)
    idx = np.concatenate([p[0] for p in parts])
    ids = batch.column("image_id").take(pa.array(idx)).to_numpy(zero_copy_only=False)
    return tg[idx].astype(np.int64), ids, np.concatenate([p[1] for p in parts])


def read_class_maps(dataset, flt, grid: int, batch_rows: int = 16384) -> dict:
    """Every ok map of a view on the grid, by class: ``{target: ClassMaps}``.

    Streams the records in batches of ``batch_rows``: the ``cam`` lists are
    flattened in Arrow and resized batch by batch, never turned into Python
    objects.  Memory: the grids (``2 g^2`` bytes a map, 512 at g = 16) plus
    one batch; when a class's chunks are joined, that class twice.

    Args:
        dataset: ``pyarrow.dataset.Dataset`` of the records.
        flt: the view's filter expression (layer and method).
        grid: the side of the grids.

    Returns:
        ``{target: ClassMaps}`` for every target with at least one ok map.
    """
    import pyarrow.compute as pc

    chunks: dict = {}
    cols = ["target", "image_id", "cam", "cam_h", "cam_w"]
    for batch in dataset.to_batches(columns=cols, filter=flt & (pc.field("status") == "ok"),
                                    batch_size=batch_rows):
        if batch.num_rows == 0:
            continue
        tg, ids, g = _batch_grids(batch, grid)
        for t in np.unique(tg):
            sel = tg == t
            chunks.setdefault(int(t), []).append((ids[sel], g[sel]))
    out = {}
    for t in sorted(chunks):
        parts = chunks.pop(t)
        out[t] = ClassMaps(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        del parts
    return out
