"""`audit demo --fix`: DFR on the export's groups, re-audit, comparison, and what it prints (slow: trains)."""

import os

import numpy as np
import pandas as pd
import pytest

from audit import tanksky

PARAMS = tanksky.Params(n_train=320, n_test=120, epochs=40, seed=7)


@pytest.mark.slow
def test_demo_fix_reports_verdicts_and_worst_group_from_the_data(tmp_path, shared_cache):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from audit.demo import run_demo
    from audit.demofix import worst_group

    lines = []
    with shared_cache.lock("tanksky") as cache:  # trained once per run (test_demo.py uses the same)
        tanksky.ensure(PARAMS, root=cache, log=lines.append)
    r = run_demo(tmp_path / "out", cache=cache, params=PARAMS, report=False, progress=False,
                 log=lines.append, fix=True)
    log = "\n".join(lines)
    fix = r["fix"]
    fix_dir = tmp_path / "out" / "fix"
    for f in ("compare.html", "compare.parquet", "dfr.keras", "export/metadata.csv"):
        assert (fix_dir / f).exists(), f
    table = pd.read_parquet(fix_dir / "compare.parquet").set_index("class_name")
    assert set(table.index) == {"no_tank", "tank"} and table.loc["no_tank", "verdict_a"] == "shortcut_suspected"
    assert f"no_tank: shortcut_suspected -> {table.loc['no_tank', 'verdict_b']}" in log
    assert "worst-group accuracy, held-out split 2" in log
    # the worst group after the fix, against a direct count over the export's groups and the re-audit's records
    import audit

    meta = pd.read_csv(fix_dir / "export" / "metadata.csv")
    rec = audit.load(fix["out"], columns=["image_id", "correct"]).drop_duplicates("image_id").set_index("image_id")
    ok = rec.loc[meta.img_filename, "correct"].to_numpy(bool)
    accs = [ok[(meta.y == a) & (meta.place == p)].mean() for a in (0, 1) for p in set(meta.place)
            if ((meta.y == a) & (meta.place == p)).any()]
    assert fix["worst_after"].acc == pytest.approx(min(accs))
    assert worst_group(meta.y, meta.place, ok).acc == pytest.approx(np.min(accs))
