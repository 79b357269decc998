"""Per-image cue evidence (summary/images.parquet) and the cost columns of classes.parquet."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import helpers_fix as hf
import numpy as np
import pandas as pd
import pytest

from audit.scan import cost, perimage

# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def test_cue_share_against_float64_reference():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 8, 8)).astype(np.float32)
    maps[2] = -1.0  # no energy: NaN
    px = np.zeros((8, 8), bool)
    px[5:, 5:] = True
    got = perimage.cue_share(maps, px)  # maps already at the input size: no resizing
    e = np.maximum(maps.astype(np.float64), 0)
    want = (e * px).sum(axis=(1, 2))[:2] / e.sum(axis=(1, 2))[:2]
    np.testing.assert_allclose(got[:2], want, rtol=1e-6)
    assert math.isnan(got[2])


def test_cue_share_of_resized_maps_against_float64_reference():
    """Non-negative maps take the linear path, maps with negative values the full one: both as the reference."""
    from audit.engine.stats import resize_maps

    rng = np.random.default_rng(5)
    maps = rng.random((6, 8, 8)).astype(np.float32)
    maps[3:] -= 0.4  # three maps with negative values
    px = np.zeros((32, 32), bool)
    px[20:, 4:15] = True
    e = np.maximum(resize_maps(maps, (32, 32)).astype(np.float64), 0)
    want = (e * px).sum(axis=(1, 2)) / e.sum(axis=(1, 2))
    np.testing.assert_allclose(perimage.cue_share(maps, px), want, rtol=1e-5)
    per_image = np.broadcast_to(px, (6, 32, 32))  # one mask per image: the full path
    np.testing.assert_allclose(perimage.cue_share(maps, per_image), want, rtol=1e-5)


def test_wilson_known_values():
    # Wilson 95% for 8 of 10: 0.4902 .. 0.9433; 0 of 5: 0 .. 0.4345
    p, lo, hi = cost.wilson(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    p, lo, hi = cost.wilson(0, 5)
    assert p == 0 and lo == 0 and hi == pytest.approx(0.4345, abs=1e-4)
    assert all(math.isnan(v) for v in cost.wilson(0, 0))


def test_class_cost_direct_count():
    label = np.array([1, 1, 1, 1, 0, 0, 0, 0, -1])
    present = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1], bool)
    correct = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0], bool)
    pred = np.array([1, 1, 0, 1, 1, 0, 0, 0, 1])
    decides = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1], bool)
    c = cost.class_cost(label, pred, correct, present, decides, 1, {0: "cat", 1: "dog"})
    assert (c.with_cue.k, c.with_cue.n) == (2, 2) and (c.without_cue.k, c.without_cue.n) == (1, 2)
    assert (c.worst.k, c.worst.n) == (0, 1) and c.worst_group == "label=cat, cue=yes"
    assert (c.wrong_reason.k, c.wrong_reason.n) == (1, 3)  # correct dogs: 0, 1, 3; the cue decides image 0


def test_cue_present_rule():
    share = np.array([0.5, 0.5, 0.1, np.nan])
    got = perimage.cue_present(share, np.array([0, 0, 1, 0], bool), np.array([0.1, 0.3, 0.1, 0.1]))
    assert got.tolist() == [True, False, True, False]


def test_remove_cue_occludes_the_place_only():
    img = np.full((1, 12, 12, 3), 10, np.uint8)
    img[0, 8:, 8:] = 250
    cue = perimage.Cue(1, "dog", "corner:bottom_right", "corner:bottom_right", (2 / 3, 2 / 3, 1, 1))
    px = perimage.cue_pixels(cue, (12, 12), n=1)
    assert px[0, 8:, 8:].all() and not px[0, :8].any()
    out = perimage.remove_cue(img, cue, px)
    mean = np.round(img[0].reshape(-1, 3).mean(axis=0))
    assert (out[0, 8:, 8:] == mean).all() and (out[0, :8] == 10).all()


# ----------------------------------------------------------------------------
# A job with per-image truth
# ----------------------------------------------------------------------------


def _features_reference(images, pixels, side=16):
    """float64 NumPy: block means (a whole number of pixels per cell), the cue's cells, the median outside."""
    x = np.asarray(images, np.float64) / 255.0
    n, H, W, c = x.shape
    fy, fx = H // side, W // side

    def blocks(a):
        return a.reshape(n, side, fy, side, fx, -1).mean(axis=(2, 4))

    m = np.broadcast_to(pixels, x.shape[:3]).astype(np.float64)[..., None]
    on, cover, rest = blocks(x * m), blocks(m)[..., 0], blocks(x)
    out = np.zeros((n, side * side * c))
    for i in range(n):
        outside = rest[i][cover[i] < 0.5]
        med = np.median(outside, axis=0) if len(outside) else np.zeros(c)
        out[i] = (on[i] - cover[i][..., None] * med).reshape(-1)
    return out


def test_pixel_features_against_float64_reference():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (300, 64, 64, 3), dtype=np.uint8)
    px = np.zeros((300, 64, 64), bool)
    px[:, 40:, 50:] = True  # a corner for most images ...
    px[7] = False  # ... none for one, another place for another, the whole image for a third
    px[8, 10:13, 3:9] = True
    px[9] = True
    got = perimage.pixel_features(x, px)
    assert got.dtype == np.float32 and got.shape == (300, 16 * 16 * 3)
    np.testing.assert_allclose(got, _features_reference(x, px), atol=2e-6)
    assert np.abs(got[7]).max() == 0 and np.abs(got[0]).max() > 0.1
    one = perimage.pixel_features(x, px[0])  # one place for every image
    np.testing.assert_allclose(one, _features_reference(x, px[0]), atol=2e-6)


def test_pixel_features_at_a_fractional_scale_match_one_image_at_a_time():
    import cv2

    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (9, 50, 70, 3), dtype=np.uint8)
    px = rng.random((9, 50, 70)) < 0.2
    got = perimage.pixel_features(x, px)
    for i in range(len(x)):
        img, m = x[i].astype(np.float32) / 255, px[i].astype(np.float32)
        on = cv2.resize(img * m[..., None], (16, 16), interpolation=cv2.INTER_AREA)
        cover = cv2.resize(m, (16, 16), interpolation=cv2.INTER_AREA)
        med = np.median(cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA)[cover < 0.5], axis=0)
        np.testing.assert_allclose(got[i], (on - cover[..., None] * med).reshape(-1), atol=2e-6)


def test_candidates_are_the_images_predicted_as_the_cue_class():
    assert perimage.candidates(np.array([2, 0, 2, 1]), 2).tolist() == [True, False, True, False]


def test_bounded_sample_keeps_a_uniform_subset():
    from audit.scan.imagepass import Sample

    s = Sample(50, np.random.default_rng(0))
    for k in range(20):  # 20 shards of 100 rows, row value = its global index
        s.add(np.arange(k * 100, (k + 1) * 100, dtype=np.float32)[:, None])
    v = s.features[:, 0]
    assert s.features.shape == (50, 1) and len(np.unique(v)) == 50 and v.max() < 2000
    assert 0.1 < (v < 1000).mean() < 0.9  # not only the first shards
    small = Sample(50, np.random.default_rng(0))
    small.add(np.arange(30, dtype=np.float32)[:, None])
    assert sorted(small.features[:, 0]) == list(range(30))  # under the cap: every row


def test_presence_detector_from_a_bounded_sample(monkeypatch):
    from audit.scan import imagepass

    monkeypatch.setattr(perimage, "MAX_TRAIN", 8)
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(2, 1, (40, 4)), rng.normal(-2, 1, (40, 4))
    s_pos, s_neg = imagepass.Sample(perimage.MAX_TRAIN, rng), imagepass.Sample(perimage.MAX_TRAIN, rng)
    for k in range(4):
        s_pos.add(pos[k * 10:(k + 1) * 10])
        s_neg.add(neg[k * 10:(k + 1) * 10])
    det = perimage.fit_presence(s_pos.features, s_neg.features)
    assert len(s_pos.features) == 8
    assert (det(pos) > 0.5).mean() >= 0.95 and (det(neg) < 0.5).mean() >= 0.95
    assert perimage.fit_presence(pos[:4], neg) is None  # fewer than MIN_TRAIN carriers


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    from audit.scan import scan

    out, truth = hf.shortcut_job(tmp_path_factory.mktemp("fix") / "job")
    scan(out, quiet=True)
    return out, truth


def _prec_rec(flag, truth):
    tp = int((flag & truth).sum())
    return tp / max(1, int(flag.sum())), tp / max(1, int(truth.sum()))


def test_pass_flags_the_marked_images(scanned, tmp_path):
    from audit.scan.imagepass import run_pass

    out = str(hf_copy(scanned[0], tmp_path))
    truth = scanned[1]
    res = run_pass(out, quiet=True)
    assert [c.place for c in res.cues] == ["corner:bottom_right"] and res.done_now == 4
    df = hf.read_images(out)
    assert sorted(df.image_id) == sorted(truth) and df.image_id.is_unique  # one row per image and cue
    marked = df.image_id.map(lambda i: truth[i][1]).to_numpy(bool)
    for col in ("cue_present", "cue_decides"):
        p, r = _prec_rec(df[col].to_numpy(bool), marked)
        assert p >= 0.95 and r >= 0.95, (col, p, r)
    assert (df.pred_without_cue[marked] == 0).all()  # the mark gone: cat
    # the extra forward pass only for the images predicted as the cue's class (dog); the others keep theirs
    cand = (df.pred == res.cues[0].class_id).to_numpy()
    assert res.forwards == int(cand.sum()) == 30
    assert (df.pred_without_cue[~cand] == df.pred[~cand]).all() and not df.cue_decides[~cand].any()
    # cost columns against a direct count from the truth (the model says dog iff marked)
    row = pd.read_parquet(f"{out}/summary/classes.parquet").set_index("class_name").loc["dog"]
    assert (row.n_with_cue, row.n_without_cue) == (24, 6)
    assert row.accuracy_with_cue == 1.0 and row.accuracy_without_cue == 0.0
    lo, hi = cost.wilson(0, 6)[1:]
    assert row.accuracy_without_cue_low == pytest.approx(lo) and row.accuracy_without_cue_high == pytest.approx(hi, 1e-6)
    assert row.worst_group_accuracy == 0.0 and row.worst_group_n == 6
    assert row.wrong_reason_share == 1.0 and row.wrong_reason_n == 24


def test_pass_resumes_and_redoes_only_what_is_missing(scanned, tmp_path):
    from audit.data import io
    from audit.scan.imagepass import run_pass, store_of

    out = str(hf_copy(scanned[0], tmp_path))
    run_pass(out, quiet=True)
    again = run_pass(out, quiet=True)
    assert (again.done_now, again.skipped, again.forwards) == (0, 4, 0)
    io.uncommit(store_of(out), [2])  # as if the actor holding shard 2 died before its commit
    third = run_pass(out, quiet=True)
    assert (third.done_now, third.skipped) == (1, 3)
    df = hf.read_images(out)
    assert len(df) == 60 and df.image_id.is_unique


def test_cli_per_image_and_fail_on(scanned, tmp_path, capsys):
    from audit.cli import main

    out = str(hf_copy(scanned[0], tmp_path))
    assert main(["scan", out, "--quiet", "--per-image", "none", "--fail-on", "shortcut"]) == 3
    assert not (tmp_path / "out" / "summary" / "images.parquet").exists()
    assert main(["scan", out, "--quiet", "--per-image"]) == 0
    assert len(hf.read_images(out)) == 60


def hf_copy(out, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    return dst


@pytest.mark.slow
def test_killed_actor_during_the_pass_loses_and_doubles_nothing(scanned, tmp_path):
    import os

    import ray
    from helpers_jobs import ray_init_local

    from audit.scan.imagepass import CueWorker, run_pass

    out = str(hf_copy(scanned[0], tmp_path))
    marker = str(tmp_path / "killed")

    class Dying(CueWorker):
        def process_shard(self, shard):
            if shard == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the actor's process dies mid-shard, before its commit
            return super().process_shard(shard)

    ray_init_local(2)
    try:
        res = run_pass(out, quiet=True, actors=2, worker_cls=Dying)
    finally:
        ray.shutdown()
    assert os.path.exists(marker) and res.actor_deaths == 1 and res.done_now == 4 and not res.failed
    df = hf.read_images(out)
    assert sorted(df.image_id) == sorted(scanned[1]) and df.image_id.is_unique


@pytest.mark.slow
def test_pass_into_a_bucket_matches_the_local_pass(scanned, tmp_path):
    """The pass on an output in a bucket (moto's S3 server): the same rows as on disk, the store under
    OUT/summary/_images/, and a second run skips every shard."""
    import helpers_s3
    import pyarrow.parquet as pq

    from audit.data import fs
    from audit.scan.imagepass import run_pass

    local = str(hf_copy(scanned[0], tmp_path))
    run_pass(local, quiet=True)
    want = hf.read_images(local).set_index("image_id").sort_index()
    server = helpers_s3.S3Server()
    try:
        server.set_env()
        server.bucket("pass")
        src = Path(scanned[0])
        for f in src.rglob("*"):
            if f.is_file() and "_images" not in f.parts and f.name != "images.parquet":
                fs.write_bytes(f"s3://pass/out/{f.relative_to(src).as_posix()}", f.read_bytes())
        res = run_pass("s3://pass/out", quiet=True, local=True)
        assert res.done_now == 4 and res.rows == 60
        names = {rel for rel, _ in fs.list_files("s3://pass/out/summary")}
        assert sum(n.startswith("_images/_manifest/") for n in names) == 4
        got = pq.read_table(fs.open_input("s3://pass/out/summary/images.parquet")).to_pandas()
        got = got.set_index("image_id").sort_index()
        assert got.index.is_unique and list(got.index) == list(want.index)
        for col in ("pred", "pred_without_cue", "cue_decides", "cue_present"):
            assert (got[col] == want[col]).all(), col
        np.testing.assert_allclose(got.cue_share.to_numpy(float), want.cue_share.to_numpy(float), rtol=1e-6)
        again = run_pass("s3://pass/out", quiet=True, local=True)
        assert (again.done_now, again.skipped) == (0, 4)
    finally:
        server.stop()


def test_report_and_scan_show_the_cost(scanned, tmp_path, capsys):
    from audit.review.report import write_report
    from audit.scan import scan
    from audit.scan.imagepass import run_pass

    out = str(hf_copy(scanned[0], tmp_path))
    run_pass(out, quiet=True)
    scan(out)  # a rescan keeps the cost of the same cue
    printed = capsys.readouterr().out
    assert "cost of dog's cue corner:bottom_right: accuracy 100% with the cue (n=24" in printed
    from pathlib import Path

    html = Path(write_report(out)).read_text(encoding="utf-8")
    assert "What the shortcut costs" in html and "on its 6 without" in html


@pytest.mark.slow
@pytest.mark.parametrize("name", ["frame", "minority"])  # a corner mark: test_zoo.py's watermark, end to end
def test_zoo_flags_against_per_image_truth(name, tmp_path, shared_cache):
    """cue_present and cue_decides reach precision and recall >= 0.95 on zoo cases whose images' cues are known.

    Each against its own truth: cue_present against "the zoo drew the cue on the image",
    cue_decides against "the model predicts the image as the cue's class and the same image
    rendered by the zoo without its cue as another class" (the zoo's own predict, no scan code).

    The models are trained on 120 images per class (test_zoo.py's end-to-end size: the
    frame model is trained once per run for both), the audit split is 100 per class;
    ``minority`` audits 240 per class of its training split (the zoo case's size; the model saw
    the first 120): a quarter of the crosses carry the stamp and their objects are of a random
    class (a quarter of them crosses), so occluding the stamp flips only about 70% of the
    minority cluster.  At 100 per class the cluster has 22-25 maps and that rate's 95% interval
    can straddle ``cue_flip_min`` (0.5): ``insufficient_data``, no cue (the zoo's 240-image model:
    68% of 25, 48-83%); at 240 the cluster has about 50 maps (78% of 32, 61-89%).
    """
    import sys
    from dataclasses import replace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import perimage_zoo as bz

    from audit.scan import scan
    from audit.scan.imagepass import run_pass
    from audit.zoo.cases import CASES
    from audit.zoo.train import ensure, job_spec, write_folder

    case = replace(CASES[name], n_per_class=120, n_heldout=30)
    with shared_cache.lock(f"zoo-{name}") as cache:
        built = ensure(case, root=cache, log=lambda *_: None)
    samples, cued, clean = bz.audit_split(case, 240 if name == "minority" else 100)
    write_folder(tmp_path / "audit", case, samples)
    ids = [f"{case.classes[s.label]}/{i:05d}.png" for s, i in zip(samples, bz._counters(samples))]
    truth = dict(zip(ids, cued))
    pred, pred_clean = bz.zoo_predictions(case, built, samples, clean)
    k = case.cues[0][0]
    decided = dict(zip(ids, (pred == k) & (pred_clean != k)))
    built.data, built.masks = str(tmp_path / "audit" / "train"), str(tmp_path / "audit" / "train_masks")
    out = bz.run_in_process(job_spec(case, built, True, tmp_path / "out"))
    scan(out, quiet=True)
    res = run_pass(out, quiet=True, local=True)
    assert len(res.cues) == 1 and res.cues[0].class_id == case.cues[0][0]
    df = hf.read_images(out)
    p, r = _prec_rec(df.cue_present.to_numpy(bool), df.image_id.map(truth).to_numpy(bool))
    assert p >= 0.95 and r >= 0.95, (p, r)
    p, r = _prec_rec(df.cue_decides.to_numpy(bool), df.image_id.map(decided).to_numpy(bool))
    assert p >= 0.95 and r >= 0.95, (p, r)


def test_audit_run_fail_on_shortcut_and_the_pass_at_its_end(scanned, tmp_path, capsys):
    """`audit run` (a small job runs in the driver): scan, the per-image pass when flagged, exit 3 with --fail-on."""
    import yaml

    from audit.cli import main

    doc = yaml.safe_load((Path(scanned[0]).parent / "job.yaml").read_text())
    doc["output"] = str(tmp_path / "run")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress", "--fail-on", "shortcut"]) == 3
    assert "per-image pass: 60 rows" in capsys.readouterr().out
    assert len(hf.read_images(tmp_path / "run")) == 60
    doc["output"] = str(tmp_path / "run2")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress", "--per-image", "none"]) == 0
    assert not (tmp_path / "run2" / "summary" / "images.parquet").exists()
