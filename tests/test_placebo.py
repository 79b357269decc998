"""The placebo occlusion: a place's box at random places of the class's own images, the rate the place must clear."""

import numpy as np
import pytest

from audit.engine.stats import border_mask, box_mask
from audit.scan.config import DEFAULT
from audit.scan.probes import Sample, causal_tests
from audit.scan.probes.placebo import box_shape, random_boxes
from audit.scan.probes.places import place_bank
from audit.scan.verdict import causal_cue, place_flip_score

S = 16


def test_random_boxes_keep_the_size_and_miss_the_place():
    corner = box_mask((0, 0, 1 / 3, 1 / 3), (64, 64))
    m = random_boxes(corner, 40, seed=3)
    assert (m.sum(axis=(1, 2)) == corner.sum()).all() and not (m & corner).any()
    assert len({tuple(np.argwhere(x)[0]) for x in m}) > 5  # the positions vary
    np.testing.assert_array_equal(m, random_boxes(corner, 40, seed=3))  # deterministic
    band = border_mask((64, 64), 0.04)  # a band: a square of as many pixels, off the band
    assert box_shape(band) == (27, 27) and round(np.sqrt(band.sum())) == 27
    mb = random_boxes(band, 10, seed=1)
    assert (mb.sum(axis=(1, 2)) == 27 * 27).all() and not (mb & band).any()
    top = box_mask((0, 0, 1, 0.8), (S, S))  # no offset avoids it: the least overlap (the lowest position)
    mt = random_boxes(top, 3, seed=0)
    assert [np.nonzero(x.any(axis=1))[0][0] for x in mt] == [3, 3, 3]


def dark_scenes(n, seed=0):
    """Images almost entirely dark with a few bright pixels: an object that fills the image."""
    rng = np.random.default_rng(seed)
    imgs = np.full((n, S, S, 3), 20, np.uint8)
    for i in range(n):
        ys, xs = rng.integers(0, S, 6), rng.integers(0, S, 6)
        imgs[i, ys, xs] = 250
    return imgs


def filled_model(images):
    """Class 1 while at least 92% of the pixels are the object's (value 20): occluding any large enough area
    (the mean-colour fill is a little brighter) flips it."""
    dark = (images == 20).all(axis=3).reshape(len(images), -1).mean(axis=1)
    return (dark >= 0.92).astype(int)


def corner_model(images):
    return (images[:, :3, :3].mean(axis=(1, 2, 3)) > 200).astype(int)


def test_a_place_that_any_same_size_box_flips_is_no_cue():
    s = Sample(dark_scenes(32), place_bank((S, S)))
    res = causal_tests(filled_model, s, DEFAULT)
    corner = res.at("corner:top_left")  # every place flips all; the smallest go on past the screening
    assert corner.flip_rate == 1.0 and corner.n == DEFAULT.min_tested == 16  # all of 16 flipped: settled
    placebo = res.placebo("corner:top_left")
    assert placebo is not None and placebo.flip_rate == 1.0 and placebo.n == 32
    assert place_flip_score(1.0, 0.0) == 1.0  # judged against the other classes alone it would be a cue
    for mode in (-1, 0, 1):
        assert causal_cue(res, {}, DEFAULT, mode=mode).score < 0.5


def test_a_corner_tag_clears_its_placebo():
    imgs = np.full((32, S, S, 3), 120, np.uint8)
    imgs[:, :3, :3] = 250
    res = causal_tests(corner_model, Sample(imgs, place_bank((S, S))), DEFAULT)
    corner = res.at("corner:top_left")
    placebo = res.placebo("corner:top_left")
    # none of the screening images flipped: those settle it (at most 32% + the margin stays under 50%)
    assert corner.flip_rate == 1.0 and placebo.flip_rate == 0.0 and placebo.n == DEFAULT.screen == 8
    ran = [t for t in res.tests if t.spec.is_placebo and t.n]
    assert ran and all(t.n == 8 for t in ran) and res.forwards["placebo"] == 8 * len(ran)
    found = causal_cue(res, {}, DEFAULT, mode=-1)
    assert found.score >= 0.5 and found.flip.place == "corner:top_left"
    assert res.placebo("corner:bottom_right") is None  # a place that flipped nothing gets no placebo


@pytest.mark.parametrize("flip, others, placebo, want", [
    (0.8, 0.0, float("nan"), 0.5 * min(0.8 / 0.5, 0.8 / 0.3)),  # no placebo: the fixed thresholds
    (0.8, 0.0, 0.2, 0.5 * min(0.8 / 0.5, 0.8 / 0.3)),  # a placebo under cue_flip_min changes nothing
    (0.8, 0.0, 0.9, 0.5 * 0.8 / 1.0),  # a placebo above the place: under 0.5 (need 0.9 + placebo_margin)
    (0.9, 0.0, 0.6, 0.5 * 0.9 / 0.7),  # a placebo over cue_flip_min raises the flip needed
    (0.7, 0.1, 0.7, None),  # the place at its placebo: not clear of it
    (0.75, 0.0, 0.7, None),  # ... nor within placebo_margin of it
    (1.0, 0.0, 1.0, None),
])
def test_place_flip_score_needs_the_placebo_cleared(flip, others, placebo, want):
    got = place_flip_score(flip, others, DEFAULT, placebo)
    if want is None:
        assert got < 0.5
    else:
        assert got == pytest.approx(min(1.0, want))
