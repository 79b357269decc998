"""With masks, the background transplant tells a background that carries a class from a class the model says
when no other object is there (replacing its background flips it, yet its background carries nothing)."""

import numpy as np

from audit.scan.config import DEFAULT
from audit.scan.probes import PROBES, CausalResult, PlaceFlip, Sample
from audit.scan.probes.base import Trial
from audit.scan.probes.transplant import Recipients, transplant_background
from audit.scan.verdict import Verdict, background_score, causal_text

S = 12


def row(probe, n, k, **kw):
    return PlaceFlip("object" if probe == "object" else "background", probe, None, "x", n, k / n, probe=probe, k=k, **kw)


def masked_result(transplant_k=None):
    """Removing the object flips none of 32, both background replacements most: a background verdict, unless
    the class's backgrounds around 16 other classes' objects turn (almost) none of them."""
    tests = [row("object", 32, 0), row("background-neutral", 32, 20), row("background-swap", 32, 24)]
    if transplant_k is not None:
        tests.append(row("background-transplant", 16, transplant_k))
    return CausalResult(n=32, tests=tests, masked=True)


def test_a_background_that_turns_no_other_object_into_the_class_is_no_cue():
    for mode in (-1, 0, 1):
        assert background_score(masked_result(), DEFAULT, mode) >= 0.5  # not run: the replacements decide
        assert background_score(masked_result(transplant_k=8), DEFAULT, mode) >= 0.5  # 50%: it carries the class
        assert background_score(masked_result(transplant_k=2), DEFAULT, mode) < 0.5  # 12% < transplant_min 0.2
    res = Verdict(causal=masked_result(transplant_k=2))
    assert "pasted around the objects of 16 images" in causal_text(res, DEFAULT)


def test_with_masks_the_transplant_pastes_around_the_recipients_objects():
    rng = np.random.default_rng(0)
    sample = rng.integers(150, 250, (4, S, S, 3)).astype(np.uint8)
    spare = np.zeros((4, S, S), bool)
    spare[:, 4:8, 4:8] = True  # the sample's objects: not pasted
    rec = np.full((6, S, S, 3), 30, np.uint8)
    keep = np.zeros((6, S, S), bool)
    keep[:, :3, :3] = True  # each recipient's object (grown): kept
    seen = []

    def predict(images):
        seen.append(images.copy())
        return (images.mean(axis=(1, 2, 3)) > 100).astype(int)  # bright: class 1

    tr = transplant_background(predict, sample, spare, Recipients(rec, np.zeros(6, int), keep=keep), 1, 64)
    pasted = seen[0][:6]  # one call: the pasted images, then the control (the same pixels flat grey)
    j = np.arange(6) % 4
    want = np.where((~spare[j] & ~keep)[..., None], sample[j], rec)  # an exact reference
    np.testing.assert_array_equal(pasted, want)
    assert (tr.rate, tr.n, tr.pasted, tr.control) == (1.0, 6, 1.0, 0.0)


def test_with_masks_it_runs_only_where_the_background_replacements_could_flag():
    probe = PROBES["background-transplant"]
    imgs = np.zeros((8, S, S, 3), np.uint8)
    masks = np.zeros((8, S, S), bool)
    s = Sample(imgs, [], masks, target=0, spare=masks,
               recipients=Recipients(imgs, np.ones(8, int), keep=masks), cfg=DEFAULT)
    sel = np.ones(8, bool)
    obj = Trial(PROBES["object"], "object", None, "inpaint", sel, flips={i: False for i in range(8)})
    for k, due in ((2, False), (3, True)):  # 2 of 8 (25%) < background_flip_min 0.35 <= 3 of 8
        bg = Trial(PROBES["background-neutral"], "background", None, "neutral", sel, flips={i: i < k for i in range(8)})
        assert probe.due([obj, bg], s, DEFAULT) is due
    assert not probe.due([obj], s, DEFAULT)  # no replacement ran
    gone = Trial(PROBES["object"], "object", None, "inpaint", sel, flips={i: True for i in range(8)})
    assert not probe.due([gone, bg], s, DEFAULT)  # removing the object flipped 8 of 8: no background verdict
