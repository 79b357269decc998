"""Sequential testing: an identity-keeping edit undecided because of its placebo grows the placebo's sample."""

import math
from dataclasses import dataclass, replace

import numpy as np

from audit.scan import causal
from audit.scan.causal import CausalTests, _Grow
from audit.scan.config import DEFAULT
from audit.scan.probes import CausalResult, PlaceFlip
from audit.scan.verdict import others_rate, placebo_rates


def flip(probe: str, k: int, n: int, place: str = "object:greyscale") -> PlaceFlip:
    return PlaceFlip("transform", place, None, "greyscale", n, k / n, probe=probe, k=k)


@dataclass
class FakeIntervener:
    forwards: int = 0


def grow_with(results: dict, budget: int = 10_000, flips_per_image: float = 0.0):
    """A _Grow whose extra runs flip ``flips_per_image`` of the images they test (rounded down)."""
    out = CausalTests(results=dict(results), budget=budget)
    plans = {k: causal.TestPlan(k[0], None, tuple(f"{k[0]}/{i}" for i in range(32)),
                         pool=tuple(f"{k[0]}/{i}" for i in range(200))) for k in results}
    iv = FakeIntervener()
    g = _Grow(iv, [], None, (16, 16), {}, True, DEFAULT, out, 0, plans)
    calls = []

    def run(plan, keep):
        calls.append((plan.class_id, len(plan.ids), keep))
        iv.forwards += len(plan.ids) * 2
        n = len(plan.ids)
        return CausalResult(n=n, tests=[flip(p, int(n * flips_per_image), n, place) for p, place in keep])

    g._run = run
    return g, calls


def test_the_placebo_class_grows_to_the_undecided_class_size():
    own = flip("object-greyscale", 78, 80)
    g, calls = grow_with({(0, None): CausalResult(80, [own]), (1, None): CausalResult(32, [flip("object-greyscale", 1, 8)]),
                          (2, None): CausalResult(32, [flip("object-greyscale", 0, 8)])})
    before = others_rate(own, placebo_rates([g.out.results[(1, None)], g.out.results[(2, None)]]), -1)
    assert before > 0.45  # 1 of 8 reaches 47% at its upper end: 0.91 - 0.47 < identity_specific_min
    assert g._grow_placebo(0, own)
    assert calls == [(1, 72, {("object-greyscale", "object:greyscale")})]  # the class it flips most, to 80
    grown = g.out.results[(1, None)].tests[0]
    assert (grown.n, grown.k) == (80, 1) and g.out.extended == 1
    assert len(g.plans[(1, None)].ids) == 32 + 72 and {f"1/{i}" for i in range(32)} <= set(g.plans[(1, None)].ids)
    after = others_rate(own, placebo_rates([g.out.results[(1, None)], g.out.results[(2, None)]]), -1)
    assert after < 0.1 and own.low - after >= DEFAULT.identity_specific_min  # now decided
    assert not g._grow_placebo(0, own)  # class 1 holds as many images now; class 2 flips less
    assert len(calls) == 1


def test_nothing_grows_for_other_tests_without_budget_or_when_the_placebo_is_as_large():
    place = flip("place", 30, 32, "corner:top_left")
    g, calls = grow_with({(0, None): CausalResult(32, [place]),
                          (1, None): CausalResult(32, [flip("place", 0, 8, "corner:top_left")])})
    assert not g._grow_placebo(0, place)  # a place is judged against the others' median, not a placebo
    own = flip("object-hue", 60, 64, "object:hue")
    g, calls = grow_with({(0, None): CausalResult(64, [own]), (1, None): CausalResult(32, [flip("object-hue", 0, 8, "object:hue")])},
                         budget=50)
    assert not g._grow_placebo(0, own) and calls == []  # 56 images x 2 forward passes > 50
    g, calls = grow_with({(0, None): CausalResult(32, [flip("object-hue", 20, 32, "object:hue")]),
                          (1, None): CausalResult(32, [flip("object-hue", 3, 32, "object:hue")])})
    assert not g._grow_placebo(0, g.out.results[(0, None)].tests[0]) and calls == []


def redness(images) -> np.ndarray:
    """Class 0 when the red channel's mean is over 128, else 1 (a model that decides by colour alone)."""
    x = np.asarray(images, np.float64)
    return np.where(x[..., 0].mean(axis=(1, 2)) > 128, 0, 1)


class ColourIntervener(FakeIntervener):
    def __init__(self, donors):
        super().__init__()
        self.donors = donors

    def call(self, fn, *a):
        return fn(*a)

    def load(self, ids):
        return self.donors[:len(ids)], None

    def predict(self, images):
        self.forwards += len(images)
        return redness(images)


def test_an_undecided_colour_transplant_takes_the_rest_of_the_pool():
    rng = np.random.default_rng(0)
    red = np.zeros((32, 8, 8, 3), np.uint8)
    red[..., 0] = rng.integers(170, 230, (32, 8, 8))
    others = rng.integers(40, 110, (48, 8, 8, 3)).astype(np.uint8)  # dull images the model calls 1
    assert (redness(others) == 1).all() and (redness(red) == 0).all()
    t = PlaceFlip("transplant", "image:colour-transplant", None, "colour-transfer", 16, 10 / 16, 1.0, 10 / 16, 16,
                  probe="colour-transplant", k=10, to_class=0)
    iv = ColourIntervener(red)
    out = CausalTests(results={(0, None): CausalResult(32, [t])}, budget=10_000)
    pool = causal.Pool(recipients=causal.Recipients(others, redness(others)))
    plan = causal.TestPlan(0, None, tuple(f"0/{i}" for i in range(32)))
    g = _Grow(iv, [], pool, (8, 8), {}, False, DEFAULT, out, 0, {(0, None): plan})
    assert g._grow_transplant(plan, t)
    grown = out.results[(0, None)].tests[0]
    # its recipients double: the 16 after the first 16 all turn red (their control, each other's colours, none)
    assert (grown.n, grown.k, grown.transplant_n) == (32, 26, 32) and grown.flip_rate == 26 / 32
    assert iv.forwards == 2 * 16 and out.extended == 1
    assert g._grow_transplant(plan, grown)  # the pool's last 16
    grown = out.results[(0, None)].tests[0]
    assert (grown.n, grown.k) == (48, 42) and iv.forwards == 2 * 32
    assert not g._grow_transplant(plan, grown)  # no recipients left (and none past the pool)
    assert not g._grow_placebo(0, grown)  # a transplant's placebo does not grow with the class's images


def test_the_other_class_colour_transplant_grows_to_the_judged_class_recipients():
    """A colour transplant is judged against the other class's own colour transplant: where that one
    had 16 recipients against this one's 52, it takes 36 more of the pool's (its interval narrows)."""
    rng = np.random.default_rng(1)
    dull = rng.integers(40, 110, (32, 8, 8, 3)).astype(np.uint8)  # class 1's sample
    red = np.zeros((60, 8, 8, 3), np.uint8)
    red[..., 0] = rng.integers(170, 230, (60, 8, 8))  # the pool's images of class 0
    own = PlaceFlip("transplant", "image:colour-transplant", None, "colour-transfer", 52, 27 / 52, 1.0, 27 / 52, 52,
                    probe="colour-transplant", k=27, to_class=0)
    other = replace_flip(own, n=16, k=1)
    iv = ColourIntervener(dull)
    out = CausalTests(results={(0, None): CausalResult(32, [own]), (1, None): CausalResult(32, [other])}, budget=10_000)
    pool = causal.Pool(recipients=causal.Recipients(np.concatenate([red, dull]), redness(np.concatenate([red, dull]))))
    plans = {(c, None): causal.TestPlan(c, None, tuple(f"{c}/{i}" for i in range(32))) for c in (0, 1)}
    g = _Grow(iv, [], pool, (8, 8), {}, False, DEFAULT, out, 0, plans)
    assert g._grow_placebo(0, own)
    grown = out.results[(1, None)].tests[0]
    # class 1's dull colours given to 36 more red images turn them all into class 1; the control none
    assert (grown.n, grown.k, grown.transplant_n) == (52, 37, 52) and iv.forwards == 2 * 36
    assert not g._grow_placebo(0, own)  # as many recipients as the judged class now


def replace_flip(t: PlaceFlip, n: int, k: int) -> PlaceFlip:
    from dataclasses import replace

    return replace(t, n=n, k=k, flip_rate=k / n, transplant=k / n, transplant_n=n)


@dataclass
class Maps:
    class_id: int
    grids: np.ndarray
    map_ids: list


def border_redness(images) -> np.ndarray:
    """Class 0 when the 3-pixel border's red mean is over 128, else 1 (a model that reads the background)."""
    x = np.asarray(images, np.float64)[..., 0]
    ring = np.ones(x.shape[1:], bool)
    ring[3:-3, 3:-3] = False
    return np.where(x[:, ring].mean(axis=1) > 128, 0, 1)


def test_an_undecided_background_transplant_takes_the_rest_of_the_pool():
    rng = np.random.default_rng(2)
    sample = np.full((32, 16, 16, 3), 90, np.uint8)
    sample[..., 0] = 210  # class 0: red backgrounds ...
    sample[:, 5:11, 5:11] = 60  # ... around a grey object in the middle
    rec = rng.integers(40, 110, (48, 16, 16, 3)).astype(np.uint8)  # other classes' dull images: class 1
    hot = np.zeros((48, 16, 16), bool)
    hot[:, 4:12, 4:12] = True
    grids = np.zeros((32, 8, 8), np.float32)
    grids[:, 3:5, 3:5] = 1.0  # each sample image's map: hot in the middle
    ids = tuple(f"0/{i}" for i in range(32))
    t = PlaceFlip("transplant", "background", None, "pasted", 16, 6 / 16, math.nan, 6 / 16, 16,
                  probe="background-transplant", k=6)
    iv = ColourIntervener(sample)
    iv.predict = lambda images: (setattr(iv, "forwards", iv.forwards + len(images)), border_redness(images))[1]
    out = CausalTests(results={(0, None): CausalResult(32, [t])}, budget=10_000)
    pool = causal.Pool(recipients=causal.Recipients(rec, border_redness(rec), hot=hot))
    plan = causal.TestPlan(0, None, ids)
    g = _Grow(iv, [Maps(0, grids, list(ids))], pool, (16, 16), {}, False, DEFAULT, out, 0, {(0, None): plan})
    assert (border_redness(rec) == 1).all() and (border_redness(sample) == 0).all()
    assert g._grow_transplant(plan, t, want=32)
    grown = out.results[(0, None)].tests[0]
    # the 32 recipients after the first 16 get the red background around their hot areas: all turn (+32)
    assert (grown.n, grown.k) == (48, 38) and grown.flip_rate == 38 / 48 and iv.forwards == 2 * 32
    assert not g._grow_transplant(plan, grown)  # no recipients left


def test_a_transplant_grows_past_the_pool_up_to_sequential_max_loading_the_rest_once():
    rng = np.random.default_rng(3)
    red = np.zeros((32, 8, 8, 3), np.uint8)
    red[..., 0] = rng.integers(170, 230, (32, 8, 8))
    pool_imgs = rng.integers(40, 110, (24, 8, 8, 3)).astype(np.uint8)
    past = rng.integers(40, 110, (200, 8, 8, 3)).astype(np.uint8)
    loads = []

    def more():
        loads.append(1)
        return causal.Recipients(past, redness(past))

    t = PlaceFlip("transplant", "image:colour-transplant", None, "colour-transfer", 16, 9 / 16, 1.0, 9 / 16, 16,
                  probe="colour-transplant", k=9, to_class=0)
    iv = ColourIntervener(red)
    out = CausalTests(results={(0, None): CausalResult(32, [t])}, budget=0)  # the budget is spent
    pool = causal.Pool(recipients=causal.Recipients(pool_imgs, redness(pool_imgs)))
    plan = causal.TestPlan(0, None, tuple(f"0/{i}" for i in range(32)))
    g = _Grow(iv, [], pool, (8, 8), {}, False, DEFAULT, out, 0, {(0, None): plan}, more)
    sizes = []
    while g._grow_transplant(plan, out.results[(0, None)].tests[0]):
        sizes.append(out.results[(0, None)].tests[0].n)
    assert sizes == [32, 64, 128] and loads == [1]  # doubling; the images past the pool loaded once
    last = out.results[(0, None)].tests[0]
    assert last.k == 9 + 112 and iv.forwards == 2 * 112  # every new recipient turned red; its control none


def test_a_grown_sample_runs_only_the_undecided_test_and_its_placebo():
    from types import SimpleNamespace

    place, other = flip("place", 16, 32, "edge:top"), flip("object-hue", 30, 32, "object:hue")
    from audit.scan.read import sample_ids

    g, calls = grow_with({(0, None): CausalResult(32, [place, other])}, budget=10_000, flips_per_image=0.5)
    plan = g.plans[(0, None)]
    plan = g.plans[(0, None)] = replace(plan, ids=tuple(sorted(sample_ids(plan.pool, 32))))  # as planned
    g._first[(0, None)] = frozenset(plan.ids)
    g._verdict = lambda plan, res: SimpleNamespace(undecided=res.tests[0])  # the place stays undecided
    g.until_decided(plan)
    kept = {("place", "edge:top"), ("placebo", "edge:top")}
    assert [(n, keep) for _, n, keep in calls] == [(32, kept), (64, kept)]  # 32 -> 64 -> 128 = sequential_max
    grown, untouched = g.out.results[(0, None)].tests
    assert (grown.n, grown.k) == (128, 16 + 16 + 32) and (untouched.n, untouched.k) == (32, 30)
    assert g.out.results[(0, None)].stopped == {("place", "edge:top"): "max"}  # 200 images, 128 at most
    g, calls = grow_with({(0, None): CausalResult(32, [place])}, budget=32 * 3 - 1, flips_per_image=0.5)
    g._verdict = lambda plan, res: SimpleNamespace(undecided=res.tests[0])
    g.until_decided(g.plans[(0, None)])
    assert calls == []  # 32 more images x (1 + 2 tests) > the budget: insufficient_data stands
    assert g.out.results[(0, None)].stopped == {("place", "edge:top"): "budget"}


def test_the_evidence_says_why_a_rate_stayed_undecided():
    """Every image of the group tested, the budget spent, the limit reached: each its own sentence."""
    from audit.scan.verdict import Verdict, _conclusion

    t = flip("place", 16, 32, "edge:top")
    for why, words in (("all", "every image of the group was tested"), ("budget", "raise --causal-budget"),
                       ("max", f"limit of {DEFAULT.sequential_max} images"), ("", "more images decide it")):
        res = Verdict(verdict="insufficient_data", causal=CausalResult(32, [t], stopped={("place", "edge:top"): why}))
        res.undecided = t
        text = _conclusion(res, None, DEFAULT)
        assert "changes 50% of 32 predictions" in text and words in text, text
    res.causal = CausalResult(32, [t], stopped={("place", "edge:top"): "all"})
    assert "raise --causal-budget" not in _conclusion(res, None, DEFAULT)  # more budget would not help


def test_a_later_round_grows_the_placebo_its_verdict_uses():
    """Greyscale flips class 0 by 27 of 32; class 1 (tinted) by 31 of 32, class 2 by 1 of 8.  Against
    class 1 nothing is left to decide (not specific); once a round flags class 1, class 2 is the placebo,
    whose 1 of 8 straddles the rule, so the next round grows class 2's sample before judging again."""
    own = flip("image-greyscale", 27, 32, "image:greyscale")
    g, calls = grow_with({(0, None): CausalResult(32, [own]),
                          (1, None): CausalResult(32, [flip("image-greyscale", 31, 32, "image:greyscale")]),
                          (2, None): CausalResult(32, [flip("image-greyscale", 1, 8, "image:greyscale")])})
    need = DEFAULT.identity_specific_min

    def verdict(plan, res):  # the identity rule alone: undecided while the gap's interval straddles it
        t = res.tests[0]
        o = g.out.others(plan.class_id)
        lo, hi = t.low - others_rate(t, o, -1), t.high - others_rate(t, o, 1)
        return type("V", (), {"undecided": t if lo < need <= hi else None})()

    g._verdict = verdict
    g.until_decided(g.plans[(0, None)])
    assert calls == []  # judged against class 1: clearly not specific, decided
    g.out.forwards = 0
    g.again({0}, frozenset({1}))
    assert g.out.flagged_before[0] == frozenset({1})
    assert calls == [(2, 24, {("image-greyscale", "image:greyscale")})]  # class 2 grown to class 0's 32
    assert (g.out.results[(2, None)].tests[0].n, g.out.results[(2, None)].tests[0].k) == (32, 1)
    assert g.out.forwards == 48  # 24 images x (1 + 1 edit)
    assert verdict(g.plans[(0, None)], g.out.results[(0, None)]).undecided is None  # decided now


def test_a_test_grows_on_images_another_test_grew_by():
    """The hot area straddles first and grows the sample to 64 images; then the shift straddles: it ran on
    the first 32 only, so it runs on the 32 the hot area grew by, though the group holds 64 already."""
    hot, shift = flip("place", 16, 32, "hot area"), flip("image-shift", 26, 32, "image:shift")
    g, calls = grow_with({(0, None): CausalResult(32, [hot, shift])}, flips_per_image=0.8)
    g.plans[(0, None)] = replace(g.plans[(0, None)], pool=g.plans[(0, None)].pool[:64])

    def verdict(plan, res):
        by = {t.place: t for t in res.tests}
        t = by["hot area"] if by["hot area"].n < 64 else by["image:shift"] if by["image:shift"].n < 64 else None
        return type("V", (), {"undecided": t})()

    g._verdict = verdict
    g.until_decided(g.plans[(0, None)])
    assert [(c, n) for c, n, _ in calls] == [(0, 32), (0, 32)]
    assert calls[1][2] == {("image-shift", "image:shift")}
    tests = {t.place: t for t in g.out.results[(0, None)].tests}
    assert tests["hot area"].n == 64 and tests["image:shift"].n == 64 and tests["image:shift"].k == 26 + 25
    assert g._seen((0, None), tests["image:shift"]) == frozenset(g.plans[(0, None)].ids)
    assert g.out.results[(0, None)].stopped == {}  # decided: no reason to give


def test_when_the_undecided_test_has_every_image_another_straddling_test_grows():
    """The hot area straddles and has seen all 64 images of the group; the shift, seen on 32, straddles
    too: it grows on the other 32 rather than the group stopping with it at its first sample."""
    hot, shift = flip("place", 40, 64, "hot area"), flip("image-shift", 26, 32, "image:shift")
    g, calls = grow_with({(0, None): CausalResult(64, [hot, shift])}, flips_per_image=0.8)
    g.plans[(0, None)] = replace(g.plans[(0, None)], pool=g.plans[(0, None)].pool[:64])
    g.seen[(0, None, "place", "hot area")] = frozenset(g.plans[(0, None)].pool)
    g._verdict = lambda plan, res: type("V", (), {"undecided": res.tests[0]})()  # the hot area, always
    g._straddling = lambda plan, res: [t for t in res.tests if t.place == "image:shift" and t.n < 64]
    g.until_decided(g.plans[(0, None)])
    assert calls == [(0, 32, {("image-shift", "image:shift")})]
    tests = {t.place: t for t in g.out.results[(0, None)].tests}
    assert tests["image:shift"].n == 64 and tests["hot area"].n == 64
    assert g.out.results[(0, None)].stopped == {("place", "hot area"): "all"}


def test_straddling_names_the_tests_whose_rule_holds_only_at_the_favourable_ends():
    from audit.scan.probes.base import Where
    from audit.scan.verdict import straddling

    def shift(k, n):
        return replace(flip("image-shift", k, n, "image:shift"), where=Where.IMAGE)

    others = placebo_rates([CausalResult(32, [shift(0, 32)])])
    assert [t.place for t in straddling(CausalResult(80, [shift(65, 80)]), others)] == ["image:shift"]  # 71-88%
    assert straddling(CausalResult(80, [shift(78, 80)]), others) == []  # 91-99%: clear, a flag
    assert straddling(CausalResult(80, [shift(40, 80)]), others) == []  # 39-61%: clear, no flag
