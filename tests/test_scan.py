"""The scan's decision logic as case tables, and scan() on synthetic records (no model)."""

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data.schema import records_schema
from audit.engine.stats import map_stats
from audit.errors import AuditError
from audit.scan import DEFAULT, scan
from audit.scan.cluster import cluster_maps, eigengap_k, map_features
from audit.scan.features import group_features, spurious_gap
from audit.scan.grids import grids_from_cams
from audit.scan.interval import wilson
from audit.scan.probes import CausalResult, PlaceFlip, Where
from audit.scan.read import choose_view
from audit.scan.robust import PeakPlace, fixed_place_score
from audit.scan.verdict import (
    assess,
    causal_cue,
    off_object_score,
    place_flip_score,
    place_score,
    placebo_rates,
)

SIZE = (32, 32)
SKY = (0.0, 0.0, 1.0, 0.4)


def blob(x, y, s=0.12, h=8, w=8):
    xs = (np.arange(w) + 0.5) / w
    ys = (np.arange(h) + 0.5) / h
    return np.exp(-((xs[None, :] - x) ** 2 + (ys[:, None] - y) ** 2) / (2 * s * s)).astype(np.float32)


def box(x, y, r=0.12):
    m = np.zeros(SIZE, bool)
    H, W = SIZE
    m[max(0, int((y - r) * H)):int((y + r) * H), max(0, int((x - r) * W)):int((x + r) * W)] = True
    return m


def make_rows(kind, n, seed=0, target=1, masks=True, correct=None):
    """Synthetic records of one class.

    kind: "healthy" (attention on a moving object), "corner" (fixed place at the
    bottom-right corner), "sky" (attention in the sky band, object on the ground),
    "diffuse" (flat-ish noise).
    """
    rng = np.random.default_rng(seed)
    cams, ms = [], []
    for _ in range(n):
        ox, oy = rng.uniform(0.25, 0.75), rng.uniform(0.55, 0.8)
        if kind == "healthy":
            cam = blob(ox, oy)
        elif kind == "corner":
            cam = blob(0.9, 0.9, s=0.06)
        elif kind == "sky":
            cam = blob(rng.uniform(0.1, 0.9), 0.12, s=0.1)
        elif kind == "diffuse":
            cam = 1.0 + 0.05 * rng.random((8, 8)).astype(np.float32)
        else:
            raise ValueError(kind)
        cams.append(cam)
        ms.append(box(ox, oy))
    cams = np.stack(cams)
    ms = np.stack(ms)
    st = map_stats(cams, SIZE, masks=ms if masks else None, regions={"sky": SKY})
    rows = pd.DataFrame({c: st[c] for c in st if c != "status"})
    rows["status"] = st["status"]
    rows["pointing_hit"] = rows["pointing_hit"].astype(float)
    rows["target"] = target
    rows["pred"] = target
    rows["label"] = target
    rows["correct"] = True if correct is None else correct
    rows["image_id"] = [f"{kind}{seed}/{i:04d}.png" for i in range(n)]
    rows["cam"] = [c.ravel().tolist() for c in cams]
    rows["cam_h"], rows["cam_w"] = 8, 8
    rows["has_mask"] = masks
    return rows


def features(rows, regions=None):
    G = grids_from_cams(rows["cam"].tolist(), 8, 8, 16)
    return group_features(rows, G, regions if regions is not None else {"sky": SKY}, DEFAULT, SIZE)


# ----------------------------------------------------------------------------
# Case table: the verdict of one group from its heatmaps alone
# ----------------------------------------------------------------------------

CASES = [
    # (name, kind, n, masks, regions, verdict, cue)
    ("fixed-place cue, no masks", "corner", 40, False, {}, "shortcut_suspected", "fixed place"),
    ("fixed-place cue, with masks", "corner", 40, True, {}, "shortcut_suspected", "fixed place"),
    ("background cue in a named region", "sky", 40, False, {"sky": SKY}, "shortcut_suspected", "region:sky"),
    ("background cue, with masks", "sky", 40, True, {"sky": SKY}, "shortcut_suspected", "region:sky"),
    ("healthy class, with masks", "healthy", 40, True, {"sky": SKY}, "ok", "object"),
    ("healthy class, no masks", "healthy", 40, False, {"sky": SKY}, "ok", ""),
    ("diffuse attention alone, no masks", "diffuse", 40, False, {"sky": SKY}, "ok", "background"),
    ("too few images", "corner", 12, False, {}, "insufficient_data", ""),
]


@pytest.mark.parametrize("name,kind,n,masks,regions,verdict,cue", CASES, ids=[c[0] for c in CASES])
def test_verdict_case_table(name, kind, n, masks, regions, verdict, cue):
    rows = make_rows(kind, n, masks=masks)
    res = assess(features(rows, regions))
    assert res.verdict == verdict, res.evidence
    assert res.cue == cue
    assert res.evidence and res.evidence.endswith(".")
    if verdict == "insufficient_data":
        assert math.isnan(res.suspicion)
        assert "20 are needed" in res.evidence
    else:
        assert 0.0 <= res.suspicion <= 1.0


def test_evidence_names_the_numbers():
    res = assess(features(make_rows("sky", 40, masks=False)))
    assert "region 'sky'" in res.evidence and "% of the attention" in res.evidence
    res = assess(features(make_rows("healthy", 40, masks=True)))
    assert "peak hits it in 100%" in res.evidence


def test_flat_maps_do_not_count():
    rows = make_rows("corner", 25, masks=False)
    rows.loc[rows.index[:10], "status"] = "flat"
    f = features(rows)
    assert f.n == 15 and f.n_flat == 10
    assert assess(f).verdict == "insufficient_data"


# ----------------------------------------------------------------------------
# Score functions and confirmation, hand values
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("share,area,expected", [
    (0.4, 0.4, 0.0),  # as much as its area: nothing special
    (0.1, 0.4, 0.0),
    (0.4 + 0.6 * 0.25, 0.4, 0.0),  # d = 0.25: start of the ramp
    (0.4 + 0.6 * 0.425, 0.4, 0.5),  # d = 0.425: middle
    (0.9, 0.4, 1.0),
    (float("nan"), 0.4, 0.0),
])
def test_place_score(share, area, expected):
    assert place_score(share, area) == pytest.approx(expected, abs=1e-9)


def test_fixed_and_off_object_scores():
    assert fixed_place_score(PeakPlace(0.9, 0.9, 0.96, n=200)) == pytest.approx(1.0)
    # a fixed place at the centre is the usual object
    assert fixed_place_score(PeakPlace(0.5, 0.5, 1.0, n=200)) == 0.0
    assert fixed_place_score(PeakPlace(0.9, 0.9, 0.4, n=200)) == 0.0
    assert fixed_place_score(PeakPlace(0.9, 0.9, 0.752, n=100_000)) == pytest.approx(0.5, abs=0.01)
    assert fixed_place_score(PeakPlace(0.9, 0.9, 0.755, n=8)) == 0.0  # too few maps to tell
    assert off_object_score(0.0, 0.0) == pytest.approx(1.0)
    assert off_object_score(0.5, 1.0) == 0.0
    assert off_object_score(0.25, 0.4) == pytest.approx(0.6 * 0.5 + 0.4 * 0.5)


# ----------------------------------------------------------------------------
# Causal evidence: case tables of the verdict from hand-made test results
# ----------------------------------------------------------------------------

PLACES = {"corner:bottom_right": (0.111, (2 / 3, 2 / 3, 1.0, 1.0)), "edge:bottom": (0.2, (0.0, 0.8, 1.0, 1.0)),
          "border:4%": (0.154, None), "border:20%": (0.64, None), "region:sky": (0.4, SKY),
          "hot area": (0.1, (0.4, 0.4, 0.6, 0.6))}


WHERE = {"corner": Where.CORNER, "edge": Where.EDGE, "border": Where.BORDER, "region": Where.REGION,
         "hot area": Where.HOT}


def causal(places=None, obj=None, bg=None, n=32, masked=True, absence=False, texture=None, colour=None,
           flat=None, transplant=None, bgt=None, same=None):
    """A CausalResult: ``places`` {name: flip rate}, object/background flip rates (None: not run),
    the background transforms' rates (without masks ``obj`` is the own-hot-area removal),
    ``transplant`` {place: share of 16 other-class images the pasted place turned into the class},
    ``bgt`` the background transplant's rate (without masks), ``same`` {place: the same box's flip rate on
    the transplant's other-class images}."""
    tests = []
    if obj is not None:
        tests.append(PlaceFlip("object", "object" if masked else "own hot area", None, "inpaint", n, obj, 0.1,
                               probe="object" if masked else "own-hot-area", k=round(obj * n)))
    for place, fill, rate, probe in (("background:texture", "fine-blur", texture, "texture"),
                                     ("image:colour", "colour-levels", colour, "colour"),
                                     ("background:flat", "flat-grey", flat, "flat")):
        if rate is not None:
            tests.append(PlaceFlip("transform", place, None, fill, n, rate, 0.8, probe=probe, k=round(rate * n)))
    if masked and bg is not None:  # bg: one rate for both background tests, or (neutral, other-background)
        neutral, other = bg if isinstance(bg, tuple) else (bg, bg)
        tests.append(PlaceFlip("background", "background", None, "neutral", n, neutral, 0.9,
                               probe="background-neutral", k=round(neutral * n)))
        tests.append(PlaceFlip("background", "background", None, "other-background", n, other, 0.9,
                               probe="background-swap", k=round(other * n)))
    if bgt is not None:
        tests.append(PlaceFlip("transplant", "background", None, "pasted", 16, bgt, math.nan, bgt, 16,
                               probe="background-transplant", k=round(bgt * 16)))
    for name, rate in (places or {}).items():
        area, box = PLACES[name]
        tr = (transplant or {}).get(name)
        tests.append(PlaceFlip("region", name, box, "mean", n, rate, area, math.nan if tr is None else tr,
                               0 if tr is None else 16, (same or {}).get(name, math.nan), "place",
                               WHERE[name.split(":")[0]], round(rate * n)))
    return CausalResult(n=n, tests=tests, masked=masked, absence=absence)


QUIET = {p: 0.0 for p in PLACES}

CAUSAL_CASES = [
    # (name, attention kind, masks, causal result, others, density, verdict, cue, cue_region)
    ("attention only: the tests flip nothing", "sky", False, causal(QUIET, masked=False), {}, None,
     "ok", "region:sky", ""),
    ("attention off the object, object decides", "sky", True, causal(QUIET, obj=0.9, bg=0.05), {}, None,
     "ok", "region:sky", ""),
    ("a corner flips the class, not the others", "healthy", True,
     causal({**QUIET, "corner:bottom_right": 0.95, "edge:bottom": 0.9, "border:20%": 0.9}, obj=0.1, bg=0.2),
     {"corner:bottom_right": 0.03}, None, "shortcut_suspected", "corner:bottom_right", "corner:bottom_right"),
    ("the same place without masks", "healthy", False,
     causal({**QUIET, "corner:bottom_right": 0.95, "edge:bottom": 0.9}, masked=False), {}, None,
     "shortcut_suspected", "corner:bottom_right", "corner:bottom_right"),
    ("a thin frame: every band flips, the thinnest is named", "healthy", False,
     causal({**QUIET, "border:4%": 0.9, "border:20%": 1.0}, masked=False), {}, None,
     "shortcut_suspected", "border", "border:4%"),
    ("decoy: the place flips every class alike", "corner", True,
     causal({**QUIET, "corner:bottom_right": 0.6}, obj=0.9, bg=0.1), {"corner:bottom_right": 0.55}, None,
     "ok", "fixed place", ""),
    ("a decoy nobody uses flips nothing", "corner", False, causal(QUIET, masked=False),
     {"corner:bottom_right": 0.0}, None, "ok", "fixed place", ""),
    ("background decides: object removal changes nothing", "diffuse", True,
     causal(QUIET, obj=0.03, bg=0.8), {}, None, "shortcut_suspected", "background", "background"),
    ("default class: only another class's background (and cue) flips it", "diffuse", True,
     causal(QUIET, obj=0.0, bg=(0.0, 1.0)), {}, None, "ok", "", ""),
    ("object and background both matter: healthy", "healthy", True, causal(QUIET, obj=0.8, bg=0.4), {}, None,
     "ok", "object", ""),
    ("central objects without masks: only the hot area flips", "healthy", False,
     causal({**QUIET, "hot area": 1.0}, masked=False), {}, None, "ok", "", ""),
    ("without masks a large band also hides objects", "healthy", False,
     causal({**QUIET, "border:20%": 0.9}, masked=False), {}, None, "ok", "", ""),
    ("absence class: a filled patch where objects sit flips it", "diffuse", True,
     causal({**QUIET, "edge:bottom": 0.9}, absence=True), {}, {"edge:bottom": 1.6}, "ok", "", ""),
    ("absence class: the sky flips it", "diffuse", True,
     causal({**QUIET, "region:sky": 0.9}, absence=True), {}, {"region:sky": 0.0},
     "shortcut_suspected", "region:sky", "region:sky"),
    ("texture without masks: the blur flips it, removing the hot area does not (62% of 128)", "diffuse", False,
     causal(QUIET, obj=0.06, masked=False, texture=0.62, colour=0.0, flat=0.6, n=128), {"background:texture": 0.0},
     None, "shortcut_suspected", "background texture", "background:texture"),
    ("the same on 32 images: 62% (45-77%) straddles 50%, undecided", "diffuse", False,
     causal(QUIET, obj=0.06, masked=False, texture=0.62, colour=0.0, flat=0.6), {"background:texture": 0.0}, None,
     "insufficient_data", "", ""),
    ("a colour cast with masks: grey-world flips it, the object does not matter", "diffuse", True,
     causal(QUIET, obj=0.05, bg=(0.0, 0.9), texture=0.1, colour=0.9, flat=0.2), {"image:colour": 0.05}, None,
     "shortcut_suspected", "colour cast", "image:colour"),
    ("the object decides: a recoloured background that flips it is no cue", "healthy", True,
     causal(QUIET, obj=1.0, bg=0.0, colour=0.56, flat=0.5), {"image:colour": 0.06}, None, "ok", "object", ""),
    ("default class: a blur with seams flips it, a flat background does not", "diffuse", False,
     causal(QUIET, obj=0.0, masked=False, texture=0.53, flat=0.03), {"background:texture": 0.0}, None, "ok", "", ""),
    ("default class: the flat background flips it a little more than the others (41% of 128)", "diffuse", False,
     causal(QUIET, obj=0.06, masked=False, texture=0.6, flat=0.41, n=128),
     {"background:texture": 0.0, "background:flat": 0.12}, None, "ok", "", ""),
    ("default class: a whole-image recolouring flips half of it, short of image_flip_min", "diffuse", False,
     causal(QUIET, obj=0.0, masked=False, colour=0.5, flat=0.55), {"image:colour": 0.0}, None, "ok", "", ""),
    ("a colour cast flips most of its class without masks", "diffuse", False,
     causal(QUIET, obj=0.0, masked=False, colour=0.94, flat=0.2), {"image:colour": 0.0}, None,
     "shortcut_suspected", "colour cast", "image:colour"),
    ("a flat background alone is no cue (it also cuts into a large object)", "diffuse", False,
     causal(QUIET, obj=0.12, masked=False, texture=0.0, colour=0.12, flat=0.88), {"background:flat": 0.0}, None,
     "ok", "", ""),
    ("the own hot area decides without masks", "healthy", False,
     causal(QUIET, obj=0.9, masked=False, texture=0.7, flat=0.7), {"background:texture": 0.0}, None, "ok", "", ""),
    ("a transform that flips every class alike", "diffuse", False,
     causal(QUIET, obj=0.0, masked=False, texture=0.7, flat=0.7), {"background:texture": 0.6, "background:flat": 0.6},
     None, "ok", "", ""),
    ("a corner beats the blur that also smears it", "healthy", False,
     causal({**QUIET, "corner:bottom_right": 0.9}, obj=0.0, masked=False, texture=0.8, flat=0.8), {}, None,
     "shortcut_suspected", "corner:bottom_right", "corner:bottom_right"),
    ("a thin band flips the class, but pasted elsewhere it carries nothing: the fill did it", "diffuse", False,
     causal({**QUIET, "border:4%": 0.6}, obj=0.12, masked=False, transplant={"border:4%": 0.0}), {}, None,
     "ok", "", ""),
    ("a thin band flips the class and pasted elsewhere it carries the class (60% of 128)", "diffuse", False,
     causal({**QUIET, "border:4%": 0.6}, obj=0.12, masked=False, transplant={"border:4%": 0.75}, n=128), {}, None,
     "shortcut_suspected", "border", "border:4%"),
    ("a refuted band does not hide the corner that does carry the class", "healthy", True,
     causal({**QUIET, "border:4%": 0.9, "corner:bottom_right": 0.8}, obj=0.1, bg=0.1,
            transplant={"border:4%": 0.05, "corner:bottom_right": 0.6}), {}, None,
     "shortcut_suspected", "corner:bottom_right", "corner:bottom_right"),
    ("texture without masks: its backgrounds turn other classes' images into it", "diffuse", False,
     causal(QUIET, obj=0.09, masked=False, texture=0.37, flat=0.31, bgt=0.81), {"background:texture": 0.12},
     None, "shortcut_suspected", "background", "background"),
    ("... but half of 16 recipients (28-72%) straddles 40%: undecided", "diffuse", False,
     causal(QUIET, obj=0.09, masked=False, texture=0.37, flat=0.31, bgt=0.5), {"background:texture": 0.12},
     None, "insufficient_data", "", ""),
    ("default class without masks: removing the hot area changes little, its backgrounds carry nothing",
     "diffuse", False, causal(QUIET, obj=0.09, masked=False, texture=0.0, flat=0.06, bgt=0.0), {}, None,
     "ok", "", ""),
    ("the hot area decides: a background that carries the class too is no shortcut", "healthy", False,
     causal(QUIET, obj=0.9, masked=False, bgt=0.6), {}, None, "ok", "", ""),
    ("a band along one side flips that edge and the thin border band: the edge is named", "healthy", False,
     causal({**QUIET, "border:4%": 1.0, "border:20%": 1.0, "edge:bottom": 0.9}, masked=False), {}, None,
     "shortcut_suspected", "edge:bottom", "edge:bottom"),
    ("without masks a mark at one fixed place inside the image: its hot area flips it and carries it",
     "corner", False, causal({**QUIET, "hot area": 0.81}, obj=0.88, masked=False, transplant={"hot area": 0.94},
                             same={"hot area": 0.19}), {"hot area": 0.9}, None,
     "shortcut_suspected", "fixed place", "hot area"),
    ("without masks the hot area of moving objects is never a cue", "healthy", False,
     causal({**QUIET, "hot area": 0.81}, obj=0.88, masked=False, transplant={"hot area": 0.94},
            same={"hot area": 0.19}), {}, None, "ok", "", ""),
    ("objects at one place in every class: the same box flips the other classes too", "corner", False,
     causal({**QUIET, "hot area": 0.9}, obj=0.9, masked=False, transplant={"hot area": 0.8},
            same={"hot area": 0.85}), {}, None, "ok", "", ""),
    ("too few images tested", "healthy", True,
     causal({**QUIET, "corner:bottom_right": 1.0}, obj=0.9, bg=0.0, n=10), {}, None, "ok", "object", ""),
]


@pytest.mark.parametrize("name,kind,masks,res,others,density,verdict,cue,cue_region", CAUSAL_CASES,
                         ids=[c[0] for c in CAUSAL_CASES])
def test_causal_case_table(name, kind, masks, res, others, density, verdict, cue, cue_region):
    rows = make_rows(kind, 40, masks=masks)
    if kind == "diffuse" and masks:  # an absence class has no object masks; others keep theirs
        rows["energy_object"] = 0.05 if not res.absence else np.nan
        rows["pointing_hit"] = 0.0 if not res.absence else np.nan
    v = assess(features(rows), causal=res, others=others, density=density)
    assert v.verdict == verdict, v.evidence
    if verdict == "shortcut_suspected":
        assert v.cue == cue and v.cue_region == cue_region
    assert v.evidence.endswith(".") and v.evidence.count(" - ") <= 1


def test_refuted_place_is_named_in_the_evidence():
    res = causal({**QUIET, "border:4%": 0.6}, obj=0.12, masked=False, transplant={"border:4%": 0.0})
    v = assess(features(make_rows("diffuse", 40, masks=False)), causal=res)
    assert v.verdict == "ok" and v.refuted is not None and v.refuted.place == "border:4%"
    assert "occluding border:4% (mean-colour fill) changes 60% of 32 predictions (42-74%), but pasted into 16 images" \
        in v.evidence and "carries no cue" in v.evidence
    kept = assess(features(make_rows("diffuse", 40, masks=False)),
                  causal=causal({**QUIET, "border:4%": 0.6}, obj=0.12, masked=False, transplant={"border:4%": 0.75},
                                n=128))
    assert kept.refuted is None and "it turns 75% into this class" in kept.evidence


def test_attention_alone_flags_only_without_tests():
    f = features(make_rows("sky", 40, masks=False))
    before = assess(f)
    assert before.verdict == "shortcut_suspected" and "attention only, no causal test" in before.evidence
    untested = assess(f, attention_decides=False)
    assert untested.verdict == "ok" and "cost budget" in untested.evidence
    cleared = assess(f, causal=causal(QUIET, masked=False))
    assert cleared.verdict == "ok" and cleared.attention_suspicion == pytest.approx(1.0)
    assert "no causal test supports a shortcut" in cleared.evidence


@pytest.mark.parametrize("flip,others,expected", [
    (0.5, 0.2, 0.5),  # both thresholds exactly
    (1.0, 0.0, 1.0),
    (0.25, 0.0, 0.25),  # half the flip threshold
    (0.9, 0.75, 0.25),  # flips all classes alike
    (float("nan"), 0.0, 0.0),
    (0.6, float("nan"), 0.6),  # no other class: others count as 0
])
def test_place_flip_score(flip, others, expected):
    assert place_flip_score(flip, others) == pytest.approx(expected)


def test_default_class_evidence():
    rows = make_rows("diffuse", 40, masks=True)
    rows["energy_object"], rows["pointing_hit"] = 0.05, 0.0
    v = assess(features(rows), causal=causal(QUIET, obj=0.0, bg=(0.0, 1.0)))
    assert v.verdict == "ok" and v.background_rate() == 0.0
    assert "a neutral colour 0% (0-11%) or another class's background 100% (89-100%)" in v.evidence
    assert "the model says this class when the other classes' cues are absent" in v.evidence


def test_evidence_does_not_contradict_itself():
    rows = make_rows("healthy", 40, masks=True)
    v = assess(features(rows), causal=causal(QUIET, obj=0.95, bg=0.0))
    assert "on the object" in v.evidence and "spread over" not in v.evidence
    assert "removing the object (inpainted) changes 95% of 32" in v.evidence
    assert v.verdict == "ok"


# ----------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("eig,max_k,expected", [
    ([0.0, 0.01, 0.02, 0.5, 0.55], 4, 3),  # three near-zero eigenvalues, then a jump
    ([0.0, 0.6, 0.62, 0.65], 3, 1),
    ([0.0, 0.02, 0.04, 0.06, 0.08], 4, 1),  # no gap above min_eigengap
    ([0.0, 0.0, 0.9], 1, 1),  # max_k 1
    ([0.0, 0.0, 0.01, 0.03, 0.06], 4, 2),  # two disconnected parts, no large gap
    ([0.0, 0.0, 0.0, 0.0, 0.5], 2, 2),  # capped at max_k
])
def test_eigengap_table(eig, max_k, expected):
    assert eigengap_k(eig, max_k) == expected


def test_minority_cue_cluster_is_found():
    rows = pd.concat([make_rows("healthy", 60, seed=1), make_rows("corner", 15, seed=2)], ignore_index=True)
    G = grids_from_cams(rows["cam"].tolist(), 8, 8, 16)
    c = cluster_maps(map_features(G))
    labels, k = c.labels, c.k
    assert k >= 2
    corner = labels[60:]
    assert len(set(corner)) == 1  # the watermark maps form one cluster ...
    assert not set(labels[:60]) & set(corner)  # ... of their own


def test_one_blob_is_one_cluster():
    rows = make_rows("corner", 40, seed=3)
    c = cluster_maps(map_features(grids_from_cams(rows["cam"].tolist(), 8, 8, 16)))
    labels, k = c.labels, c.k
    assert k == 1 and (labels == 0).all()


def test_spurious_gap_hand_values():
    score = np.arange(8, dtype=float)  # quarters of 2: rows 0-1 lowest, 6-7 highest
    correct = np.array([1, 1, 1, 0, 1, 0, 0, 0], float)
    assert spurious_gap(score, correct, min_quarter=2) == pytest.approx(0.0 - 1.0)
    assert math.isnan(spurious_gap(score, correct))  # quarters of 2 < 3
    s = np.r_[np.arange(12.0), np.nan]
    c = np.r_[np.ones(6), np.zeros(6), 1.0]
    assert spurious_gap(s, c) == pytest.approx(-1.0)


def test_choose_view():
    pairs = {("conv4", "gradcam"), ("conv4", "gradcam++"), ("conv3", "gradcam")}
    assert choose_view(pairs, ["conv4"]) == ("conv4", "gradcam++")
    assert choose_view(pairs, ["conv3"]) == ("conv3", "gradcam")
    assert choose_view(pairs, None, method="gradcam") == ("conv4", "gradcam")
    with pytest.raises(AuditError, match="layers: conv3, conv4"):
        choose_view(pairs, None, layer="nope")
    with pytest.raises(AuditError):
        choose_view(set())


# ----------------------------------------------------------------------------
# scan() on synthetic records: tables, schema, minority cluster surfacing
# ----------------------------------------------------------------------------


def write_job(out, frames, regions=None):
    regions = {"sky": SKY} if regions is None else regions
    df = pd.concat(frames, ignore_index=True)
    df["layer"], df["method"], df["shard"] = "conv4", "gradcam++", 0
    df["label_name"] = df["label"].map({0: "cat", 1: "dog"})
    df["pred_name"] = df["pred"].map({0: "cat", 1: "dog"})
    df["score"] = 0.9
    df["path"] = df["image_id"]
    schema = records_schema(list(regions))
    for f in schema:
        if f.name not in df:
            df[f.name] = None
    df["pointing_hit"] = df["pointing_hit"].map(lambda v: None if pd.isna(v) else bool(v > 0.5))
    table = pa.Table.from_pandas(df[[f.name for f in schema]], schema=schema, preserve_index=False)
    (out / "records").mkdir(parents=True)
    pq.write_table(table, out / "records" / "part-00000.parquet")
    job = {"name": "synthetic", "classes": ["cat", "dog"], "layers": ["conv4"], "input_size": list(SIZE),
           "spec": {"explain": {"regions": {k: list(v) for k, v in regions.items()}}}}
    (out / "job.json").write_text(json.dumps(job))


def test_scan_tables_and_minority_cluster(tmp_path, capsys):
    # dog: mostly healthy, 20% watermark maps; cat: healthy
    dog = pd.concat([make_rows("healthy", 60, seed=1), make_rows("corner", 15, seed=2)], ignore_index=True)
    dog["correct"] = [True] * 60 + [False] * 15
    dog["image_id"] = [f"dog/{i}.png" for i in range(len(dog))]
    cat = make_rows("healthy", 40, seed=4, target=0)
    write_job(tmp_path, [dog, cat])
    classes, clusters = scan(tmp_path, intervene=True)  # job.json has no model: intervention skipped
    printed = capsys.readouterr().out
    assert "shortcut_suspected" in printed and printed.index("dog") < printed.index("cat")
    assert list(classes["class_name"]) == ["dog", "cat"]  # suspects first
    d = classes.iloc[0]
    assert d["verdict"] == "shortcut_suspected" and d["n_suspect_clusters"] == 1
    assert d["attention_suspicion"] < 0.5  # the class as a whole looks healthy ...
    assert d["evidence"].startswith("A cluster of 15 heatmaps (20% of the class)")  # ... the cluster surfaces
    assert d["cue"] == "fixed place"
    # quarters of 75 // 4 = 18: the most off-object 18 are the 15 (wrong) watermark maps + 3 healthy
    assert d["spurious_gap"] == pytest.approx(3 / 18 - 1.0)
    assert classes.iloc[1]["verdict"] == "ok"
    assert d["accuracy"] == pytest.approx(60 / 75)
    dc = clusters[clusters["class_name"] == "dog"]
    sus = dc[dc["verdict"] == "shortcut_suspected"]
    assert len(sus) == 1 and sus.iloc[0]["n"] == 15 and sus.iloc[0]["share"] == pytest.approx(0.2)
    assert all(i.startswith("dog/") for i in sus.iloc[0]["example_ids"])
    mm = np.asarray(sus.iloc[0]["mean_map"]).reshape(16, 16)
    assert np.unravel_index(mm.argmax(), mm.shape)[0] > 11 and np.unravel_index(mm.argmax(), mm.shape)[1] > 11
    # written with the declared schema
    t = pq.read_table(tmp_path / "summary" / "classes.parquet")
    assert t.schema.field("verdict").type == pa.string() and "energy_sky" in t.schema.names
    assert pq.read_table(tmp_path / "summary" / "clusters.parquet").schema.field("example_ids").type == \
        pa.list_(pa.string())


def test_scan_ignore_masks_and_insufficient(tmp_path):
    sky = make_rows("sky", 30, seed=5, masks=True)
    few = make_rows("healthy", 5, seed=6, target=0)
    write_job(tmp_path, [sky, few])
    classes, _ = scan(tmp_path, intervene=False, quiet=True, use_masks=False)
    by = classes.set_index("class_name")
    assert by.loc["dog", "verdict"] == "shortcut_suspected" and by.loc["dog", "cue"] == "region:sky"
    assert pd.isna(by.loc["dog", "energy_object"])  # masks ignored
    assert by.loc["cat", "verdict"] == "insufficient_data" and pd.isna(by.loc["cat", "suspicion"])


def test_scan_errors_are_one_line(tmp_path):
    with pytest.raises(AuditError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuditError, match="no records"):
        scan(tmp_path / "empty")
    write_job(tmp_path / "j", [make_rows("healthy", 25)])
    with pytest.raises(AuditError, match="method 'cam'"):
        scan(tmp_path / "j", method="cam", quiet=True)


def test_cli_scan(tmp_path, capsys):
    from audit.cli import main

    write_job(tmp_path / "j", [make_rows("sky", 25, masks=False)])
    assert main(["scan", str(tmp_path / "j"), "--no-intervene"]) == 0
    out = capsys.readouterr().out
    assert "shortcut_suspected" in out and "region:sky" in out
    assert main(["scan", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("audit: error:") and len(err.strip().splitlines()) == 1


def test_default_class_depends_on_the_flagged_class_cue_and_gets_no_invented_cue():
    """Two classes: every circle carries a band along the top (flagged, its band carries the class); the
    model says 'square' when there is no band: removing the square changes nothing, and a whole-image
    recolouring that flips it would be an invented cue."""
    from audit.scan.verdict import as_default, default_class

    circle = assess(features(make_rows("healthy", 40, masks=False)),
                    causal=causal({**QUIET, "edge:bottom": 0.95}, obj=0.1, masked=False,
                                  transplant={"edge:bottom": 0.9}, n=64), others={"edge:bottom": 0.0})
    assert circle.suspected and circle.cue == "edge:bottom"
    f = features(make_rows("diffuse", 40, masks=False))
    square = assess(f, causal=causal(QUIET, obj=0.0, masked=False, colour=0.97, flat=0.1, n=64),
                    others={"image:colour": 0.0})
    assert square.suspected and square.cue == "colour cast"  # the invented cue, before the treatment
    from dataclasses import replace

    circle.cue_flip = replace(circle.cue_flip, to_class=0)  # without its band a circle becomes a square (0)
    of = default_class(square, 0, [("circle", circle)])
    assert of == ("circle",)
    treated = as_default(square, of, f)
    assert treated.verdict == "ok" and treated.cue == "" and treated.default_of == ("circle",)
    assert "a default class: the model says it when the cue of 'circle' is absent" in treated.evidence
    healthy = assess(f, causal=causal(QUIET, obj=0.9, masked=False, n=64))
    assert default_class(healthy, 0, [("circle", circle)]) == ()  # its object decides: not a default class
    assert default_class(square, 0, []) == ()  # nothing flagged: no cue to depend on
    assert default_class(square, 2, [("circle", circle)]) == ()  # circles without their band are not class 2


def test_a_colour_transplant_onto_a_flagged_class_cue_carriers_is_no_cue_of_its_own():
    """Binary, a frame on every disc: the square's colours given to discs take the frame's colours away, and
    the model says square; an edit of the square's own images (its object's hue) is a cue of its own."""
    from dataclasses import replace

    from audit.scan.verdict import default_class

    disc = assess(features(make_rows("healthy", 40, masks=False)),
                  causal=causal({**QUIET, "edge:bottom": 0.95}, obj=0.1, masked=False,
                                transplant={"edge:bottom": 0.9}, n=64), others={"edge:bottom": 0.0})
    disc.cue_flip = replace(disc.cue_flip, to_class=0)
    square = assess(features(make_rows("diffuse", 40, masks=False)),
                    causal=causal(QUIET, obj=0.0, masked=False, colour=0.97, flat=0.1, n=64),
                    others={"image:colour": 0.0})
    given = PlaceFlip("transplant", "image:colour-transplant", None, "colour-transfer", 29, 24 / 29, 1.0, 24 / 29,
                      29, probe="colour-transplant", k=24, to_class=0)
    hue = PlaceFlip("transform", "object:hue", None, "permute", 64, 0.95, 0.1, probe="object-hue", k=61)
    assert default_class(replace(square, cue_flip=given), 0, [("disc", disc)]) == ("disc",)
    assert default_class(replace(square, cue_flip=hue), 0, [("disc", disc)]) == ()
    assert default_class(replace(square, cue_flip=given), 0, []) == ()  # nothing flagged: its own colours

def _hue(k, n):
    """A CausalResult whose only test is the object's hue rotation flipping ``k`` of ``n``."""
    t = PlaceFlip("transform", "object:hue", None, "permute", n, k / n, 0.1, probe="object-hue", where=Where.OBJECT, k=k)
    return CausalResult(n=n, tests=[t], masked=True)


def test_identity_placebo_is_the_other_class_it_flips_most():
    quiet, twin = _hue(4, 32), _hue(45, 54)  # 12%; 83% (71-91%): a healthy class the edit breaks too
    o = placebo_rates([quiet, twin, quiet])
    assert o["object:hue"] == pytest.approx(45 / 54)  # the largest, not the median (12%)
    assert o.bounds["object:hue"] == pytest.approx(wilson(45, 54))
    flips = _hue(118, 128)  # 92% (86-96%): flagged against the median ...
    assert causal_cue(flips, {"object:hue": 4 / 32}, DEFAULT, mode=-1).score >= 0.5
    for mode in (-1, 0, 1):  # ... never against the twin's interval: ok, not even undecided
        assert causal_cue(flips, o, DEFAULT, mode=mode).score < 0.5
    # a colour-decided class against a class the edit leaves alone: flagged at the twin-free placebo's upper end
    alone = placebo_rates([quiet])
    assert alone.bounds["object:hue"][1] == pytest.approx(wilson(4, 32)[1])
    assert causal_cue(_hue(32, 32), alone, DEFAULT, mode=-1).score >= 0.5


def test_a_flagged_class_is_no_identity_placebo_of_the_next_round():
    """A tinted class (flagged by its corner here) flips under greyscale too; a class that greyscale flips
    far more than the healthy one is judged against the healthy one in the next round and flagged."""
    from audit.scan.causal import CausalTests
    from audit.scan.pipeline import judge
    from audit.scan.table import ClassResult, interventions_table

    def grey(k, n=32):
        return PlaceFlip("transform", "object:greyscale", None, "greyscale", n, k / n, 0.1,
                         probe="object-greyscale", where=Where.OBJECT, k=k)

    def result(tests):
        return CausalResult(n=32, tests=tests, masked=True)

    cue = causal({**QUIET, "corner:bottom_right": 0.95}, obj=0.1, bg=0.1)
    tinted = result(cue.tests + [grey(32)])
    colour = result(causal(QUIET, obj=0.1, bg=0.1).tests + [grey(31)])
    healthy = result(causal(QUIET, obj=0.9, bg=0.1).tests + [grey(1)])
    grown = []  # before each later round, sequential testing for the classes still unflagged
    grower = type("Grow", (), {"again": lambda self, ids, flagged: grown.append((set(ids), set(flagged)))})()
    tests = CausalTests(results={(0, None): tinted, (1, None): colour, (2, None): healthy}, grow=grower)
    f = features(make_rows("healthy", 40, masks=True))
    classes = [ClassResult(c, n, None, None, f, None, None, 40) for c, n in enumerate(("tinted", "colour", "healthy"))]
    judge(classes, tests, DEFAULT)
    assert [r.final.verdict for r in classes] == ["shortcut_suspected", "shortcut_suspected", "ok"]
    assert grown == [({1, 2}, {0}), ({2}, {0, 1})]
    assert classes[0].final.cue == "corner:bottom_right" and classes[1].final.cue == "colour of the object"
    # judged against every other class alike (one round), the colour class stays unflagged
    one = assess(f, DEFAULT, colour, tests.others(1, frozenset()), tests.density)
    assert not one.suspected
    table = interventions_table(classes, tests)  # the placebo each class was judged against
    grey_rows = table[table.place == "object:greyscale"].set_index("class_id").flip_rate_others
    assert grey_rows[1] == pytest.approx(1 / 32) and grey_rows[0] == pytest.approx(31 / 32)
