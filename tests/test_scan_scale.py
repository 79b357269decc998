"""The scan's verdicts do not depend on how many maps there are; minority strategies surface at any scale.

Fake job outputs with planted strategies (helpers_records): a class looking at
a fixed corner (4% of its maps elsewhere), a healthy class, and a class of
which a share looks at a tight spot in another corner.
"""

import helpers_records as hr
import pytest

from audit.scan import scan

EXPECTED = {  # class: (verdict, cue)
    "watermark": ("shortcut_suspected", "fixed place"),
    "healthy": ("ok", None),
    "minority": ("shortcut_suspected", "fixed place"),
}


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """The same distribution (200 drawn maps per class, 10% minority) at 200 and at 20,000 maps per class."""
    root = tmp_path_factory.mktemp("scale")
    return {n: hr.write_out(root / f"n{n}", n, copies_of=200, noise=0.05, minority=0.1) for n in (200, 20000)}


def verdicts(out, use_masks):
    classes, clusters = scan(out, intervene=False, quiet=True, use_masks=use_masks, force=True)  # one output, scanned both ways
    return classes.set_index("class_name"), clusters


@pytest.mark.parametrize("use_masks", [True, False], ids=["masks", "no-masks"])
def test_same_verdicts_and_cues_at_200_and_20000_maps(outs, use_masks):
    small, small_cl = verdicts(outs[200], use_masks)
    large, large_cl = verdicts(outs[20000], use_masks)
    assert small["n"].to_dict() == {c: 200 for c in hr.CLASSES}
    assert large["n"].to_dict() == {c: 20000 for c in hr.CLASSES}
    for name, (verdict, cue) in EXPECTED.items():
        for table in (small, large):
            assert table.loc[name, "verdict"] == verdict, (name, table.loc[name, "evidence"])
            if cue:
                assert table.loc[name, "cue"] == cue
    assert small["cue"].to_dict() == large["cue"].to_dict()
    # the minority is a cluster of its own at both scales, with the same share of its class
    for cl, n in ((small_cl, 200), (large_cl, 20000)):
        m = cl[cl["class_name"] == "minority"].set_index("cluster")
        assert len(m) == 2 and m.loc[1, "verdict"] == "shortcut_suspected"
        assert m["n"].sum() == n
        assert m.loc[1, "share"] == pytest.approx(0.08, abs=0.001)  # 16 of 200 drawn maps are on the cue
    assert large.loc["minority", "evidence"].startswith("A cluster of 1600 heatmaps (8% of the class)")
    # the robust place is the same: the 4% outliers and the copies do not move it
    for c in ("peak_mode_x", "peak_mode_y", "peak_share"):
        assert large.loc["watermark", c] == pytest.approx(small.loc["watermark", c], abs=0.01)
    assert small.loc["watermark", "peak_share"] < 0.99  # the outliers are there, and do not decide


def test_a_two_percent_strategy_of_a_large_class_is_judged(tmp_path):
    out = hr.write_out(tmp_path, 20000, minority=0.02, classes=("minority",))
    classes, clusters = scan(out, intervene=False, quiet=True, use_masks=False)
    row = classes.set_index("class_name").loc["minority"]
    assert row["verdict"] == "shortcut_suspected" and row["cue"] == "fixed place"
    assert row["n_clusters"] == 2 and row["n_suspect_clusters"] == 1
    cl = clusters.set_index("cluster")
    assert cl.loc[1, "verdict"] == "shortcut_suspected"
    assert cl.loc[1, "share"] == pytest.approx(0.02, abs=0.004)
    assert cl.loc[0, "verdict"] == "ok"


def test_a_strategy_below_the_relative_minimum_is_not_a_cluster(tmp_path):
    # 0.4% of 20,000 maps = about 80: more than 8 maps, but less than 1% of the class: those maps
    # join the nearest cluster instead of being judged as a strategy
    out = hr.write_out(tmp_path, 20000, minority=0.004, classes=("minority",))
    classes, clusters = scan(out, intervene=False, quiet=True, use_masks=False)
    assert classes.loc[0, "verdict"] == "ok" and classes.loc[0, "n_clusters"] == 1
    assert clusters["n"].tolist() == [20000]


def test_classes_below_the_minimum_are_insufficient(tmp_path):
    out = hr.write_out(tmp_path, 12, minority=0.5)
    classes, clusters = scan(out, intervene=False, quiet=True)
    assert classes["verdict"].tolist() == ["insufficient_data"] * 3
    assert classes["n"].tolist() == [12] * 3
    assert len(clusters) == 0
