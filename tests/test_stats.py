"""Per-map statistics against hand-computed values on synthetic maps and masks."""

import math

import numpy as np
import pyarrow as pa
import pytest

from audit.engine.stats import border_mask, box_mask, map_stats, resize_maps, stat_columns, to_arrow_columns


def one_hot_map(h, w, i, j, value=1.0):
    m = np.zeros((1, h, w), np.float32)
    m[0, i, j] = value
    return m


def test_columns_and_status():
    r = map_stats(np.ones((2, 4, 4), np.float32), (4, 4), regions={"sky": (0, 0, 1, 0.5)})
    assert set(r) == set(stat_columns(["sky"])) | {"status"}
    assert all(r[c].dtype == np.float32 and r[c].shape == (2,) for c in stat_columns(["sky"]))
    assert list(r["status"]) == ["ok", "ok"]
    # a uniform 4x4 map: every value is known
    np.testing.assert_allclose(r["entropy"], 1.0, atol=1e-6)
    np.testing.assert_allclose(r["centroid_x"], 0.5, atol=1e-6)
    np.testing.assert_allclose(r["centroid_y"], 0.5, atol=1e-6)
    np.testing.assert_allclose(r["energy_sky"], 0.5, atol=1e-6)  # rows 0-1 of 4
    np.testing.assert_allclose(r["concentration"], 2 / 16, atol=1e-6)  # ceil(10% of 16) pixels
    np.testing.assert_allclose(r["peak_x"], 0.125)  # first pixel on ties
    assert np.isnan(r["energy_object"]).all()  # no masks


def test_single_pixel_map_hand_values():
    # 10x10, all energy on pixel (row 2, col 7); mask covers rows 1-3, cols 6-8
    m = one_hot_map(10, 10, 2, 7, 3.0)
    mask = np.zeros((1, 10, 10), bool)
    mask[0, 1:4, 6:9] = True
    r = map_stats(m, (10, 10), masks=mask, regions={"top": (0, 0, 1, 0.3), "left": (0, 0, 0.5, 1)})
    assert r["peak_x"][0] == pytest.approx(0.75)  # (7 + 0.5) / 10
    assert r["peak_y"][0] == pytest.approx(0.25)  # (2 + 0.5) / 10
    assert r["centroid_x"][0] == pytest.approx(0.75)
    assert r["centroid_y"][0] == pytest.approx(0.25)
    assert r["entropy"][0] == pytest.approx(0.0)
    assert r["concentration"][0] == pytest.approx(1.0)
    assert r["energy_object"][0] == pytest.approx(1.0)
    assert r["pointing_hit"][0] == 1.0
    assert r["energy_border"][0] == pytest.approx(0.0)  # row 2 / col 7 are inside the band limits
    assert r["energy_top"][0] == pytest.approx(1.0)  # row centre 0.25 < 0.3
    assert r["energy_left"][0] == pytest.approx(0.0)
    assert r["object_x"][0] == pytest.approx(0.75)  # cols 6..8 -> mean centre 7.5/10
    assert r["object_y"][0] == pytest.approx(0.25)


def test_uniform_map():
    r = map_stats(np.full((1, 10, 10), 2.0, np.float32), (10, 10))
    assert r["entropy"][0] == pytest.approx(1.0, abs=1e-6)
    assert r["concentration"][0] == pytest.approx(0.1, abs=1e-6)  # 10 of 100 pixels
    assert r["centroid_x"][0] == pytest.approx(0.5, abs=1e-6)
    assert r["centroid_y"][0] == pytest.approx(0.5, abs=1e-6)
    # border band at 10%: rows/cols 0 and 9 -> 100 - 8*8 = 36 pixels
    assert r["energy_border"][0] == pytest.approx(0.36, abs=1e-6)
    assert r["peak_x"][0] == pytest.approx(0.05)  # first pixel on ties
    assert np.isnan(r["energy_object"][0]) and np.isnan(r["pointing_hit"][0])
    assert np.isnan(r["object_x"][0])


def test_random_maps_against_float64_reference():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, 8, 8)).astype(np.float32)
    masks = rng.random((5, 8, 8)) > 0.6
    r = map_stats(maps, (8, 8), masks=masks, regions={"sky": (0.0, 0.0, 1.0, 0.4)})
    for i in range(5):
        e = np.maximum(maps[i].astype(np.float64), 0)
        p = e / e.sum()
        ys, xs = np.mgrid[0:8, 0:8]
        cx, cy = (xs + 0.5) / 8, (ys + 0.5) / 8
        assert r["centroid_x"][i] == pytest.approx((p * cx).sum(), rel=1e-5)
        assert r["centroid_y"][i] == pytest.approx((p * cy).sum(), rel=1e-5)
        nz = p[p > 0]
        assert r["entropy"][i] == pytest.approx(-(nz * np.log(nz)).sum() / math.log(64), rel=1e-5)
        assert r["concentration"][i] == pytest.approx(np.sort(p.ravel())[-7:].sum(), rel=1e-5)  # ceil(6.4)
        assert r["energy_object"][i] == pytest.approx(p[masks[i]].sum(), rel=1e-5)
        pk = np.unravel_index(np.argmax(p), p.shape)
        assert r["pointing_hit"][i] == float(masks[i][pk])
        assert r["peak_x"][i] == pytest.approx((pk[1] + 0.5) / 8)
        # sky: rows whose centre < 0.4*8=3.2 -> rows 0..2
        assert r["energy_sky"][i] == pytest.approx(p[:3].sum(), rel=1e-5)
        # border: row/col 0 and 7 (centre 0.5/8 < 0.1, 7.5/8 >= 0.9)
        band = np.ones((8, 8), bool)
        band[1:7, 1:7] = False
        assert r["energy_border"][i] == pytest.approx(p[band].sum(), rel=1e-5)
        assert r["object_x"][i] == pytest.approx(cx[masks[i]].mean(), rel=1e-5)


def test_resize_bilinear_matches_opencv_and_energy_after_relu():
    m = np.array([[[0.0, 1.0], [-1.0, 0.0]]], np.float32)
    up = resize_maps(m, (4, 4))
    assert up.shape == (1, 4, 4)
    # half-pixel bilinear: top-left output pixel equals the top-left input value
    assert up[0, 0, 0] == pytest.approx(0.0) and up[0, 0, 3] == pytest.approx(1.0)
    r = map_stats(m, (4, 4))
    e = np.maximum(up[0].astype(np.float64), 0)
    p = e / e.sum()
    xs = (np.arange(4) + 0.5) / 4
    assert r["centroid_x"][0] == pytest.approx((p.sum(0) * xs).sum(), rel=1e-5)
    assert r["centroid_x"][0] > 0.5 and r["centroid_y"][0] < 0.5  # energy top right


def test_resize_many_maps_in_chunks():
    rng = np.random.default_rng(1)
    maps = rng.random((300, 3, 5)).astype(np.float32)  # > 128 OpenCV channels
    up = resize_maps(maps, (6, 10))
    import cv2

    for i in (0, 127, 128, 299):
        ref = cv2.resize(maps[i], (10, 6), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(up[i], ref, rtol=1e-6)


def test_degenerate_maps_are_flat_with_nan_stats():
    maps = np.zeros((4, 5, 5), np.float32)
    maps[1] = -1.0  # all zero after ReLU
    maps[2, 0, 0] = np.nan
    maps[2, 1, 1] = 5.0
    maps[3] = 1.0
    maps[3, 2, 2] = np.inf
    masks = np.ones((4, 5, 5), bool)
    r = map_stats(maps, (10, 10), masks=masks, regions={"sky": (0, 0, 1, 0.4)})
    assert list(r["status"]) == ["flat"] * 4
    for c in stat_columns(["sky"]):
        assert np.isnan(r[c]).all(), c


def test_has_mask_and_empty_mask_and_mixed_flat():
    maps = np.ones((3, 4, 4), np.float32)
    maps[2] = 0.0
    masks = np.zeros((3, 4, 4), bool)
    masks[:, :2, :2] = True
    masks[1] = False  # empty: the object is absent
    r = map_stats(maps, (4, 4), masks=masks, has_mask=[False, True, True])
    assert list(r["status"]) == ["ok", "ok", "flat"]
    assert np.isnan(r["energy_object"]).all()  # row 0 no mask, row 1 empty mask, row 2 flat
    r = map_stats(maps, (4, 4), masks=masks, has_mask=[True, True, True])
    assert r["energy_object"][0] == pytest.approx(0.25)
    assert r["object_x"][0] == pytest.approx(0.25) and r["object_y"][0] == pytest.approx(0.25)
    assert r["pointing_hit"][0] == 1.0  # uniform: first pixel (0,0) is the peak


def test_box_and_border_masks():
    b = box_mask((0.0, 0.0, 1.0, 0.4), (64, 64))
    assert b[:26].all() and not b[26:].any()  # (25+0.5)/64 < 0.4 <= (26+0.5)/64
    band = border_mask((64, 64))
    assert band[:, :6].all() and not band[6:58, 6:58].any() and band[58:].all()


def test_to_arrow_columns_nulls():
    r = map_stats(np.stack([one_hot_map(4, 4, 0, 0)[0], np.zeros((4, 4), np.float32)]), (4, 4),
                  masks=np.ones((2, 4, 4), bool))
    cols = to_arrow_columns(r)
    assert cols["pointing_hit"].type == pa.bool_()
    assert cols["pointing_hit"].to_pylist() == [True, None]
    assert cols["entropy"].to_pylist()[1] is None
    assert "status" not in cols


def test_concentration_sparse_and_dense_rows_against_sorting():
    """Rows with fewer positive pixels than the top 10% and rows with more, in one batch."""
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(6, 20, 20)).astype(np.float32)  # about half positive: > 40 pixels
    maps[1] = -1.0
    maps[1, 3, 4:9] = rng.random(5) + 0.1  # 5 positive pixels (< 40)
    maps[2] = np.where(maps[2] > 1.8, maps[2], 0.0)  # a few positive pixels, the rest exactly 0
    maps[3] = np.round(np.abs(maps[3]), 1)  # plateaus: many equal values
    maps[4, :10] = -0.0  # negative zeros next to positives
    r = map_stats(maps, (20, 20))
    for i in range(6):
        e = np.maximum(maps[i].astype(np.float64), 0).ravel()
        expected = np.sort(e)[-40:].sum() / e.sum()
        assert r["concentration"][i] == pytest.approx(expected, rel=1e-6), i
    assert r["concentration"][1] == pytest.approx(1.0)
