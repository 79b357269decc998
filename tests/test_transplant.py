"""The transplant test: a place that flips a class, pasted into other classes' images."""

import math

import numpy as np
import pytest

from audit.scan.config import DEFAULT
from audit.scan.probes import Sample, causal_tests
from audit.scan.probes.edits import paste
from audit.scan.probes.places import Spot
from audit.scan.probes.transplant import Recipients, turned_into

MIN_RECIPIENTS = DEFAULT.min_recipients

S = 16
TOP = np.zeros((S, S), bool)
TOP[:2] = True  # a thin top band
TOP_PLACE = Spot("edge:top", (0.0, 0.0, 1.0, 2 / S), TOP)


def test_turned_into_single_and_multilabel():
    base, new = np.array([0, 2, 1, 1]), np.array([1, 1, 1, 0])
    np.testing.assert_array_equal(turned_into(base, new, 1), [True, True, False, False])
    mb = np.array([[1, 0], [0, 0], [0, 1]], bool)
    mn = np.array([[1, 1], [0, 1], [0, 1]], bool)
    np.testing.assert_array_equal(turned_into(mb, mn, 1), [True, True, False])


def test_paste_takes_donors_in_turn_and_spares_kept_pixels():
    rec = np.zeros((3, 2, 2, 1), np.uint8)
    donors = np.stack([np.full((2, 2, 1), 10, np.uint8), np.full((2, 2, 1), 20, np.uint8)])
    masks = np.ones((2, 2, 2), bool)
    keep = np.zeros((3, 2, 2), bool)
    keep[2, 0, 0] = True
    spots = Recipients(rec, np.zeros(3, int), keep).spots(masks)
    assert spots[2].ravel().tolist() == [False, True, True, True] and spots[:2].all()
    out = paste(rec, donors, spots)
    assert out[0].ravel().tolist() == [10] * 4 and out[1].ravel().tolist() == [20] * 4
    assert out[2].ravel().tolist() == [0, 10, 10, 10]  # recipient 2 got donor 0, its kept pixel untouched
    assert (rec == 0).all()


def test_recipients_for_class_leaves_out_the_class_and_needs_enough():
    base = np.array([0, 1, 2] * 6)
    r = Recipients(np.zeros((18, 2, 2, 3), np.uint8), base)
    got = r.for_class(1)
    assert len(got.images) == 12 and (got.base != 1).all()
    assert r.for_class(1, DEFAULT.replace(recipients=4)) is not None or MIN_RECIPIENTS > 4
    assert Recipients(r.images[:9], base[:9]).for_class(1) is None  # 6 other-class images < MIN_RECIPIENTS


def noise(n, lo, hi, seed):
    return np.random.default_rng(seed).integers(lo, hi, (n, S, S, 3)).astype(np.uint8)


def tag_model(images):
    """1 when the top band is white (a watermark-like cue), else 0 for dark images, 2 for bright ones."""
    top = images[:, :2].reshape(len(images), -1).mean(axis=1)
    rest = images[:, 2:].reshape(len(images), -1).mean(axis=1)
    return np.where(top > 240, 1, np.where(rest > 128, 2, 0))


def fill_model(images):
    """1 when the top band is flat (any fill makes it so): occluding it *adds* class 1's evidence;
    else 0 for dark images, 2 for bright ones."""
    flat = images[:, :2].reshape(len(images), -1, 3).std(axis=1).max(axis=1) < 1
    rest = images[:, 2:].reshape(len(images), -1).mean(axis=1)
    return np.where(flat, 1, np.where(rest > 128, 2, 0))


def recipients(model):
    imgs = np.concatenate([noise(8, 0, 100, 1), noise(8, 160, 240, 2)])  # classes 0 and 2
    return Recipients(imgs, model(imgs))


@pytest.mark.parametrize("hot_on_the_cue", [False, True])
def test_a_real_cue_carries_its_class_into_other_images(hot_on_the_cue):
    cued = noise(24, 160, 240, 3)
    cued[:, :2] = 255  # class 1: the white band decides
    pool = recipients(tag_model)
    if hot_on_the_cue:  # a binary model's other class often looks where the cue is missing: still pasted there
        pool = Recipients(pool.images, pool.base, hot=np.broadcast_to(TOP, (16, S, S)).copy())
    pool = pool.for_class(1)
    r = causal_tests(tag_model, Sample(cued, [TOP_PLACE], recipients=pool, target=1), DEFAULT.replace(screen=0))
    t = r.at("edge:top")
    assert t.flip_rate == 1.0 and t.transplant_n == 16
    assert t.transplant == pytest.approx(1.0)  # every recipient turns into 1; occluding turns none


def test_a_fill_artifact_carries_nothing():
    dark = noise(24, 0, 100, 4)  # class 0 images: the model says 0 until the band goes flat
    pool = recipients(fill_model).for_class(0)
    r = causal_tests(fill_model, Sample(dark, [TOP_PLACE], recipients=pool, target=0), DEFAULT.replace(screen=0))
    t = r.at("edge:top")
    assert t.flip_rate == 1.0  # the occlusion flips every image (to 1) ...
    assert t.transplant == 0.0 and t.transplant_n == 8  # ... but the band carries no class-0 evidence


def test_no_recipients_leaves_the_transplant_unknown():
    cued = noise(24, 160, 240, 3)
    cued[:, :2] = 255
    t = causal_tests(tag_model, Sample(cued, [TOP_PLACE]), DEFAULT.replace(screen=0)).at("edge:top")
    assert math.isnan(t.transplant) and t.transplant_n == 0


def striped(n, centre, seed):
    """Vertical stripes everywhere, a centre square of brightness ``centre``."""
    imgs = noise(n, 0, 10, seed)
    imgs[:, :, ::2] = 200
    imgs[:, 5:11, 5:11] = centre
    return imgs


def plain(n, centre, seed):
    imgs = noise(n, 90, 110, seed)
    imgs[:, 5:11, 5:11] = centre
    return imgs


CENTRE = np.zeros((S, S), bool)
CENTRE[4:12, 4:12] = True


def texture_model(images):
    """1 when the left edge is striped (a background texture), else 0 for a dark centre, 2 for a bright one."""
    left = images[:, :, :3].astype(float)
    stripes = np.abs(np.diff(left, axis=2)).mean(axis=(1, 2, 3)) > 50
    centre = images[:, 5:11, 5:11].mean(axis=(1, 2, 3))
    return np.where(stripes, 1, np.where(centre > 128, 2, 0))


def test_background_transplant_carries_a_texture_class():
    from audit.scan.probes.transplant import transplant_background

    rec = np.concatenate([plain(8, 20, 1), plain(8, 240, 2)])
    pool = Recipients(rec, texture_model(rec), hot=np.broadcast_to(CENTRE, (16, S, S)).copy())
    textured = striped(12, 20, 3)
    spare = np.broadcast_to(CENTRE, (12, S, S)).copy()
    tr = transplant_background(texture_model, textured, spare, pool.for_class(1), 1, 64)
    assert tr.n == 16 and tr.pasted == 1.0 and tr.control == 0.0 and tr.rate == 1.0
    healthy = plain(12, 20, 4)  # class 0: its plain background carries nothing
    tr0 = transplant_background(texture_model, healthy, spare, pool.for_class(0), 0, 64)
    assert tr0.n == 8 and tr0.rate == 0.0
    assert transplant_background(texture_model, textured, spare, Recipients(rec, texture_model(rec)), 1, 64) is None


def test_causal_tests_add_the_background_transplant_and_with_masks_where_the_replacements_could_flag():
    rec = np.concatenate([plain(8, 20, 1), plain(8, 240, 2)])
    keep = np.broadcast_to(CENTRE, (16, S, S)).copy()
    pool = Recipients(rec, texture_model(rec), hot=keep).for_class(1)
    textured = striped(12, 20, 3)
    spare = np.broadcast_to(CENTRE, (12, S, S)).copy()
    r = causal_tests(texture_model, Sample(textured, [], spare=spare, recipients=pool, target=1), DEFAULT.replace(screen=0))
    t = r.background_transplant()
    assert r.object_rate() == 0.0 and t.flip_rate == 1.0 and t.n == 16
    masked = causal_tests(texture_model, Sample(textured, [], spare, spare=spare, recipients=pool, target=1), DEFAULT.replace(screen=0))
    mt = masked.background_transplant()  # with masks: the replacements flipped all, so it runs (the veto)
    assert masked.background_rate() >= DEFAULT.background_flip_min and mt is not None and mt.flip_rate == 1.0


def test_maps_of_finds_each_pool_image_in_any_class():
    from types import SimpleNamespace

    from audit.scan.causal import maps_of

    a = SimpleNamespace(map_ids=np.array([10, 11]), grids=np.stack([np.full((2, 2), 1.0), np.full((2, 2), 2.0)]))
    b = SimpleNamespace(map_ids=np.array([20]), grids=np.full((1, 2, 2), 3.0))
    empty = SimpleNamespace(map_ids=np.array([]), grids=None)
    got = maps_of([empty, a, b], [20, 99, 10])
    assert got.shape == (3, 2, 2)
    assert got[0].tolist() == [[3.0, 3.0], [3.0, 3.0]] and not got[1].any() and (got[2] == 1.0).all()
    assert maps_of([empty], [1]) is None
