"""A fake job output (OUT/records/*.parquet with the real schema, OUT/job.json) with planted strategies.

Used by the scan's scale tests and by ``bench/scan.py``; no model, no images.
Each class's raw maps are 8 x 8 Gaussian blobs on a little noise, their
statistics computed by the worker's own :func:`audit.engine.stats.map_stats`
(at a 32 x 32 input, with an object mask per image):

* ``watermark``: the peak sits at a fixed place near the bottom-right corner
  (a pasted cue), whatever the object; 4% of the maps peak somewhere else.
* ``healthy``: the peak follows the object, which moves over the image.
* ``minority``: like ``healthy``, but a share of the maps (``minority``)
  look at a tight spot near the top-left corner instead.

``copies_of``: draw that many maps per class and make the requested number
by copying them with multiplicative noise on every cell (``noise``): the same
distribution at another scale, the case a scan must judge alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = (16, 16)
SIDE = 8
CLASSES = ("watermark", "healthy", "minority")
LAYER, METHOD = "conv4", "gradcam++"
OUTLIERS = 0.04  # share of the watermark class's maps that peak elsewhere


@dataclass
class Draw:
    """Raw maps (n, 8, 8) float32, object centres (n, 2), and which maps use a cue."""

    cams: np.ndarray
    objects: np.ndarray
    cue: np.ndarray


def _blobs(xy: np.ndarray, s: np.ndarray) -> np.ndarray:
    c = (np.arange(SIDE) + 0.5) / SIDE
    dx = c[None, None, :] - xy[:, 0, None, None]
    dy = c[None, :, None] - xy[:, 1, None, None]
    return np.exp(-(dx ** 2 + dy ** 2) / (2 * s[:, None, None] ** 2)).astype(np.float32)


def draw(kind: str, n: int, rng: np.random.Generator, minority: float = 0.02) -> Draw:
    """``n`` maps of one planted class (see the module docstring)."""
    objects = rng.uniform(0.2, 0.8, (n, 2))
    xy = objects.copy()
    s = np.full(n, 0.12)
    cue = np.zeros(n, bool)
    if kind == "watermark":
        cue = rng.random(n) >= OUTLIERS
        xy[cue] = 0.85 + rng.normal(0, 0.01, (int(cue.sum()), 2))
        xy[~cue] = rng.uniform(0.1, 0.9, (int((~cue).sum()), 2))
        s[:] = 0.07
    elif kind == "minority":
        cue = rng.random(n) < minority
        xy[cue] = 0.15 + rng.normal(0, 0.01, (int(cue.sum()), 2))
        s[cue] = 0.07
    elif kind != "healthy":
        raise ValueError(f"unknown kind {kind!r}")
    cams = _blobs(xy, s) + 0.02 * rng.random((n, SIDE, SIDE), dtype=np.float32)
    return Draw(cams, objects, cue)


def copies(d: Draw, n: int, noise: float, rng: np.random.Generator) -> Draw:
    """``n`` maps made of ``d``'s maps, each copied ``n / len(d)`` times with multiplicative noise."""
    idx = np.arange(n) % len(d.cams)
    cams = d.cams[idx] * (1 + noise * rng.standard_normal((n, SIDE, SIDE), dtype=np.float32))
    return Draw(np.maximum(cams, 0), d.objects[idx], d.cue[idx])


def _masks(objects: np.ndarray, r: float = 0.12) -> np.ndarray:
    H, W = SIZE
    ys = (np.arange(H) + 0.5) / H
    xs = (np.arange(W) + 0.5) / W
    inx = np.abs(xs[None, None, :] - objects[:, 0, None, None]) < r
    iny = np.abs(ys[None, :, None] - objects[:, 1, None, None]) < r
    return inx & iny


def _table(d: Draw, cls: int, first: int, rng: np.random.Generator):
    """One Arrow table of records (the real schema) for maps of class ``cls``."""
    import pyarrow as pa

    from audit.data.schema import records_schema
    from audit.engine.stats import map_stats, to_arrow_columns

    n = len(d.cams)
    st = map_stats(d.cams, SIZE, masks=_masks(d.objects))
    status = st.pop("status")
    name = CLASSES[cls]
    ids = [f"{name}/{first + i:07d}.png" for i in range(n)]
    correct = rng.random(n) < 0.9
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * SIDE * SIDE)
    cols = {
        "image_id": pa.array(ids), "path": pa.array(ids), "shard": pa.array(np.full(n, cls, np.int32)),
        "label": pa.array(np.full(n, cls, np.int32)), "label_name": pa.array([name] * n),
        "pred": pa.array(np.full(n, cls, np.int32)), "pred_name": pa.array([name] * n),
        "score": pa.array(np.full(n, 0.9, np.float32)), "correct": pa.array(correct),
        "target": pa.array(np.full(n, cls, np.int32)), "layer": pa.array([LAYER] * n),
        "method": pa.array([METHOD] * n),
        "cam": pa.ListArray.from_arrays(offsets, pa.array(d.cams.reshape(-1), pa.float32())),
        "cam_h": pa.array(np.full(n, SIDE, np.int32)), "cam_w": pa.array(np.full(n, SIDE, np.int32)),
        "status": pa.array(status.astype(str)), "error": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, SIZE[1], np.int32)), "height": pa.array(np.full(n, SIZE[0], np.int32)),
        "has_mask": pa.array(np.ones(n, bool)),
        **to_arrow_columns(st),
    }
    schema = records_schema()  # columns this fake does not fill (e.g. path_bytes) are null
    return pa.table([cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in schema], schema=schema)


def write_out(out, n_per_class: int, *, copies_of: int | None = None, noise: float = 0.05,
              minority: float = 0.02, classes=CLASSES, seed: int = 0, part_rows: int = 50_000) -> Path:
    """Write a fake OUT with ``n_per_class`` maps of each planted class; return its path.

    Args:
        out: the directory to create.
        n_per_class: maps per class.
        copies_of: draw this many maps per class and copy them with noise up
            to ``n_per_class`` (None: every map drawn anew).
        noise: the copies' multiplicative noise (standard deviation per cell).
        minority: the share of the ``minority`` class's maps on its cue.
        classes: which of :data:`CLASSES` to write.
        seed: the random seed (the same seed and ``copies_of`` give the same
            drawn maps at every ``n_per_class``).
        part_rows: rows per Parquet file.
    """
    import pyarrow.parquet as pq

    out = Path(out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    part = 0
    for cls, name in enumerate(CLASSES):
        if name not in classes:
            continue
        rng = np.random.default_rng([seed, cls])
        base = draw(name, copies_of, rng, minority) if copies_of else None
        for first in range(0, n_per_class, part_rows):
            m = min(part_rows, n_per_class - first)
            d = copies(base, m, noise, rng) if base is not None else draw(name, m, rng, minority)
            pq.write_table(_table(d, cls, first, rng), out / "records" / f"part-{part:05d}.parquet")
            part += 1
    job = {"status": "ok", "classes": list(CLASSES), "layers": [LAYER], "input_size": list(SIZE),
           "spec": {"explain": {"methods": [METHOD]}}}
    (out / "job.json").write_text(json.dumps(job))
    return out
