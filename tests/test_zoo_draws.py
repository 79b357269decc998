"""The drawn zoo: deterministic draws, cues painted where they should be, the learned check, the scorer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from audit.zoo.paint import band_mask, paint
from audit.zoo.space import CANVAS, FAMILIES, DrawnCase, DrawnCue, draw_case
from audit.zoo.tally import CaseOutcome, tally, wilson


def _case(cue: DrawnCue, **kw) -> DrawnCase:
    """Two shape classes on plain backgrounds, class 1 carrying ``cue``, 64 px RGB (no resizing)."""
    base = dict(seed=3, classes=("disc", "cross"), objects="shapes", backgrounds="plain", cues=((1, cue),),
                distractors=(), arch="gap", head="softmax", side=CANVAS, channels=3, masks=True)
    return DrawnCase(**{**base, **kw})


def test_draws_are_a_function_of_the_seed():
    assert draw_case(7) == draw_case(7)
    cases = [draw_case(s) for s in range(40)]
    assert len({c for c in cases}) == 40
    c = next(c for c in cases if c.cues)
    k = c.cues[0][0]
    a, b = paint(c, "train", 2, k), paint(c, "train", 2, k)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.cue_mask, b.cue_mask)
    assert not np.array_equal(a.image, paint(c, "train", 3, k).image)
    assert a.image.shape == (c.side, c.side, c.channels)


def test_the_space_is_covered():
    cases = [draw_case(s) for s in range(300)]
    fams = {cue.family for c in cases for _, cue in c.cues}
    assert fams == set(FAMILIES)
    assert {c.arch for c in cases} == {"gap", "flatten", "residual", "depthwise"}
    assert {c.head for c in cases} == {"softmax", "sigmoid"}
    assert {c.channels for c in cases} == {1, 3}
    assert {c.objects for c in cases} == {"shapes", "digits"}
    assert min(c.side for c in cases) == 28 and max(c.side for c in cases) == 128
    shares = [cue.share for c in cases for _, cue in c.cues]
    assert min(shares) >= 0.05 and max(shares) == 1.0 and any(s < 0.5 for s in shares)
    assert {cue.place for c in cases for _, cue in c.cues if cue.family == "patch"} == {"fixed", "corner", "random"}
    assert any(c.distractors for c in cases) and any(not c.cues for c in cases)
    assert all(c.head == "softmax" or len(c.classes) == 2 for c in cases)


def _pair(case: DrawnCase, i: int = 0):
    """Image ``i`` of class 1 without and with its cue (all of class 1 carries it)."""
    return paint(case, "train", i, 1, cues=False), paint(case, "train", i, 1)


@pytest.mark.parametrize("family", ["mark", "patch", "noise"])
def test_a_placed_cue_is_painted_in_its_box_only(family):
    cue = DrawnCue(family, size=9, place="fixed", at=(40, 6), opacity=1.0, colour=(250, 20, 200), pattern=4)
    for i in range(4):
        without, with_ = _pair(_case(cue), i)
        diff = np.abs(with_.image.astype(int) - without.image.astype(int)).sum(-1) > 0
        box = np.zeros((CANVAS, CANVAS), bool)
        box[6:15, 40:49] = True
        assert diff.any() and not (diff & ~box).any()
        assert with_.cue_mask.any() and not (with_.cue_mask & ~box).any() and (diff <= with_.cue_mask).all()
        assert np.array_equal(without.mask, with_.mask) and not (with_.mask & box).any()
        assert not without.cue_mask.any() and with_.cue == 1 and without.cue == -1


def test_a_corner_cue_moves_between_corners():
    cue = DrawnCue("patch", size=8, place="corner", colour=(0, 255, 0))
    corners = set()
    for i in range(12):
        m = paint(_case(cue), "train", i, 1).cue_mask
        ys, xs = np.nonzero(m)
        assert m.sum() == 64 and xs.max() - xs.min() == 7
        corners.add((xs.min() < 32, ys.min() < 32))
        assert xs.min() in (2, CANVAS - 10) and ys.min() in (2, CANVAS - 10)
    assert len(corners) >= 3


@pytest.mark.parametrize("family", ["frame", "band"])
def test_frames_and_bands_cover_their_edge(family):
    cue = DrawnCue(family, size=3, edge="left", opacity=1.0, colour=(255, 0, 0))
    without, with_ = _pair(_case(cue))
    want = band_mask("left", 3)
    if family == "frame":
        want = want | band_mask("right", 3) | band_mask("top", 3) | band_mask("bottom", 3)
    assert np.array_equal(with_.cue_mask, want)
    diff = np.abs(with_.image.astype(int) - without.image.astype(int)).sum(-1) > 0
    assert not (diff & ~want).any() and diff[want].mean() > 0.9
    assert with_.image[want][:, 0].min() >= 235  # red, jittered by at most 10 (rounded)


def test_a_tint_changes_every_pixel_towards_its_colour():
    colour = np.array([255.0, 0.0, 0.0])
    without, with_ = _pair(_case(DrawnCue("tint", opacity=0.4, colour=(255, 0, 0))))
    assert with_.cue_mask.all()
    ref = np.clip(np.rint(without.image.astype(float) * 0.6 + colour * 0.4), 0, 255)
    assert np.abs(with_.image.astype(float) - ref).max() <= 1.0


@pytest.mark.parametrize("family", ["object_colour", "object_texture"])
def test_object_cues_change_the_object_only(family):
    cue = DrawnCue(family, opacity=1.0, colour=(20, 230, 40))
    for i in range(3):
        without, with_ = _pair(_case(cue), i)
        assert np.array_equal(with_.cue_mask, with_.mask) and with_.mask.any()
        diff = np.abs(with_.image.astype(int) - without.image.astype(int)).sum(-1) > 0
        inner = with_.mask & ~np.roll(~with_.mask, 1, 0) & ~np.roll(~with_.mask, -1, 0)
        assert not (diff & ~with_.mask).any() and diff[inner].mean() > 0.5
        if family == "object_colour":  # the cue's colour, with the object's fine noise
            assert np.abs(with_.image[inner].astype(float).mean(0) - cue.colour).max() < 8


@pytest.mark.parametrize("family", ["texture", "scene"])
def test_background_cues_change_the_background(family):
    cue = DrawnCue(family, colour=(0, 0, 0), pattern=2)
    without, with_ = _pair(_case(cue))
    assert np.array_equal(with_.cue_mask, ~with_.mask)
    diff = np.abs(with_.image.astype(int) - without.image.astype(int)).sum(-1) > 8
    assert diff[~with_.mask].mean() > 0.5


def test_one_channel_and_resized_draws_keep_masks_aligned():
    cue = DrawnCue("patch", size=8, place="fixed", at=(8, 48), colour=(255, 255, 255))
    p = paint(_case(cue, side=32, channels=1), "train", 0, 1)
    assert p.image.shape == (32, 32, 1) and p.mask.shape == p.cue_mask.shape == (32, 32)
    assert p.cue_mask[24:28, 4:8].all() and p.cue_mask.sum() == 16
    assert p.image[24:28, 4:8, 0].min() >= 240


def test_digits_are_objects():
    case = _case(DrawnCue("tint", opacity=0.3), classes=("3", "7"), objects="digits", object_size=(24, 24))
    a, b = paint(case, "train", 0, 0), paint(case, "heldout", 0, 0)
    assert 40 < a.mask.sum() < 24 * 24 and b.mask.any()


def test_the_paired_counterfactual_differs_only_by_the_cue():
    cue = DrawnCue("patch", size=7, place="random", colour=(255, 255, 0))
    case = _case(cue)
    plain = paint(case, "heldout", 5, 0, cues=False, force=1, show=False)
    forced = paint(case, "heldout", 5, 0, cues=False, force=1)
    diff = np.abs(forced.image.astype(int) - plain.image.astype(int)).sum(-1) > 0
    assert diff.any() and not (diff & ~forced.cue_mask).any() and forced.cue == 1 and plain.cue == -1


# ----------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [  # Newcombe (1998), Stat Med 17:857, Table II, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_published_intervals(k, n, lo, hi):
    got = wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=6e-5) and got[1] == pytest.approx(hi, abs=6e-5)


def test_tally_counts_hits_misses_and_false_flags():
    outs = [
        CaseOutcome("a", ["x"], [], ["y", "z"], ["x", "y"], {"x": "mark", "y": "none", "z": "none"}),
        CaseOutcome("b", ["p", "q"], ["r"], ["s"], ["p", "r"], {"p": "tint", "q": "mark", "r": "band", "s": "none"}),
        CaseOutcome("c", [], [], ["u", "v"], ["v"], {"u": "patch", "v": "none"}),  # a control, flagged
        CaseOutcome("d", [], [], ["w"], [], {"w": "frame"}),  # a control, quiet
    ]
    t = tally(outs)
    assert (t.recall.k, t.recall.n) == (2, 3)  # x, p found; q missed
    assert (t.precision.k, t.precision.n) == (2, 4)  # r (partial) counts neither way; y and v false
    assert (t.controls, t.controls_flagged) == (2, 1)
    assert (t.by_family["mark"][0].k, t.by_family["mark"][0].n) == (1, 2)
    assert (t.by_family["none"][1].k, t.by_family["none"][1].n) == (0, 2)
    assert "band" not in t.by_family and "frame" not in t.by_family
    assert t.ignored == {"frame": 1, "patch": 1}
    lo, hi = t.recall.interval
    assert (lo, hi) == pytest.approx(wilson(2, 3)) and 0.2 < lo < 0.67 < hi < 1


# ----------------------------------------------------------------------------
# The learned check
# ----------------------------------------------------------------------------


@pytest.mark.slow  # two trainings: about 25 s on a free core
def test_the_learned_check_tells_a_learned_cue_from_an_ignored_one(tmp_path):
    from audit.zoo.learned import cue_moves, train
    from audit.zoo.paint import split_of

    cue = DrawnCue("patch", size=10, place="fixed", at=(50, 4), opacity=1.0, colour=(255, 255, 0))
    # ring and bar: shapes that the blind model tells apart within the steps (disc and cross stayed
    # near 75% and its coin-flip answers moved with any yellow patch)
    case = _case(cue, classes=("ring", "bar"), side=32, n_per_class=64, n_heldout=24, max_steps=24 * 8, seed=12)
    model, _, _ = train(case, split_of(case, "train", case.n_per_class))
    learned = cue_moves(case, model)[0]
    assert learned.n >= 10 and learned.status == "learned", learned
    blind = replace(case, cues=())  # the same images, never a cue: the model cannot have learned it
    model, _, _ = train(blind, split_of(blind, "train", blind.n_per_class))
    ignored = cue_moves(case, model)[0]
    assert ignored.n >= 10 and ignored.status == "ignored", ignored


def test_cue_check_statuses_and_what_counts():
    from audit.zoo.learned import BuiltDraw, CueCheck

    def check(moved, n):
        return CueCheck(1, "cross", "patch", moved, n)

    assert [check(m, n).status for m, n in ((5, 10), (1, 10), (2, 10), (9, 9), (0, 0))] == \
        ["learned", "ignored", "partial", "partial", "partial"]
    built = BuiltDraw("r", "d", "m", "k", train_accuracy=0.95, checks=[check(1, 20), check(12, 20)])
    assert built.with_status("learned") == ["cross"] and built.fitted and not built.negative_control
    built.checks = [check(1, 20)]
    assert built.negative_control
    built.train_accuracy = 0.8
    assert not built.fitted


class _Striped:
    """A stand-in model: class 1 when the image carries the cross's stripes (the cue), else class 0."""

    def predict(self, x, batch_size=None, verbose=0):
        stripes = np.abs(np.diff(x[..., 0], axis=2)).mean(axis=(1, 2)) > 0.2
        return np.eye(2)[stripes.astype(int)]


def test_object_accuracy_says_which_classes_the_model_tells_without_their_cues():
    from audit.zoo.learned import object_accuracy

    case = _case(DrawnCue("texture", opacity=1.0, share=1.0), n_heldout=6)
    disc, cross = object_accuracy(case, _Striped())
    assert disc == 1.0  # a cue-free disc is 'not striped': class 0, right
    assert cross == 0.0  # a cue-free cross is not striped either: the model never learned the cross
