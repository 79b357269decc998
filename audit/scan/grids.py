"""Heatmaps on a small grid: raw maps -> (n, g, g) energy distributions, read from the records.

The scan judges a class by its maps resized to ``Config.grid`` x ``Config.grid``
(energy distributions that sum to 1). :func:`load_grids` streams the ``cam``
column of the records and converts only the wanted maps.
"""

from __future__ import annotations

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
    raw = np.where(np.isfinite(raw), raw, 0.0)
    g = np.maximum(resize_maps(raw, (grid, grid)), 0.0).astype(np.float64)
    tot = g.sum(axis=(1, 2), keepdims=True)
    return np.where(tot > 0, g / np.where(tot > 0, tot, 1.0), 0.0).astype(np.float32)


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


def load_grids(dataset, flt, wanted: dict, grid: int) -> dict:
    """{(target, image_id): grid} for the wanted ids, streaming the cam column batch by batch.

    Rows are filtered in Arrow first (``is_in`` on the ids), so only the
    sampled maps are ever converted; memory stays bounded by one batch plus
    the (small) grids.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    all_ids = pa.array(sorted({i for ids in wanted.values() for i in ids}), pa.string())
    cols = ["target", "image_id", "cam", "cam_h", "cam_w"]
    for batch in dataset.to_batches(columns=cols, filter=flt & (pc.field("status") == "ok")):
        if batch.num_rows == 0:
            continue
        batch = batch.filter(pc.is_in(batch.column("image_id"), value_set=all_ids))
        if batch.num_rows == 0:
            continue
        tg = batch.column("target").to_numpy(zero_copy_only=False)
        iid = batch.column("image_id").to_pylist()
        hs = batch.column("cam_h").to_numpy(zero_copy_only=False)
        ws = batch.column("cam_w").to_numpy(zero_copy_only=False)
        cams = batch.column("cam")
        keep = [i for i in range(batch.num_rows)
                if np.isfinite(tg[i]) and iid[i] in wanted.get(int(tg[i]), ()) and cams[i].is_valid]
        by_shape: dict = {}
        for i in keep:
            by_shape.setdefault((int(hs[i]), int(ws[i])), []).append(i)
        for (h, w), idx in by_shape.items():
            sub = cams.take(pa.array(idx))
            flat = sub.flatten().to_numpy(zero_copy_only=False)
            if len(flat) != len(idx) * h * w:
                continue  # a malformed map (length does not match cam_h x cam_w): skipped
            g = grids_from_cams(flat.reshape(len(idx), h * w), h, w, grid)
            for j, i in enumerate(idx):
                out[(int(tg[i]), iid[i])] = g[j]
    return out
