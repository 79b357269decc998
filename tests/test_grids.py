"""Reading a view's maps from the records in Arrow batches (audit.scan.grids.read_class_maps)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from audit.engine.stats import resize_maps
from audit.scan.grids import grids_from_cams, read_class_maps


def reference_grid(cam, h, w, grid):
    """One map -> grid in float64: NaN to 0, bilinear resize, ReLU, sum 1 (zeros without energy)."""
    raw = np.nan_to_num(np.asarray(cam, np.float64).reshape(h, w), nan=0.0, posinf=0.0, neginf=0.0)
    g = np.maximum(resize_maps(raw[None].astype(np.float32), (grid, grid))[0].astype(np.float64), 0)
    return g / g.sum() if g.sum() > 0 else g


def write(tmp_path, rows, part_rows=3):
    table = pa.table({
        "image_id": pa.array([r[0] for r in rows]),
        "target": pa.array([r[1] for r in rows], pa.int32()),
        "cam": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
        "cam_h": pa.array([r[3] for r in rows], pa.int32()),
        "cam_w": pa.array([r[4] for r in rows], pa.int32()),
        "status": pa.array([r[5] for r in rows]),
        "layer": pa.array(["l"] * len(rows)),
    })
    for i, s in enumerate(range(0, len(rows), part_rows)):
        pq.write_table(table.slice(s, part_rows), tmp_path / f"part-{i}.parquet")
    return pads.dataset(str(tmp_path), format="parquet")


def test_read_class_maps_values_shapes_and_skips(tmp_path):
    rng = np.random.default_rng(0)
    rows, want = [], {}
    for i in range(20):
        h, w = (4, 4) if i % 3 else (2, 3)  # two map shapes, mixed within batches
        cam = rng.normal(size=h * w).astype(np.float32)
        if i == 4:
            cam[1] = np.nan  # non-finite cells count as 0
        rows.append((f"img{i}", i % 2, cam.tolist(), h, w, "ok"))
        want[f"img{i}"] = reference_grid(cam, h, w, 8)
    rows.append(("short", 0, [1.0, 2.0], 4, 4, "ok"))  # malformed: length is not cam_h x cam_w
    rows.append(("nocam", 0, None, 4, 4, "ok"))
    rows.append(("flat", 1, [0.0] * 16, 4, 4, "flat"))  # not an ok map
    rows.append(("notarget", None, [1.0] * 16, 4, 4, "ok"))
    ds = write(tmp_path, rows)
    maps = read_class_maps(ds, pc.field("layer") == "l", 8, batch_rows=4)
    assert sorted(maps) == [0, 1]
    seen = {}
    for t, cm in maps.items():
        assert cm.grids.dtype == np.float16 and cm.grids.shape == (len(cm.image_ids), 8, 8)
        for i, g in zip(cm.image_ids, cm.grids):
            assert int(i[3:]) % 2 == t
            seen[i] = g
    assert sorted(seen) == sorted(want)  # every ok map once; the malformed, missing, flat and untargeted skipped
    for i, g in seen.items():
        assert np.allclose(g.astype(np.float64), want[i], atol=2e-3 * max(want[i].max(), 1e-3))
        assert g.astype(np.float64).sum() == pytest.approx(1.0, abs=5e-3)


def test_grids_from_cams_matches_the_reference():
    rng = np.random.default_rng(1)
    cams = [rng.normal(size=12).astype(np.float32) for _ in range(5)]
    cams.append(-np.ones(12, np.float32))  # no energy after ReLU: all zeros
    G = grids_from_cams(cams, 3, 4, 16)
    for c, g in zip(cams, G):
        assert np.allclose(g, reference_grid(c, 3, 4, 16), atol=1e-6)
    assert not G[-1].any()
