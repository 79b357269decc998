"""The verdict of one group (a class or a cluster): suspicion, cue and a one-sentence evidence.

Two kinds of evidence, judged by pure functions (docs/scan.md explains every
rule and threshold):

* **attention**, from the heatmaps (:func:`attention`: :func:`place_score`,
  :func:`audit.scan.robust.fixed_place_score`, :func:`diffuse_score`, :func:`off_object_score`):
  where the model looks.  A hypothesis, reported in the evidence;
* **causal**, from the interventions (:func:`causal_cue`,
  :func:`background_score`): what changes the model's answer.  Only this
  makes a ``shortcut_suspected`` verdict: a place away from the object whose
  occlusion flips the class's predictions (and not those of the other
  classes alike), or an object whose removal changes nothing while replacing
  the background does.

:func:`assess` combines them.  Without causal tests (``--no-intervene``, or
no model at hand) the attention decides, and the evidence says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

from audit.scan.config import BORDER_AREA, DEFAULT, Config
from audit.scan.features import GroupFeatures, Place
from audit.scan.interval import difference, side
from audit.scan.probes import CausalResult, PlaceFlip, Where
from audit.scan.probes.background import OtherBackground
from audit.scan.robust import fixed_place_score
from audit.scan.values import clip01, finite, pct


@dataclass
class Verdict:
    """The scan's judgement of one group."""

    verdict: str = "insufficient_data"  # shortcut_suspected | ok | insufficient_data
    suspicion: float = math.nan
    attention_suspicion: float = math.nan
    cue: str = ""
    cue_kind: str = ""  # region | border | fixed | hotspot | object | place | background | ""
    cue_box: list | None = None
    cue_region: str = ""  # the place the causal tests named (border:4%, corner:top_left, background), or ""
    masked: bool = False
    causal: CausalResult | None = None
    cue_flip: PlaceFlip | None = None  # the place test behind the cue (or the most flipping place)
    cue_others: float = math.nan  # the same place's flip rate on the other classes
    refuted: PlaceFlip | None = None  # a place that flipped the class but whose transplant turned nothing
    evidence: str = ""
    untested: bool = False  # causal tests ran for the scan but not for this group (cost budget)
    undecided: PlaceFlip | None = None  # a test whose 95% interval straddles its threshold: insufficient_data
    default_of: tuple = ()  # a default class: the flagged classes whose cues' absence makes the model say it

    def object_rate(self) -> float:
        """Flip rate of the object test, or NaN."""
        return self.causal.object_rate() if self.causal is not None else math.nan

    def background_rate(self) -> float:
        """Flip rate of the background tests (the smaller), or NaN."""
        return self.causal.background_rate() if self.causal is not None else math.nan

    @property
    def suspected(self) -> bool:
        return self.verdict == "shortcut_suspected"


def place_score(share: float, area: float) -> float:
    """How much a place dominates the attention: 0 at (or below) its area share, 1 when it holds nearly all.

    ``d = (share - area) / (1 - area)`` is the share of the energy *above
    uniform* (0 = as much as its area, 1 = all of it); the score ramps from
    d = 0.25 to d = 0.6.
    """
    if not (finite(share) and finite(area)) or area >= 1.0:
        return 0.0
    d = (share - area) / (1.0 - area)
    return clip01((d - 0.25) / 0.35)


def diffuse_score(entropy: float, concentration: float) -> float:
    """Attention spread over the whole image; capped at 0.35: never a verdict by itself."""
    if not (finite(entropy) and finite(concentration)) or concentration > 0.25:
        return 0.0
    return 0.35 * clip01((entropy - 0.9) / 0.07)


def off_object_score(energy_object: float, pointing: float) -> float:
    """Attention off the object: the peak misses it (weight 0.6) and little energy is on it (0.4)."""
    s_point = clip01((0.6 - pointing) / 0.4) if finite(pointing) else 0.0
    s_energy = clip01((0.4 - energy_object) / 0.3) if finite(energy_object) else 0.0
    return 0.6 * s_point + 0.4 * s_energy


@dataclass(frozen=True)
class _Candidate:
    score: float
    place: Place


def best_place(f: GroupFeatures, cfg: Config = DEFAULT) -> _Candidate:
    """The strongest candidate cue place (named regions, the border, a fixed place)."""
    cands = [_Candidate(place_score(p.share, p.area), p) for p in f.places]
    fixed = fixed_place_score(f.peak_place, cfg)
    cands.append(_Candidate(fixed, Place("fixed", "fixed place", box=f.hot_box)))
    # ties: a named region first (the user's hypothesis), then a fixed place, then the border
    rank = {"region": 0, "fixed": 1, "border": 2}
    cands.sort(key=lambda c: (-c.score, rank[c.place.kind]))
    return cands[0]




# ----------------------------------------------------------------------------
# Attention evidence
# ----------------------------------------------------------------------------


@dataclass
class Attention:
    """What the heatmaps say: a suspicion 0..1 and where the attention sits."""

    score: float
    cue: str = ""
    cue_kind: str = ""
    cue_box: list | None = None
    best: Place | None = None
    masked: bool = False


def attention(f: GroupFeatures, cfg: Config = DEFAULT) -> Attention:
    """The attention suspicion of a group and its attention cue (see docs/scan.md, "Attention")."""
    m = f.means
    best = best_place(f, cfg)
    s_diffuse = diffuse_score(m["entropy"], m["concentration"])
    masked = f.n_masked >= cfg.mask_min_n and f.n_masked >= cfg.mask_min_frac * f.n
    s = off_object_score(m["energy_object"], m["pointing_hit"]) if masked else max(best.score, s_diffuse)
    a = Attention(score=s, best=best.place, masked=masked)
    if best.score >= 0.3:
        p = best.place
        a.cue, a.cue_kind, a.cue_box = (f"region:{p.name}" if p.kind == "region" else p.name), p.kind, p.box
    elif (masked and s >= cfg.threshold) or (not masked and s_diffuse > 0):
        a.cue, a.cue_kind, a.cue_box = "background", "hotspot", f.hot_box
    elif masked:
        a.cue, a.cue_kind = "object", "object"
    return a


# ----------------------------------------------------------------------------
# Causal evidence
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CueFinding:
    """The place test that best explains a group's decision: its score 0..1 (0.5 at the thresholds)."""

    score: float
    flip: PlaceFlip | None = None
    others: float = math.nan
    refuted: PlaceFlip | None = None  # the strongest place that flipped the class but carried nothing


def transplant_refutes(t: PlaceFlip, cfg: Config = DEFAULT) -> bool:
    """The place flipped the class, but pasted into other classes' images it turns fewer than
    ``transplant_min`` of them into the class: the fill, not the place, changed the predictions."""
    return t.spec.is_place and finite(t.transplant) and t.transplant_n >= cfg.min_recipients \
        and t.transplant < cfg.transplant_min


def place_eligible(t: PlaceFlip, causal: CausalResult, cfg: Config, density: dict | None = None,
                   fixed_hot: bool = False) -> bool:
    """May this place be a cue, i.e. is it away from the object?

    With masks the object's pixels were spared, so any place is away from it,
    except for a class defined by absence (no object in its images): there a
    filled patch where the other classes' objects usually sit may look like an
    object, so such places (object density ratio >= ``absence_density_max``)
    are not cues.  Without masks only named regions and fixed places up to
    ``max_cue_area`` of the image count (a larger one hides objects too), and
    the group's hot area (where its attention is: as likely the object as a
    cue) only when the group's peaks sit at one place (``fixed_hot``), it
    covers at most ``hot_cue_max_area`` and its transplant was run: a
    pasted mark stays put while objects move, and its specificity is then
    measured with the same box on other classes' images.  A background transform spared the object; whether the
    transforms count at all is :func:`transforms_count`.  A rate on fewer
    than ``min_tested`` images never counts.
    """
    if not finite(t.flip_rate) or t.n < max(cfg.min_rate_n, cfg.min_tested):
        return False
    if t.spec.is_transform:  # judged as a whole: transforms_count()
        return True
    if causal.masked:
        crowded = density is not None and density.get(t.place, 0.0) >= cfg.absence_density_max
        return not (causal.absence and crowded)
    if t.where is Where.REGION:  # the user's own hypothesis, whatever its size
        return True
    if t.where is Where.HOT:
        return fixed_mark(t, cfg, fixed_hot) and finite(t.others_same)
    return not (finite(t.area) and t.area > cfg.max_cue_area)


def fixed_mark(t: PlaceFlip, cfg: Config, fixed_hot: bool) -> bool:
    """The group's hot area may be a mark: its peaks sit at one place (``fixed_hot``) and the area
    covers at most ``hot_cue_max_area`` of the image."""
    return t.spec.is_place and t.where is Where.HOT and fixed_hot and finite(t.area) \
        and t.area <= cfg.hot_cue_max_area


def toward(t: PlaceFlip | None, mode: int = 0) -> float:
    """A test's flip rate at the end of its 95% Wilson interval that favours a flag.

    ``mode`` 0: the observed rate; -1: the lower end (a flag must hold there: the decision is clear);
    +1: the upper end (could the test still flag?).  NaN when the test did not run.
    """
    if t is None:
        return math.nan
    if mode == 0 or not (finite(t.low) and finite(t.high)):
        return t.flip_rate
    return t.low if mode < 0 else t.high


def transforms_count(causal: CausalResult, others: dict, cfg: Config = DEFAULT, mode: int = 0) -> list:
    """The transforms that may be a cue: only when the object does not decide.

    Removing the object (its mask, or each image's own hot area without
    masks) must flip at most ``object_flip_max`` (a model that decides by the
    object may still stumble on a transformed background).  The background
    transforms (texture, flat) count only when the flat grey background
    (the control probe, the object spared) is a cue by itself, scoring at least
    0.5 in :func:`place_flip_score`: a class the model says when nothing else
    is there flips when an edit brings in another class's evidence (the
    seams of a spared area), but rarely when its background merely goes
    flat.  The flat background itself is never a cue: it keeps no shape, and
    without masks it also cuts into an object larger than the spared area.
    The whole-image colour transform has no seams and counts by itself.

    ``mode``: which end of each interval (:func:`toward`; the object's rate from the other end).

    Returns:
        The :class:`PlaceFlip` s of the transforms that count.
    """
    kept = [t for t in causal.transforms if t.spec.keeps_identity]  # shapes kept: whatever the object does
    fo = toward(causal.object(), -mode)
    if not (finite(fo) and fo <= cfg.object_flip_max):
        return kept
    flat = causal.first("control")
    flat_ok = flat is not None and flat.n >= max(cfg.min_rate_n, cfg.min_tested) and \
        place_flip_score(toward(flat, mode), others.get(flat.place, math.nan), cfg) >= 0.5
    # the flat background is a control, never a cue: it also cuts into an object larger than the spared area
    return kept + [t for t in causal.transforms if not t.spec.keeps_identity and not t.spec.control
                   and (flat_ok or not t.spec.background_only)]


def place_flip_score(flip: float, others: float, cfg: Config = DEFAULT, placebo: float = math.nan,
                     gap: float = math.nan) -> float:
    """0.5 x min(flip / need, (flip - others) / cue_specific_min), clipped to 0..1, where ``need`` is
    ``cue_flip_min`` or, where it is higher, the ``placebo`` rate measured on the class's own images
    (the place's box at random places) plus ``placebo_margin``; ``gap``, where given, stands for
    ``flip - others`` (an end of the difference's own interval: :func:`gap_end`).

    0.5 exactly when the place flips ``cue_flip_min`` of the class and ``cue_specific_min`` more than
    it flips the other classes; 1 at twice both.  A place at or under its placebo scores under 0.5.
    """
    if not finite(flip):
        return 0.0
    need = max(cfg.cue_flip_min, placebo + cfg.placebo_margin) if finite(placebo) else cfg.cue_flip_min
    spec = gap if finite(gap) else flip - (others if finite(others) else 0.0)
    score = clip01(0.5 * min(flip / need, spec / cfg.cue_specific_min))
    if finite(placebo) and not flip > placebo + cfg.placebo_margin:  # not clear of it: under 0.5
        score = min(score, math.nextafter(0.5, 0.0))
    return score


def placebo_end(t: PlaceFlip, causal: CausalResult, mode: int = 0) -> float:
    """The rate of the place's placebo (its box at random places of the same images): under ``mode`` -1
    the upper end of its 95% interval (a flag must clear that), else the observed rate (a measured
    threshold: a place that flips no more than boxes of its size elsewhere is no cue, however few the
    images); NaN when it did not run (a place that did not go on)."""
    p = causal.placebo(t.place) if t.spec.is_place else None
    if p is None or not finite(p.flip_rate):
        return math.nan
    return p.high if mode < 0 and finite(p.high) else p.flip_rate


class OthersRates(dict):
    """{place: the other classes' flip rate of the place}; ``bounds`` {place: (low, high)}: the 95% interval
    of that rate where it is one class's (the identity-keeping edits), ``counts`` {place: (k, n)} its
    flips and images."""

    def __init__(self, rates: dict, bounds: dict | None = None, counts: dict | None = None):
        super().__init__(rates)
        self.bounds = bounds or {}
        self.counts = counts or {}


def _by_place(results: list) -> dict:
    """{place: the tests of that place with a rate} over ``results`` (the same edit on other classes)."""
    rates: dict = {}
    for res in results:
        for t in res.places + res.transforms:
            if finite(t.flip_rate):
                rates.setdefault(t.place, []).append(t)
    return rates


def placebo_rates(results: list, placebos: list | None = None) -> OthersRates:
    """The other classes' rates of each place (their :class:`CausalResult` s): the median over them, but
    for an identity-keeping edit the largest over ``placebos`` (default: the same results), with its
    interval: the placebo.  An edit that also breaks another class (a colour a healthy object is told
    by, an edit that damages every image) is no cue of this one, whatever the median of the rest says;
    a class flagged for a cue of its own (a tint, a coloured band: greyscale takes it away) says nothing
    of what the edit does to a healthy class, so the caller leaves it out of ``placebos``."""
    out, bounds, counts = {}, {}, {}
    for p, ts in _by_place(results).items():
        if not ts[0].spec.keeps_identity:
            out[p] = float(median([t.flip_rate for t in ts]))
    for p, ts in _by_place(results if placebos is None else placebos).items():
        if ts[0].spec.keeps_identity:
            top = identity_placebo(ts)
            out[p], bounds[p], counts[p] = float(top.flip_rate), (top.low, top.high), (top.k, top.n)
    return OthersRates(out, bounds, counts)


def identity_placebo(tests: list) -> PlaceFlip:
    """The other class's test an identity-keeping edit is judged against: the one it flips most."""
    return max(tests, key=lambda t: t.flip_rate)


def gap_end(t: PlaceFlip, others: dict, mode: int) -> float:
    """How much more an identity-keeping edit flips this class than the other class it flips most, at
    the end of the difference's 95% interval (:func:`audit.scan.interval.difference`) least favourable to a
    flag under ``mode`` -1, the most favourable under +1; NaN under mode 0, for other tests or without counts
    (then the rates' own ends are subtracted)."""
    k2, n2 = getattr(others, "counts", {}).get(t.place, (0, 0))
    if mode == 0 or not t.spec.keeps_identity or not (t.n and n2):
        return math.nan
    low, high = difference(t.k, t.n, k2, n2)
    return low if mode < 0 else high


def others_rate(t: PlaceFlip, others: dict, mode: int = 0) -> float:
    """The place's flip rate on the other classes: the same box on their images when the transplant
    measured it (the hot area differs from class to class), else the median over their own samples
    (the largest for an identity-keeping edit, at the end of its interval least favourable to a flag
    under ``mode`` -1, the most favourable under +1: :func:`placebo_rates`)."""
    if t.where is Where.HOT and finite(t.others_same):
        return t.others_same
    low, high = getattr(others, "bounds", {}).get(t.place, (math.nan, math.nan))
    if mode != 0 and finite(low) and finite(high):
        return high if mode < 0 else low
    return others.get(t.place, math.nan)


def causal_cue(causal: CausalResult | None, others: dict | None = None, cfg: Config = DEFAULT,
               density: dict | None = None, fixed_hot: bool = False, mode: int = 0) -> CueFinding:
    """The place whose occlusion flips the class, not the other classes alike.

    Among the eligible places and background transforms (:func:`place_eligible`)
    scoring at least 0.5 a named region wins, else the smallest edge or corner
    of the fixed bank (the most specific explanation: a corner rather than an
    edge containing it; an edge rather than a border band, which also covers
    that edge: a sky along the top flips the thin band too, a frame flips no
    single edge), else a cell inside the image (a band along an edge also
    flips the cell beside it), else the thinnest border band, else the hot area, else a
    background transform (texture, colour, then the flat background);
    without one, the highest score (for the evidence).
    ``others``: {place: median flip rate of the same place on the other classes}; ``mode``: which end
    of each rate's interval is scored (:func:`toward`).
    """
    if causal is None:
        return CueFinding(0.0)
    others = others or {}
    cands = _scored(causal, others, cfg, density, fixed_hot, mode)
    refuted = [c for c in cands if c[0] >= 0.5 and transplant_refutes(c[1], cfg)]
    cands = [c for c in cands if not transplant_refutes(c[1], cfg)]
    strongest_refuted = max(refuted, key=lambda c: c[0])[1] if refuted else None
    if not cands:
        return CueFinding(0.0, refuted=strongest_refuted)
    strong = [c for c in cands if c[0] >= 0.5]
    # a named region first (the user's hypothesis), then the smallest place of the fixed bank, then
    # the hot area (it follows the attention, the bank names the place), then a background transform
    best = min(strong, key=lambda c: (c[1].where is not Where.REGION, c[1].spec.is_transform, c[1].spec.control,
                                      c[1].where is Where.HOT, c[1].where is Where.CELL, c[1].where is Where.BORDER,
                                      c[1].area, -c[0])) \
        if strong else max(cands, key=lambda c: c[0])
    s, t = best
    return CueFinding(s, t, others_rate(t, others), strongest_refuted)


def _scored(causal: CausalResult, others: dict, cfg: Config, density, fixed_hot: bool, mode: int) -> list:
    """``(score, test)`` of every eligible place and counted transform at ``mode``'s interval ends."""
    tests = causal.places + transforms_count(causal, others, cfg, mode)
    whole = cfg.replace(cue_flip_min=cfg.image_flip_min)  # an edit of the object too needs more flips
    same = cfg.replace(cue_flip_min=cfg.identity_flip_min, cue_specific_min=cfg.identity_specific_min)
    rule = {id(t): t.spec.rule(cfg) or (same if t.spec.keeps_identity else whole if t.spec.whole_image else cfg)
            for t in tests}
    return [(place_flip_score(toward(t, mode), others_rate(t, others, mode), rule[id(t)],
                              placebo_end(t, causal, mode), gap_end(t, others, mode)), t)
            for t in tests if place_eligible(t, causal, cfg, density, fixed_hot)]


def straddling(causal: CausalResult | None, others: dict | None, cfg: Config = DEFAULT, density: dict | None = None,
               fixed_hot: bool = False) -> list:
    """The places and transforms whose rule holds at their intervals' most favourable ends but not at the
    least favourable ones (each could still flag the group: more images decide it), the strongest first."""
    if causal is None:
        return []
    hi = {(t.probe, t.place): sc for sc, t in _scored(causal, others or {}, cfg, density, fixed_hot, 1)}
    lo = _scored(causal, others or {}, cfg, density, fixed_hot, -1)
    out = [(hi.get((t.probe, t.place), 0.0), t) for sc, t in lo if sc < cfg.threshold]
    return [t for sc, t in sorted(out, key=lambda c: -c[0]) if sc >= cfg.threshold and not transplant_refutes(t, cfg)]


def background_score(causal: CausalResult | None, cfg: Config = DEFAULT, mode: int = 0) -> float:
    """The object does not decide, the background does: 0.5 x min((1 - object) / (1 - object_flip_max),
    background / background_flip_min), clipped to 0..1; 0 when either test is missing.

    Without masks ``object`` is each image's own hot area removed and ``background`` the background
    transplant (the class's backgrounds pasted around other classes' own hot areas turn them into the
    class), against ``background_transplant_min``.  With masks, where that transplant ran (around the
    other classes' objects), turning fewer than ``transplant_min`` of them refutes the background: the
    class is what the model says when nothing else is there, and a background that carries a class
    carries it around other objects too.  ``mode``: which end of each interval (:func:`toward`; the
    object's rate from the other end).
    """
    if causal is None:
        return 0.0
    fo = toward(causal.object(), -mode)
    bgs = [toward(t, mode) for t in causal.tests if t.spec.replaces_background and finite(t.flip_rate)]
    fb, need = (min(bgs) if bgs else math.nan), cfg.background_flip_min
    tb = causal.background_transplant()
    if not causal.masked:
        fb, need = toward(tb, mode), cfg.background_transplant_min
    if not (finite(fo) and finite(fb)):
        return 0.0
    score = clip01(0.5 * min((1.0 - fo) / (1.0 - cfg.object_flip_max), fb / need))
    if causal.masked and background_refuted(tb, cfg):
        score = min(score, math.nextafter(0.5, 0.0))
    return score


def background_refuted(tb: PlaceFlip | None, cfg: Config = DEFAULT) -> bool:
    """With masks: the class's backgrounds, pasted around ``min_recipients`` or more other classes' objects,
    turned fewer than ``transplant_min`` of them into the class (as :func:`transplant_refutes` for a place)."""
    return tb is not None and finite(tb.flip_rate) and tb.n >= cfg.min_recipients and tb.flip_rate < cfg.transplant_min


def has_causal(causal: CausalResult | None) -> bool:
    """True when at least one causal test has a rate."""
    return causal is not None and any(finite(t.flip_rate) for t in causal.tests)


# ----------------------------------------------------------------------------
# The verdict
# ----------------------------------------------------------------------------


def _insufficient(f: GroupFeatures, cfg: Config, causal) -> Verdict:
    why = f"{f.n} usable heatmap{'' if f.n == 1 else 's'}" + (f" ({f.n_flat} flat)" if f.n_flat else "")
    return Verdict(causal=causal, evidence=f"Only {why}; {cfg.min_images} are needed for a verdict.")


def _cue_name(t: PlaceFlip) -> str:
    """The ``cue`` for a place test: every border band is ``border``; the hot area of a group whose
    peaks sit at one place ``fixed place``; a transform its probe's ``cue`` (``background texture``,
    ``colour cast``...); others keep their name."""
    if t.spec.is_transform:
        return t.spec.cue
    if t.where is Where.HOT:
        return "fixed place"
    return "border" if t.where is Where.BORDER else t.place


def _background_place(t: PlaceFlip, s_bg: float, cfg: Config, fixed_hot: bool = False) -> bool:
    """A flipping place that is really the background: the background test flags too and the place
    is the group's hot area or larger than ``max_cue_area`` (with masks: everything around the object).
    A small hot area where the group's peaks sit at one place (``fixed_hot``) keeps its name: a mark."""
    if t.where is Where.REGION or t.spec.is_transform:  # these keep their names
        return False
    if fixed_mark(t, cfg, fixed_hot):
        return False
    return s_bg >= cfg.threshold and (t.where is Where.HOT or (finite(t.area) and t.area > cfg.max_cue_area))


def assess(f: GroupFeatures, cfg: Config = DEFAULT, causal: CausalResult | None = None,
           others: dict | None = None, density: dict | None = None, attention_decides: bool = True) -> Verdict:
    """Suspicion (0..1), verdict, cue and a one-sentence evidence for one group.

    Args:
        f: from :func:`audit.scan.features.group_features`.
        cfg: the thresholds.
        causal: the group's :class:`CausalResult`, or None when not run.
        others: {place: median flip rate of that place on the other classes}.
        density: {place: object density ratio} (where objects usually sit),
            for classes defined by absence.
        attention_decides: without causal tests, may the attention flag?
            (False for a cluster left untested in a scan whose classes were tested.)

    Returns:
        A :class:`Verdict`.  With causal tests, the suspicion is the larger of
        the place score and the background score; attention alone never
        flags.  Without them the suspicion is the attention suspicion.
    """
    if f.n < cfg.min_images:
        return _insufficient(f, cfg, causal)
    att = attention(f, cfg)
    res = Verdict(masked=att.masked, causal=causal, attention_suspicion=att.score,
                  cue=att.cue, cue_kind=att.cue_kind, cue_box=att.cue_box,
                  untested=not attention_decides and not has_causal(causal))
    if not has_causal(causal):
        res.suspicion = att.score if attention_decides else min(att.score, cfg.threshold - 0.01)
        res.verdict = "shortcut_suspected" if res.suspicion >= cfg.threshold else "ok"
    else:
        res.verdict = _causal_verdict(res, f, causal, others, density, cfg)
    res.evidence = evidence(f, att, res, cfg)
    return res


def _causal_verdict(res: Verdict, f: GroupFeatures, causal: CausalResult, others, density, cfg: Config) -> str:
    """The verdict from the causal tests, each rate judged by its 95% interval: a flag only where the
    rules hold at the interval's end least favourable to it (mode -1), ``ok`` only where they fail even
    at the most favourable end (+1), ``insufficient_data`` in between (``res.undecided`` names the test)."""
    fixed_hot = f.peak_place.share_low >= cfg.place_share_low
    judged = {m: (causal_cue(causal, others, cfg, density, fixed_hot, m), background_score(causal, cfg, m))
              for m in (-1, 0, 1)}
    finding, s_bg = judged[0]
    clear, clear_bg = judged[-1]
    res.suspicion = max(finding.score, s_bg)
    res.cue_flip, res.cue_others, res.refuted = finding.flip, finding.others, finding.refuted
    if clear.score >= cfg.threshold and not _background_place(clear.flip, clear_bg, cfg, fixed_hot):
        t = clear.flip
        res.cue_flip, res.cue_others = t, clear.others
        res.cue, res.cue_kind, res.cue_region = _cue_name(t), "place", t.place
        res.cue_box = list(t.box) if t.box is not None else None
        return "shortcut_suspected"
    if clear_bg >= cfg.threshold:
        res.cue, res.cue_kind, res.cue_region, res.cue_box = "background", "background", "background", None
        return "shortcut_suspected"
    maybe, maybe_bg = judged[1]
    if maybe.score >= cfg.threshold:
        res.undecided = maybe.flip
    elif maybe_bg >= cfg.threshold:
        res.undecided = _undecided_background(causal, cfg)
    return "ok" if res.undecided is None else "insufficient_data"


def default_class(v: Verdict, class_id: int, flagged: list, cfg: Config = DEFAULT) -> tuple:
    """The flagged classes whose cue's absence makes the model say this class (a *default class*), or ().

    A class is a default class of a flagged class F when F's cue, taken away from F's images, turns most
    of them into this class (``to_class`` of F's cue test), removing this class's own object (its mask,
    or its own hot area) changes at most ``object_flip_max`` of its predictions even at the interval's
    lower end (the model does not look at the object), and it has no cue of its own that is a place or
    its background, nor an identity-keeping edit (those are cues of its own), except an edit of other
    classes' images (``edits_others``: the colour transplant), which takes F's cue away from F's images.
    ``flagged``: ``(name, Verdict)`` of the other flagged classes.
    """
    c = v.causal
    o = c.object() if c is not None else None
    if o is None or not (finite(o.low) and o.low <= cfg.object_flip_max):
        return ()
    of = [(name, f) for name, f in flagged if f.cue_flip is not None and f.cue_flip.to_class == class_id
          and f.cue_kind == "place"]
    own = v.suspected and (v.cue_kind == "background" or (v.cue_flip is not None and (
        not v.cue_flip.spec.is_transform or v.cue_flip.spec.keeps_identity)))
    # a cue of its own, unless it was found by giving this class's colours to images that carry the
    # flagged classes' cues: those lose their cues' colours, and the model then says this class
    if own and not (of and v.cue_flip is not None and v.cue_flip.spec.edits_others):
        return ()
    return tuple(name for name, _ in sorted(of, key=lambda x: -x[1].suspicion))


def as_default(v: Verdict, of: tuple, f: GroupFeatures, cfg: Config = DEFAULT) -> Verdict:
    """The one treatment of a default class: verdict ``ok`` (its own images carry no cue; an edit that
    flipped it brought in another class's evidence, so a cue named from it would be invented), ``cue``
    empty, ``default_of`` the classes whose cues it depends on, and the evidence says so."""
    from dataclasses import replace

    res = replace(v, verdict="ok", cue="", cue_kind="", cue_region="", cue_box=None, default_of=tuple(of))
    res.evidence = evidence(f, attention(f, cfg), res, cfg)
    return res


def _undecided_background(causal: CausalResult, cfg: Config) -> PlaceFlip | None:
    """The object or background test whose interval straddles its threshold."""
    o = causal.object()
    if o is not None and side(o.low, o.high, cfg.object_flip_max) == 0:
        return o
    if not causal.masked:
        return causal.background_transplant()
    bgs = [t for t in causal.tests if t.spec.replaces_background and finite(t.flip_rate)]
    return min(bgs, key=lambda t: t.flip_rate) if bgs else o


# ----------------------------------------------------------------------------
# The evidence sentence
# ----------------------------------------------------------------------------


def _where(f: GroupFeatures, att: Attention) -> str:
    kind, best = att.cue_kind, att.best
    if kind == "region":
        return f"{pct(best.share)} of the attention lies in region '{best.name}' ({pct(best.area)} of the image)"
    if kind == "border":
        return f"{pct(best.share)} of the attention lies in the outer 10% border ({pct(BORDER_AREA)} of the image)"
    if kind == "fixed":
        pp = f.peak_place
        return (f"{pct(pp.share)} of the peaks stay within {pp.radius:.2f} of one place (x={pp.x:.2f}, "
                f"y={pp.y:.2f}) away from the image centre")
    if kind == "hotspot":
        hx, hy = f.hot_xy
        at = f", strongest around x={hx:.2f}, y={hy:.2f}" if finite(hx) else ""
        return f"the attention is spread over the image (entropy {f.means['entropy']:.2f}{at})"
    return ""


def attention_text(f: GroupFeatures, att: Attention, cfg: Config = DEFAULT) -> str:
    """What the heatmaps show, in words that agree with each other."""
    m = f.means
    where = _where(f, att)
    if att.masked:
        text = (f"{pct(m['energy_object'])} of the attention is on the object and the peak hits it in "
                f"{pct(m['pointing_hit'])} of {f.n_masked} masked images")
        # a place elsewhere only when most of the attention is not on the object
        if where and att.cue_kind not in ("object", "hotspot") and m["energy_object"] < 0.5:
            text += f"; {where}"
        elif att.score >= 0.5 and finite(f.peak_object_dist) and finite(f.object_spread) \
                and f.object_spread > 0.08 and f.peak_object_dist > 0.25:
            text += f"; the peaks stay {f.peak_object_dist:.2f} of the image away from the objects as they move"
        return text
    if where:
        return where
    pp = f.peak_place
    if pp.share_low >= cfg.place_share_low:  # a fixed place near the centre: the place score leaves it out
        return (f"{pct(pp.share)} of the peaks stay within {pp.radius:.2f} of one place (x={pp.x:.2f}, "
                f"y={pp.y:.2f}) near the image centre")
    return (f"no region, the border or a fixed place dominates the attention ({pct(pp.share)} of the "
            f"peaks within {pp.radius:.2f} of the most common place, {pp.n} maps)")


def causal_text(res: Verdict, cfg: Config = DEFAULT) -> str:
    """What the interventions showed: the object and background tests, and the strongest place."""
    c = res.causal
    parts = []
    o = c.object() if c is not None else None
    if o is not None and finite(o.flip_rate):
        parts.append(_object_words(c, o))
    t = res.cue_flip
    if t is not None and finite(t.flip_rate) and (res.cue_kind == "place" or t.flip_rate >= cfg.mention_flip):
        s = f"{t.spec.words(t)} changes {changes(t)}"
        if finite(res.cue_others):
            s += f" ({pct(res.cue_others)} for the other classes)"
        pb = c.placebo(t.place) if c is not None and t.spec.is_place else None
        if pb is not None and finite(pb.flip_rate):
            s += f", against {changes(pb)} when a box of its size is occluded at random places"
        if finite(t.transplant):
            s += f", and pasted into {t.transplant_n} images of other classes it turns {pct(t.transplant)} into this class"
        parts.append(s)
    r = res.refuted
    if r is not None and (t is None or r.place != t.place):
        parts.append(f"{r.spec.words(r)} changes {changes(r)}, "
                     f"but pasted into {r.transplant_n} images of other classes it turns {pct(r.transplant)} into "
                     f"this class: the fill changed them, the place carries no cue")
    return "; ".join(parts)


def _span(t: PlaceFlip) -> str:
    """`` (76-97%)``: the 95% interval of a test's rate, or nothing when unknown."""
    return f" ({round(100 * t.low)}-{round(100 * t.high)}%)" if finite(t.low) and finite(t.high) else ""


def changes(t: PlaceFlip) -> str:
    """``"91% of 32 predictions (76-97%)"``: a test's rate, its count and its 95% interval."""
    return f"{pct(t.flip_rate)} of {t.n} predictions{_span(t)}"


def _object_words(c: CausalResult, o: PlaceFlip) -> str:
    """The object test, the background tests beside it, and (without masks) the background transplant."""
    s = f"{o.spec.words(o)} changes {changes(o)}"
    bgs = [t for t in c.tests if t.spec.replaces_background and finite(t.flip_rate)]
    if bgs:
        s += ", replacing the background by " + " or ".join(f"{b.spec.fill_text} {pct(b.flip_rate)}{_span(b)}"
                                                            for b in bgs)
    tb = c.background_transplant()
    if tb is not None and finite(tb.flip_rate):
        around = "objects" if c.masked else "hot areas"
        s += (f", and its backgrounds pasted around the {around} of {tb.n} images of other classes turn "
              f"{pct(tb.flip_rate)}{_span(tb)} of them into this class")
    return s


# why sequential testing left a rate undecided (``CausalResult.stopped``), as the evidence says it
STOPPED = {
    "all": "every image of the group was tested, so more images of it cannot decide it",
    "max": "sequential testing stopped at its limit of {max} images (sequential_max)",
    "budget": "the cost budget was spent before more images could decide it: raise --causal-budget",
    "recipients": "no more images of other classes were left to give it to (or sequential_max was reached)",
    "": "more images decide it (sequential testing stops at sequential_max or when the cost budget is spent: "
        "raise --causal-budget)",
}


def _conclusion(res: Verdict, att: Attention, cfg: Config) -> str:
    if res.default_of:
        names = " and ".join(f"'{n}'" for n in res.default_of)
        return (f" - a default class: the model says it when the cue of {names} is absent, so its answer depends"
                f" on that cue (see {names}), not on its own object")
    if res.untested:
        return (" - not tested by intervention (cost budget: raise --causal-budget to test it), and attention alone"
                " is not a verdict")
    if res.verdict == "insufficient_data" and res.undecided is not None:
        u = res.undecided
        why = res.causal.stopped.get((u.probe, u.place), "") if res.causal is not None else ""
        return (f" - undecided: {u.spec.words(u)} changes {changes(u)}, an interval that straddles the "
                f"threshold of its rule; {STOPPED.get(why, STOPPED['']).format(max=cfg.sequential_max)}")
    if not has_causal(res.causal):
        return " - attention only, no causal test was run" if res.suspected else ""
    if res.suspected and res.cue_kind == "place" and res.cue_flip.spec.keeps_identity:
        return f" - the decision rests on the {res.cue}, not on the shapes"
    if res.suspected and res.cue_kind == "place" and res.cue_flip.spec.is_transform:
        return f" - the decision rests on the {res.cue}, not on the object"
    if res.suspected and res.cue_kind == "place":
        where = res.cue_region if res.cue_flip.where is not Where.HOT else \
            "one fixed place (the class's hot area, box " + ", ".join(f"{v:.2f}" for v in res.cue_box or ()) + ")"
        return f" - the decision rests on {where}, away from the object"
    if res.suspected:
        return " - the decision rests on the background, not on the object"
    other_bg = [t.flip_rate for t in res.causal.tests if isinstance(t.spec, OtherBackground) and finite(t.flip_rate)]
    if finite(res.object_rate()) and res.object_rate() <= cfg.object_flip_max and other_bg \
            and other_bg[0] >= cfg.background_flip_min:
        return (" - removing the object changes nothing and only another class's background flips it:"
                " the model says this class when the other classes' cues are absent")
    if res.causal.masked and background_refuted(res.causal.background_transplant(), cfg):
        return (" - replacing its background changes its predictions, but its backgrounds around other classes'"
                " objects do not turn them into it: the model says this class when no other object is there,"
                " its background carries no cue")
    if att.score >= 0.5:
        return " - the attention is suspicious, but no causal test supports a shortcut"
    return ""


def evidence(f: GroupFeatures, att: Attention, res: Verdict, cfg: Config = DEFAULT) -> str:
    """One human sentence: the attention, the causal tests, and what they mean together."""
    parts = [attention_text(f, att, cfg)]
    ct = causal_text(res, cfg)
    if ct:
        parts.append(ct)
    text = "; ".join(parts) + _conclusion(res, att, cfg)
    if not has_causal(res.causal) and res.verdict == "ok" and 0 < att.score < 0.5 \
            and att.cue_kind == "hotspot" and not att.masked:
        text += " - diffuse attention alone is not a shortcut"
    return text[0].upper() + text[1:] + "."
