"""The probe registry: docs, schema and results agree with it; remove_cue; Wilson intervals."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from audit.errors import AuditError
from audit.scan.config import DEFAULT, Config
from audit.scan.interval import difference, pct_interval, side, wilson
from audit.scan.probes import PROBES, TEST_VALUES, Family, Sample, causal_tests, remove_cue
from audit.scan.probes.edits import occlude, replace_background, spare_masks, transform
from audit.scan.probes.places import place_bank

ROOT = Path(__file__).resolve().parent.parent
S = 16


def _docs_rows() -> list[list[str]]:
    text = (ROOT / "docs" / "scan.md").read_text()
    table = text[text.index("| probe | test"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_docs_table_names_every_probe_and_only_them():
    rows = _docs_rows()
    named = {n for r in rows for n in re.findall(r"`([a-z-]+)`", r[0])}
    assert named == set(PROBES)
    tests = {m for r in rows for m in re.findall(r"^`([a-z]+)`", r[1])}
    assert tests == set(TEST_VALUES)


def test_schema_lists_the_registry_test_values():
    schema = json.loads((ROOT / "schemas" / "interventions.schema.json").read_text())
    doc = next(c["doc"] for c in schema["columns"] if c["name"] == "test")
    assert set(v.strip() for v in doc.split("|")) == set(TEST_VALUES)


def test_every_family_is_a_contract_value():
    assert {p.family for p in PROBES.values()} <= set(Family)
    assert set(TEST_VALUES) == {"object", "background", "region", "transform", "transplant", "placebo"}


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    imgs = np.full((n, S, S, 3), 120, np.uint8)
    masks = np.zeros((n, S, S), bool)
    for i in range(n):
        y, x = rng.integers(4, 10, size=2)
        imgs[i, y:y + 4, x:x + 4] = 20
        masks[i, y:y + 4, x:x + 4] = True
    imgs[: n // 2, :3, :3] = 250  # half carry a corner tag
    return imgs, masks


def corner_model(images):
    return (images[:, :3, :3].mean(axis=(1, 2, 3)) > 200).astype(int)


def test_results_carry_their_probe_and_its_test_value():
    imgs, masks = scenes(20)
    s = Sample(imgs, place_bank((S, S)), masks, spare=spare_masks((S, S), masks))
    res = causal_tests(corner_model, s, DEFAULT.replace(screen=0))
    assert {t.probe for t in res.tests} <= set(PROBES)
    for t in res.tests:
        assert t.test == t.spec.family.value and t.test in TEST_VALUES
    corner = res.at("corner:top_left")
    assert corner.flip_rate == pytest.approx(0.5) and corner.k == 10 and corner.n == 20
    lo, hi = wilson(10, 20)
    assert (corner.low, corner.high) == (pytest.approx(lo), pytest.approx(hi))


def test_remove_cue_is_the_edit_of_the_test():
    imgs, masks = scenes(6)
    corner = place_bank((S, S))[[p.name for p in place_bank((S, S))].index("corner:top_left")]
    got = remove_cue(imgs, "corner:top_left", masks=masks)
    np.testing.assert_array_equal(got, occlude(imgs, corner.mask[None] & ~masks, "mean"))
    assert corner_model(got).sum() == 0  # the tag is gone
    box = (0.0, 0.0, 0.25, 0.25)
    hot = remove_cue(imgs, "hot area", cue_box=box)
    assert corner_model(hot).sum() == 0
    np.testing.assert_array_equal(remove_cue(imgs, "background", masks=masks), replace_background(imgs, masks)[0])
    spare = spare_masks((S, S), masks)
    np.testing.assert_array_equal(remove_cue(imgs, "background:texture", masks=masks),
                                  transform(imgs, ~spare, "fine-blur"))
    with pytest.raises(AuditError):
        remove_cue(imgs, "nowhere")
    with pytest.raises(AuditError):
        remove_cue(imgs, "image:colour")  # no masks, no spared area


@pytest.mark.parametrize("k, n, low, high", [
    (8, 16, 0.2800, 0.7200),  # the healthy class of issue 21: 50% of 16 straddles 0.5
    (3, 8, 0.1368, 0.6943),  # 3 of 8 (38%): 14-69%
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (29, 32, 0.7578, 0.9676),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson(k, n)
    p, z = k / n, 1.959963984540054  # float64 reference, the closed form
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert lo == pytest.approx(max(0.0, c - h), abs=1e-12) and hi == pytest.approx(min(1.0, c + h), abs=1e-12)
    assert (lo, hi) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


@pytest.mark.parametrize("k1, n1, k2, n2, low, high", [  # Newcombe (1998), Table II, method 10
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (6, 7, 2, 7, 0.0582, 0.8062),
    (5, 56, 0, 29, -0.0381, 0.1926),
    (0, 10, 0, 20, -0.1611, 0.2775),
])
def test_difference_interval_is_newcombes(k1, n1, k2, n2, low, high):
    lo, hi = difference(k1, n1, k2, n2)
    assert (lo, hi) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    w1, w2 = wilson(k1, n1), wilson(k2, n2)
    assert lo >= w1[0] - w2[1] - 1e-12  # never wider than the far ends subtracted (equal where one side is 0)
    assert all(math.isnan(v) for v in difference(1, 0, 1, 2))


def test_wilson_edges_and_side():
    assert all(math.isnan(v) for v in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(5, 4)
    assert side(*wilson(8, 16), 0.5) == 0  # straddles: no decision
    assert side(*wilson(29, 32), 0.5) == 1 and side(*wilson(0, 32), 0.25) == -1
    assert side(math.nan, math.nan, 0.5) == 0
    assert pct_interval(29 / 32, 32, *wilson(29, 32)) == "91% of 32 (76-97%)"


def test_config_holds_every_threshold_of_the_scan():
    """No module of audit.scan keeps a numeric threshold of its own beside Config."""
    const = re.compile(r"^([A-Z][A-Z0-9_]+)\s*=\s*[-+]?[0-9.]", re.M)
    allowed = {"CHUNK", "BATCH", "Z95", "BORDER_AREA"}  # speed settings and definitions, not thresholds
    found = {}
    scan = ROOT / "audit" / "scan"  # the verdict's modules (the per-image pass and export keep their own settings)
    judged = ["causal", "cluster", "config", "features", "grids", "intervene", "pipeline", "read", "robust",
              "table", "values", "verdict", "interval"]
    for path in [scan / f"{m}.py" for m in judged] + sorted((scan / "probes").glob("*.py")):
        for name in const.findall(path.read_text()):
            if name not in allowed:
                found[name] = path.name
    assert found == {}
    assert Config().replace(sample=8).sample == 8


def test_merge_adds_the_counts_of_more_images():
    from audit.scan.causal import merge
    from audit.scan.probes import CausalResult, PlaceFlip, Where

    first = CausalResult(32, [PlaceFlip("region", "edge:top", (0, 0, 1, .2), "mean", 32, 18 / 32, probe="place",
                                        where=Where.EDGE, k=18),
                              PlaceFlip("transplant", "background", None, "pasted", 16, 0.5, probe="background-transplant",
                                        k=8)])
    more = CausalResult(32, [PlaceFlip("region", "edge:top", (0, 0, 1, .2), "mean", 32, 22 / 32, probe="place",
                                       where=Where.EDGE, k=22)])
    got = merge(first, more)
    top = got.at("edge:top")
    assert (top.n, top.k, top.flip_rate) == (64, 40, 40 / 64) and got.n == 64
    assert (top.low, top.high) == (pytest.approx(wilson(40, 64)[0]), pytest.approx(wilson(40, 64)[1]))
    assert got.background_transplant().n == 16  # a transplant is not grown


def test_a_screening_of_eight_images_never_vetoes_the_background_tests():
    """Removing the object flipped 5 of 8 screened images (63%, interval 31-86%): not clearly above
    object_screen_max (50%), so a promising background test goes on (before, 63% > 50% on 8 images stopped it);
    8 of 8 (interval 68-100%) is clearly above and stops it."""
    from audit.scan.probes.base import Trial

    bg_probe, obj_probe = PROBES["background-neutral"], PROBES["object"]
    sel = np.ones(8, bool)
    bg = Trial(bg_probe, "background", None, "neutral", sel, flips={i: i < 4 for i in range(8)})
    for flipped_n, goes_on in ((5, True), (8, False)):
        obj = Trial(obj_probe, "object", None, "inpaint", sel, flips={i: i < flipped_n for i in range(8)})
        assert bg_probe.go_on(bg, [obj, bg], DEFAULT) is goes_on
    assert wilson(5, 8)[0] < DEFAULT.object_screen_max < wilson(8, 8)[0]


def test_causal_budget_flag_refuses_a_negative_value():
    from types import SimpleNamespace

    from audit.cli.scan import causal_budget

    assert causal_budget(SimpleNamespace(causal_budget=None)) == {}
    assert causal_budget(SimpleNamespace(causal_budget=0.5)) == {"budget": 0.5}
    with pytest.raises(AuditError):
        causal_budget(SimpleNamespace(causal_budget=-1.0))


def _group(n, attention, peak):
    from types import SimpleNamespace

    import pandas as pd

    from audit.scan.robust import PeakPlace

    ids = [f"img{i}" for i in range(n)]
    rows = pd.DataFrame({"image_id": ids, "status": "ok"})
    feats = SimpleNamespace(n=n, hot_box=None, peak_place=PeakPlace(*peak, n=n))
    return ids, rows, feats, SimpleNamespace(attention_suspicion=attention, verdict="ok")


def test_suspects_are_planned_first_and_never_cut_off_by_the_budget():
    """A minority cluster whose peaks sit at one corner (a BadNets trigger on a third of a class) is tested
    before ten unsuspected classes, at a full sample, even when the budget cannot test every class."""
    from types import SimpleNamespace

    from audit.scan.causal import plan_tests, priority

    results = []
    for c in range(10):
        ids, rows, feats, own = _group(300, 0.1, (0.5, 0.5, 0.3))
        clusters = []
        if c == 7:  # a third of class 7 peaks at the top-right corner
            cl_feats = SimpleNamespace(n=100, hot_box=None, peak_place=_group(100, 0, (0.9, 0.1, 0.97))[2].peak_place)
            clusters = [SimpleNamespace(cluster=0, members=ids[100:], features=feats, verdict=own),
                        SimpleNamespace(cluster=1, members=ids[:100], features=cl_feats,
                                        verdict=SimpleNamespace(attention_suspicion=0.2, verdict="ok"))]
        results.append(SimpleNamespace(class_id=c, features=feats, rows=rows, own=own, clusters=clusters))
    cfg = DEFAULT.replace(budget=0.0, budget_floor=600)
    assert priority(results[7].clusters[1].features, results[7].clusters[1].verdict, cfg) >= 0.5
    plans, skipped = plan_tests(results, 3000, 17, False, cfg)
    assert (plans[0].class_id, plans[0].cluster) == (7, 1) and len(plans[0].ids) == cfg.sample
    assert skipped > 0  # the unsuspected classes did not all fit ...
    assert all(p.cluster is None for p in plans[1:])  # ... the suspect was never among those left out
