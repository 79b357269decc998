"""End to end: the tank/sky demo's shortcut model is flagged (sky as the cue), the control is not.

Builds a small tank/sky set and trains both models in the run's shared cache
(once per test run, for this module and test_demo_fix.py), runs both jobs in
the driver (through run_job and the packaged specs, as ``audit demo`` does),
scans with intervention, with masks and without.
"""

import os

import numpy as np
import pytest

from audit import tanksky

PARAMS = tanksky.Params(n_train=320, n_test=120, epochs=40, seed=7)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, shared_cache):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from audit.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    lines = []
    with shared_cache.lock("tanksky") as cache:  # trained once per run (test_demo_fix.py uses the same)
        tanksky.ensure(PARAMS, root=cache, log=lines.append)
    r = run_demo(root / "out", cache=cache, params=PARAMS, report=False, progress=False, log=lines.append)
    r["log"] = "\n".join(lines)
    return r


def test_dataset_is_biased_in_training_and_not_in_test():
    imgs, labels, masks, skies = tanksky.make_split(40, 1, biased=True)
    assert imgs.shape == (40, 64, 64, 3) and imgs.dtype == np.uint8
    assert (skies[labels == 1] == "cloudy").all() and (skies[labels == 0] == "sunny").all()
    assert masks[labels == 1].any(axis=(1, 2)).all() and not masks[labels == 0].any()
    _, labels, _, skies = tanksky.make_split(200, 2, biased=False)
    both = [(lab, s) for lab in (0, 1) for s in ("cloudy", "sunny")]
    assert all(((labels == lab) & (skies == s)).sum() > 30 for lab, s in both)
    a, *_ = tanksky.make_split(4, 3, biased=False)
    b, *_ = tanksky.make_split(4, 3, biased=False)
    np.testing.assert_array_equal(a, b)  # deterministic per seed


@pytest.mark.slow
def test_demo_flags_the_shortcut_with_the_sky_as_cue(demo):
    from audit.demo import flagged

    sc = demo["models"]["shortcut"]
    assert sc["summary"]["accuracy"] < 0.7  # the sky no longer tells on the test split
    c = sc["classes"].set_index("class_name")
    assert flagged(sc["classes"])
    assert c.loc["no_tank", "verdict"] == "shortcut_suspected"
    assert c.loc["no_tank", "cue"] == "region:sky"
    assert c.loc["no_tank", "flip_rate_cue"] > 0.5  # occluding the sky changes the answer
    # tank is what the model says when the sky is not blue: attention off the tank, removing the tank
    # changes nothing; the cue is no_tank's sky, so tank is no_tank's default class (ok, no cue of its own)
    assert c.loc["tank", "energy_object"] < 0.15
    assert c.loc["tank", "flip_rate_object"] < 0.2
    assert c.loc["tank", "verdict"] == "ok" and c.loc["tank", "cue"] == ""
    assert c.loc["tank", "default_of"] == "no_tank"
    assert "a default class: the model says it when the cue of 'no_tank' is absent" in c.loc["tank", "evidence"]
    assert "region 'sky'" in c.loc["no_tank", "evidence"]
    assert "SHORTCUT SUSPECTED" in demo["log"] and "no shortcut found" in demo["log"]


@pytest.mark.slow
def test_demo_control_is_not_flagged(demo):
    from audit.demo import flagged

    ct = demo["models"]["control"]
    assert ct["summary"]["accuracy"] > 0.9
    assert not flagged(ct["classes"]), ct["classes"][["class_name", "verdict", "evidence"]].to_string()
    c = ct["classes"].set_index("class_name")
    assert c.loc["tank", "pointing_hit"] > 0.8
    assert (ct["clusters"]["verdict"] != "shortcut_suspected").all()


@pytest.mark.slow
def test_demo_without_masks(demo):
    from audit.demo import flagged
    from audit.scan.pipeline import scan

    sc, _ = scan(demo["models"]["shortcut"]["out"], use_masks=False, quiet=True, force=True)
    ct, ctc = scan(demo["models"]["control"]["out"], use_masks=False, quiet=True, force=True)
    assert flagged(sc) and not flagged(ct)
    s = sc.set_index("class_name")
    assert s.loc["no_tank", "cue"] == "region:sky" and s.loc["no_tank", "flip_rate_cue"] > 0.5
    assert s["energy_object"].isna().all() and s["flip_rate_object"].isna().all()
    assert (ctc["verdict"] != "shortcut_suspected").all()


@pytest.mark.slow
def test_demo_writes_the_contract_tables(demo):
    import pyarrow.parquet as pq

    from audit.data.schema import arrow_schema

    out = demo["models"]["shortcut"]["out"]
    for name in ("classes", "clusters"):
        t = pq.read_table(f"{out}/summary/{name}.parquet")
        want = arrow_schema(name, {"energy_sky": "float32"})
        assert t.schema.names == want.names
        assert set(t.column("verdict").to_pylist()) <= {"shortcut_suspected", "ok", "insufficient_data"}
    from audit.scan import scan

    scan(out, quiet=True, force=True)  # with masks again (test_demo_without_masks may have rescanned without)
    t = pq.read_table(f"{out}/summary/interventions.parquet")
    assert t.schema.names == arrow_schema("interventions").names
    df = t.to_pandas()
    # every class tested, with masks; the only transplant with masks is the colour transplant; the sky's
    # placebo (its box at random places) too
    assert set(df["test"]) == {"object", "background", "transform", "region", "transplant", "placebo"}
    assert set(df.loc[df["test"] == "transplant", "place"]) == {"image:colour-transplant"}
    rows = df[(df["class_name"] == "no_tank") & (df["place"] == "region:sky") & df["cluster"].isna()]
    sky, placebo = rows[rows["test"] == "region"].iloc[0], rows[rows["test"] == "placebo"].iloc[0]
    assert sky["flip_rate"] > 0.5 and sky["fill"] == "mean" and sky["n"] >= 16
    # the placebo runs on the 8 screening images, and on the rest of the sample only when one of them flipped
    assert placebo["n"] >= 8 and (placebo["n"] == 8) == (placebo["n_flipped"] == 0)
    assert placebo["flip_rate"] < sky["flip_rate"] - 0.3
    assert (df.loc[df["test"] == "object", "fill"] == "inpaint").all()
    assert {"border:4%", "corner:top_left", "edge:bottom"} <= set(df["place"])


def test_demo_out_under_a_file_is_one_line(tmp_path, capsys):
    from audit.cli import main

    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "afile" / "demo"), "--no-progress"]) == 2
    e = capsys.readouterr().err.strip()
    assert e == f"audit: error: --out: {tmp_path / 'afile'} exists and is not a directory"
