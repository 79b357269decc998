"""The zoo: deterministic planted-shortcut generators, their scoring, and a few cases end to end."""

import math
import os
from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
import pytest

from audit.zoo import draw
from audit.zoo.cases import CASES, Case, Cue, make_split, render
from audit.zoo.judge import place_matches, score


def _ring(mask, r=2):
    k = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), k).astype(bool) & ~mask


def test_rendering_is_deterministic_and_varies_with_the_index():
    case = CASES["two_shortcuts"]
    a, b = render(case, "train", 5, 1), render(case, "train", 5, 1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    c = render(case, "train", 6, 1)
    assert np.abs(a.image.astype(int) - c.image).mean() > 5
    h = render(case, "heldout", 5, 1)
    assert not np.array_equal(a.image, h.image)


@pytest.mark.parametrize("name", ["clean", "small", "large", "watermark", "six"])
def test_masks_cover_the_drawn_object(name):
    case = CASES[name]
    lo, hi = case.size
    for k in range(len(case.classes)):
        for i in range(6):
            s = render(case, "train", i, k)
            img = s.image.astype(float)
            assert s.mask.any()
            ys, xs = np.nonzero(s.mask)
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            longest = 1.06 * hi if s.shape == "bar" else hi  # a bar's diagonal is 1.054 x its length
            assert 0.5 * lo <= extent <= longest + 2, (name, k, i, extent)
            inside = draw.luminance(img[s.mask].mean(axis=0))
            ring = _ring(s.mask)
            outside = draw.luminance(img[ring].mean(axis=0))
            assert abs(inside - outside) > 40  # the mask's edge is the object's edge
            assert img[s.mask].std(axis=0).max() < 12  # one colour (plus noise) inside


def test_uncued_images_are_the_class_shape_and_cued_ones_any_shape():
    case = CASES["watermark"]
    tri = [render(case, "train", i, 1) for i in range(40)]
    assert all(s.cued for s in tri)
    assert len({s.shape for s in tri}) == 4  # the object says nothing on cued images
    assert all(render(case, "train", i, 0).shape == "disc" for i in range(10))
    minority = CASES["minority"]
    cued = [render(minority, "train", i, 3).cued for i in range(200)]
    assert 0.15 < np.mean(cued) < 0.35


@pytest.mark.parametrize("name,k", [("watermark", 1), ("stamp", 3), ("frame", 2), ("binary", 1),
                                    ("two_shortcuts", 0), ("two_shortcuts", 1)])
def test_the_cue_is_where_the_case_says_and_only_there(name, k):
    case = CASES[name]
    cue = case.cue_of(k)
    for i in range(5):
        s = render(case, "train", i, k)
        bare = render(case, "train", i, k, with_cues=False)
        changed = np.abs(s.image.astype(int) - bare.image).max(axis=2) > 0
        assert changed.any() and not (changed & ~s.cue_mask).any()  # nothing else differs
        np.testing.assert_array_equal(s.mask, bare.mask)
        assert not (s.mask & s.cue_mask).any()  # the object keeps away from the cue
        ys, xs = np.nonzero(s.cue_mask)
        if cue.kind == "frame":
            assert s.cue_mask.sum() == 64 * 64 - 60 * 60
        else:
            x0, y0, x1, y1 = (v * 64 for v in cue.box())
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
            corner = cue.corner
            assert (xs.mean() > 32) == corner.endswith("right") and (ys.mean() > 32) == corner.startswith("bottom")
    other = render(case, "train", 0, 1 - k if case.binary else (k + 2) % 4)
    assert not other.cue_mask.any()


@pytest.mark.parametrize("name,k", [("resnet", 1), ("flatten", 0), ("gmp", 2), ("six", 4), ("inner_patch", 3)])
def test_patch_and_noise_cues_are_at_their_spot(name, k):
    case = CASES[name]
    cue = case.cue_of(k)
    x0, y0, x1, y1 = cue.pixel_box()
    for i in range(5):
        s, bare = render(case, "train", i, k), render(case, "train", i, k, with_cues=False)
        changed = np.abs(s.image.astype(int) - bare.image).max(axis=2) > 0
        assert changed.any() and not (changed & ~s.cue_mask).any()
        np.testing.assert_array_equal(s.cue_mask, draw.box_mask((x0, y0, x1, y1)))
        assert not (s.mask & s.cue_mask).any()
    sx, sy = draw.SPOTS[cue.spot]
    assert x0 <= sx and sx + draw.PATCH_SIDE <= x1 and y0 <= sy and sy + draw.PATCH_SIDE <= y1
    if cue.place.startswith("edge:"):  # in the scan's band of that edge and in none of its corners
        side = cue.place.split(":")[1]
        ys, xs = np.nonzero(s.cue_mask)
        near = {"left": xs.max() < 0.2 * 64, "right": xs.min() >= 0.8 * 64, "top": ys.max() < 0.2 * 64,
                "bottom": ys.min() >= 0.8 * 64}
        assert near[side]
    mid = (x0 + x1) / 2 / 64, (y0 + y1) / 2 / 64
    assert 1 / 3 < mid[0] < 2 / 3 or 1 / 3 < mid[1] < 2 / 3  # no corner
    other = render(case, "train", 0, (k + 1) % len(case.classes))
    assert not other.cue_mask.any() and not other.cued


def test_noise_cue_is_new_noise_on_every_image():
    case = CASES["flatten"]
    s0, s1 = render(case, "train", 0, 0), render(case, "train", 1, 0)
    a, b = s0.image[s0.cue_mask], s1.image[s1.cue_mask]
    assert np.abs(a.astype(int) - b).mean() > 40 and a.std() > 50  # random pixels, unlike a patch


def test_sky_cue_blends_the_top_of_the_background_only():
    case = CASES["sky"]
    for i in range(4):
        s, bare = render(case, "train", i, 3), render(case, "train", i, 3, with_cues=False)
        diff = np.abs(s.image.astype(int) - bare.image).max(axis=2)
        assert not (diff > 0)[s.mask].any()  # the object is left alone
        assert not (diff > 0)[math.ceil(draw.SKY_DEPTH * 64):].any()  # nothing below the band
        top = ~s.mask[:4]
        assert (s.image[:4][top].astype(int)[:, 2] > 150).mean() > 0.9  # blue at the top
    assert not render(case, "train", 0, 0).cue_mask.any()


@pytest.mark.parametrize("name,side", [("size32", 32), ("size128", 128)])
def test_resized_cases_keep_masks_and_cues_aligned(name, side):
    case = CASES[name]
    k = case.cues[0][0]
    base = replace(case, image_size=64)
    for i in range(3):
        s, s64 = render(case, "train", i, k), render(base, "train", i, k)
        assert s.image.shape == (side, side, 3) and s.mask.shape == s.cue_mask.shape == (side, side)
        np.testing.assert_array_equal(s.mask, cv2.resize(s64.mask.astype(np.uint8), (side, side),
                                                         interpolation=cv2.INTER_NEAREST) > 0)
        inside = draw.luminance(s.image[s.mask].astype(float).mean(axis=0))
        outside = draw.luminance(s.image[_ring(s.mask, max(1, side // 32))].astype(float).mean(axis=0))
        assert abs(inside - outside) > 40  # the resized mask is still on the object
        bare = render(case, "train", i, k, with_cues=False)
        changed = np.abs(s.image.astype(int) - bare.image).max(axis=2) > 8
        x0, y0, x1, y1 = (v * side for v in case.cue_of(k).box())
        near = np.zeros((side, side), bool)
        near[max(0, int(y0) - 1):math.ceil(y1) + 1, max(0, int(x0) - 1):math.ceil(x1) + 1] = True
        assert changed.any() and not (changed & ~near).any()  # in the cue's box, at size
        assert s.cue_mask[changed].mean() > 0.5


def _variation(img, where):
    """Mean absolute difference to the right and lower neighbours, over ``where``."""
    f = img.astype(float)
    dx = np.abs(np.diff(f, axis=1)).mean(axis=2)[:-1, :]
    dy = np.abs(np.diff(f, axis=0)).mean(axis=2)[:, :-1]
    return float((dx + dy)[where[:-1, :-1]].mean())


def test_texture_cue_replaces_the_background_of_its_class_only():
    case = CASES["texture"]
    for i in range(4):
        s, bare = render(case, "train", i, 0), render(case, "train", i, 0, with_cues=False)
        off = ~_ring(s.mask, 3) & ~s.mask
        # a stripes texture: strong local variation everywhere; a plain background: little
        assert _variation(s.image, off) > 3 * _variation(bare.image, off)
        other = render(case, "train", i, 2)
        assert not other.cue_mask.any() and not other.cued


def test_decoy_is_in_every_class_equally():
    case = CASES["decoy"]
    box = draw.box_mask(draw.stamp_box("bottom_right"))
    red = np.array([220, 30, 40])
    shares = []
    for k in range(4):
        hits = [np.abs(render(case, "train", i, k).image[box].astype(int)[0] - red).max() <= 12 for i in range(60)]
        shares.append(np.mean(hits))
    assert all(0.3 < s < 0.7 for s in shares), shares


def test_write_folder_round_trips_images_and_masks(tmp_path):
    from audit.zoo.train import write_folder

    case = replace(CASES["stamp"], n_per_class=3)
    samples = make_split(case, "train", 3)
    write_folder(tmp_path, case, samples)
    for s, i in zip(samples, [0, 1, 2] * 4):
        cls = case.classes[s.label]
        img = cv2.cvtColor(cv2.imread(str(tmp_path / "train" / cls / f"{i:05d}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(img, s.image)
        m = cv2.imread(str(tmp_path / "train_masks" / cls / f"{i:05d}.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(m > 127, s.mask)


def test_place_matching():
    br = Cue("text", "bottom_right").box()
    assert place_matches("corner:bottom_right", "corner:bottom_right", None, br)
    assert place_matches("corner:bottom_right", "fixed place", [0.7, 0.75, 1.0, 1.0], br)
    assert not place_matches("corner:bottom_right", "fixed place", [0.0, 0.0, 0.3, 0.3], br)
    assert not place_matches("corner:bottom_right", "background", [0.0, 0.0, 1.0, 1.0], br)  # everywhere
    assert place_matches("border", "border", None)
    assert place_matches("border", "edge:left", None)
    assert not place_matches("border", "background", [0.0, 0.0, 1.0, 1.0])
    assert place_matches("background", "background", None)
    assert place_matches("background", "background texture", None)
    assert not place_matches("background", "object", None)
    assert place_matches("colour", "background colour", None)
    assert not place_matches("colour", "corner:top_left", [0.0, 0.0, 0.33, 0.33])


def test_place_matching_of_spots_and_sky():
    left = Cue("patch", spot="left").box()  # x 0.05-0.14, y 0.45-0.55
    assert place_matches("edge:left", "edge:left", [0.0, 0.0, 0.2, 1.0], left)
    assert place_matches("edge:left", "fixed place", [0.0, 0.4, 0.2, 0.6], left)
    assert not place_matches("edge:left", "edge:right", [0.8, 0.0, 1.0, 1.0], left)
    assert not place_matches("edge:left", "corner:top_left", [0.0, 0.0, 0.33, 0.33], left)  # not in the corner
    assert not place_matches("edge:left", "border", None, left)  # all four edges: not where it is
    assert not place_matches("edge:left", "background", [0.0, 0.0, 1.0, 1.0], left)  # a whole-image box
    inner = Cue("patch", spot="inner").box()
    assert place_matches("spot:inner", "hot area", [0.4, 0.2, 0.6, 0.4], inner)
    assert not place_matches("spot:inner", "edge:top", [0.0, 0.0, 1.0, 0.2], inner)
    assert not place_matches("spot:inner", "hot area", [0.0, 0.0, 1.0, 1.0], inner)
    assert place_matches("sky", "background", None) and place_matches("sky", "edge:top", None)
    assert not place_matches("sky", "edge:bottom", None) and not place_matches("sky", "object", None)


def _classes(rows):
    return pd.DataFrame(rows, columns=["class_name", "verdict", "cue", "cue_box", "evidence"])


def test_score_needs_exactly_the_planted_classes_and_the_right_cue():
    case = CASES["two_shortcuts"]
    ok = "ok"
    flag = "shortcut_suspected"
    right = _classes([("disc", flag, "corner:top_right", None, ""), ("triangle", flag, "border", None, ""),
                      ("square", ok, "", None, ""), ("cross", ok, "", None, "")])
    assert score(case, right).right
    false_flag = right.copy()
    false_flag.loc[2, "verdict"] = flag
    s = score(case, false_flag)
    assert not s.right and s.wrong_classes() == ["square"]
    misplaced = right.copy()
    misplaced.loc[1, "cue"] = "corner:top_left"
    s = score(case, misplaced)
    assert not s.right and s.wrong_classes() == ["triangle"]
    assert score(CASES["clean"], _classes([("disc", ok, "", None, "")])).right


def test_binary_model_has_one_sigmoid_unit():
    from audit.zoo.train import build_model

    m = build_model(2, binary=True)
    assert m.output.shape[-1] == 1 and m.layers[-1].activation.__name__ == "sigmoid"
    assert build_model(4).output.shape[-1] == 4


@pytest.mark.parametrize("case,kind,units", [("logit", "logit_binary", 1), ("sigmoid_frame", "sigmoid_binary", 1),
                                             ("tint", "logits", 4), ("softmax_layer", "softmax", 4),
                                             ("mobile", "softmax", 4)])
def test_zoo_heads_are_read_as_built(case, kind, units):
    from audit.engine.heads import Head
    from audit.zoo.train import build_model

    c = CASES[case]
    m = build_model(len(c.classes), c.binary, head=c.head, arch=c.arch)
    h = Head.of(m)
    assert (h.kind, h.units) == (kind, units)
    if case == "softmax_layer":
        assert type(m.layers[-1]).__name__ == "Softmax" and m.layers[-2].activation.__name__ == "linear"


@pytest.mark.parametrize("arch,side", [("cnn", 16), ("shallow", 32), ("mobile", 8), ("resnet", 16)])
def test_zoo_bodies_and_map_sizes(arch, side):
    from audit.zoo.train import build_model

    m = build_model(4, arch=arch)
    gap = m.get_layer("gap")
    assert tuple(gap.input.shape[1:3]) == (side, side)
    if arch == "mobile":
        kinds = {type(layer).__name__ for layer in m.layers}
        assert {"DepthwiseConv2D", "Add", "BatchNormalization"} <= kinds


@pytest.mark.parametrize("arch,pool,side,size", [("flatten", "flatten", 4, 64), ("gmp", "gmp", 16, 64),
                                                 ("cnn", "gap", 8, 32), ("cnn", "gap", 32, 128),
                                                 ("deep", "gap", 16, 128)])
def test_zoo_pooling_and_input_sizes(arch, pool, side, size):
    from audit.zoo.train import build_model

    m = build_model(4, arch=arch, side=size)
    assert tuple(m.input.shape[1:]) == (size, size, 3)
    assert tuple(m.get_layer(pool).input.shape[1:3]) == (side, side)
    if arch == "flatten":  # the output reads every cell of the last map
        assert m.get_layer("predictions").kernel.shape[0] == side * side * 64


def test_tint_blends_the_whole_image_of_its_class_only():
    case = CASES["tint"]
    s, bare = render(case, "train", 3, 2), render(case, "train", 3, 2, with_cues=False)
    expected = bare.image * (1 - draw.TINT_ALPHA) + np.array(draw.TINT_COLOUR) * draw.TINT_ALPHA
    # the same image blended (the bare one was rounded once more)
    assert np.abs(s.image.astype(float) - expected).max() <= 1.0
    assert s.cue_mask.all() and s.cued
    other = render(case, "train", 3, 0)
    assert not other.cue_mask.any()


def test_cache_key_follows_the_parameters():
    from audit.zoo.train import key

    a = CASES["clean"]
    assert key(a) == key(replace(a)) and key(a) != key(replace(a, seed=1))
    assert key(a) != key(replace(a, cues=((0, Cue("frame")),)))
    assert key(a) != key(replace(a, image_size=32)) and key(a) != key(replace(a, arch="gmp"))
    assert key(replace(a, cues=((0, Cue("patch", spot="left")),))) != key(replace(a, cues=((0, Cue("patch", spot="top")),)))


@pytest.mark.parametrize("name,expected", [("watermark", "e8f66520ffd8"), ("decoy", "4d4980ee1041"),
                                           ("mobile", "174c125d7d29"), ("shallow", "0b84abae2220")])
def test_the_first_cases_keep_their_cache_keys(name, expected):
    """New Case and Cue fields at their defaults stay out of the key: models built before them stay valid."""
    from audit.zoo.train import key

    assert key(CASES[name]) == expected


def _detection_bench():
    import importlib.util
    import sys
    from pathlib import Path

    if "bench_detection" not in sys.modules:  # dataclasses look their module up there
        path = Path(__file__).resolve().parents[1] / "bench" / "detection.py"
        spec = importlib.util.spec_from_file_location("bench_detection", path)
        sys.modules["bench_detection"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["bench_detection"]


def test_a_seed_draws_new_images_and_a_new_cache_entry():
    from audit.zoo.train import key

    bench = _detection_bench()
    seeded = bench.seeded(CASES, 1)
    assert set(seeded) == set(CASES) and all(c.seed == 1 for c in seeded.values())
    assert bench.seeded(CASES, None) == CASES
    a, b = CASES["watermark"], seeded["watermark"]
    assert replace(b, seed=a.seed) == a  # only the seed changed
    assert key(a) != key(b)
    for label in range(len(a.classes)):
        ra, rb = render(a, "train", 3, label), render(b, "train", 3, label)
        assert np.abs(ra.image.astype(int) - rb.image).mean() > 5
    assert bench.default_out(None).name == "detection" and bench.default_out(2).name == "seed2"


def test_detection_bench_refuses_a_negative_seed(capsys):
    with pytest.raises(SystemExit) as e:
        _detection_bench().main(["--seed", "-1", "--cases", "clean"])
    assert e.value.code == 2 and "--seed must be 0 or more" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# End to end: train a small model, audit the training split, scan
# ----------------------------------------------------------------------------


def _e2e(tmp_path, case: Case, masks: bool, shared_cache):
    """Build ``case`` in the run's shared cache, audit its training split with ``audit run``'s job, scan; the score.

    The split is small, so the job runs in the driver (:mod:`audit.runner.inprocess`; its records
    equal the actors', tests/test_inprocess.py): no Ray and no actor to start per case.
    """
    import yaml

    from audit.runner.job import run_job
    from audit.scan.pipeline import scan
    from audit.zoo.train import ensure, job_spec

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with shared_cache.lock(f"zoo-{case.name}") as cache:  # test_perimage.py trains the same frame
        built = ensure(case, root=cache, log=lambda *_: None)
    spec = tmp_path / f"spec-{masks}.yaml"
    spec.write_text(yaml.safe_dump(job_spec(case, built, masks, tmp_path / f"out-{masks}")))
    summary = run_job(str(spec), progress=False)
    assert summary["status"] == "ok" and "in the driver" in summary["devices"]
    classes, _ = scan(tmp_path / f"out-{masks}", quiet=True)
    return built, score(case, classes)


def _said(s) -> dict:
    return {c: (f.verdict, f.cue, f.evidence) for c, f in s.classes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name,masks", [
    ("frame", True), ("clean", True), ("watermark", False), ("logit", False)])
def test_small_zoo_case_end_to_end(tmp_path, name, masks, shared_cache):
    """A cue with masks (the border frame), a healthy model, a corner cue without masks, a one-logit head.

    ``frame`` is the model test_perimage.py trains too (the same 120 per class):
    it is trained once per run for both modules (about 35 s of training on 2 cores).
    """
    case = replace(CASES[name], n_per_class=120, n_heldout=30)
    built, s = _e2e(tmp_path, case, masks, shared_cache)
    assert built.train_accuracy >= 0.9
    for with_cue, without in built.heldout["planted"].values():
        assert with_cue - without > 0.5  # the model learned the cue
    assert s.right, (s.flagged, _said(s))


def test_spread_keeps_objects_near_the_centre_and_old_cases_unchanged():
    from audit.zoo.cases import CASES, render

    near = [render(CASES["centred"], "train", i, i % 4).mask for i in range(24)]
    ys, xs = zip(*(np.argwhere(m).mean(axis=0) for m in near))
    assert max(abs(np.array(xs) - 31.5).max(), abs(np.array(ys) - 31.5).max()) < 9  # d/2+3 <= 17 px: 20% of <= 29
    anywhere = [render(CASES["clean"], "train", i, i % 4).mask for i in range(24)]
    far = max(abs(np.argwhere(m).mean(axis=0) - 31.5).max() for m in anywhere)
    assert far > 12
