"""A scan never silently replaces a saved one made otherwise; summary/scan.json says how it was made."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers_records import LAYER, METHOD, write_out

from audit import AuditError
from audit.scan import provenance
from audit.scan.pipeline import scan, scan_as_saved


@pytest.fixture()
def out(tmp_path):
    return write_out(tmp_path / "out", 60, classes=("watermark", "healthy"))


def test_scan_records_its_settings(out):
    scan(out, intervene=False, quiet=True)
    made = json.loads((out / "summary" / "scan.json").read_text())
    assert made["settings"] == {"layer": LAYER, "method": METHOD, "intervene": False, "use_masks": True,
                                "fill": "mean"}
    assert made["command"] == f"audit scan OUT --layer {LAYER} --method {METHOD} --no-intervene"
    assert provenance.read(out)["settings"] == provenance.ScanSettings(LAYER, METHOD, False, True, "mean")


def test_other_settings_are_refused_without_force(out):
    scan(out, intervene=False, quiet=True)
    before = pd.read_parquet(out / "summary" / "classes.parquet")
    with pytest.raises(AuditError, match="masks used.*would replace it: add --force"):
        scan(out, intervene=False, quiet=True, use_masks=False)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "summary" / "classes.parquet"), before)
    assert provenance.read(out)["settings"].use_masks is True
    scan(out, intervene=False, quiet=True, use_masks=False, force=True)
    assert provenance.read(out)["settings"].use_masks is False


def test_same_settings_and_rescan_as_saved(out, capsys):
    scan(out, intervene=False, quiet=True, use_masks=False)
    scan(out, intervene=False, quiet=True, use_masks=False)  # the same: no question
    scan_as_saved(out, quiet=True)  # what `audit run` does at its end: keeps --ignore-masks, --no-intervene
    assert provenance.read(out)["settings"] == provenance.ScanSettings(LAYER, METHOD, False, False, "mean")


def test_check_lets_causal_tests_replace_attention_only():
    saved = provenance.ScanSettings("conv4", "gradcam++", False, True, "mean")
    stronger = provenance.ScanSettings("conv4", "gradcam++", True, True, "mean")
    weaker = provenance.ScanSettings("conv4", "gradcam++", False, True, "mean")
    assert saved.describe() == "layer conv4, gradcam++, attention only (no causal test), masks used"
    assert "confirmed by causal tests" in _check_against(saved, stronger)
    assert _check_against(saved, weaker) is None
    with pytest.raises(AuditError, match="causal tests \\(mean fill\\).*attention only"):
        _check_against(stronger, weaker)


def _check_against(saved, new):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        provenance.write(Path(d), saved, 1.0)
        return provenance.check(Path(d), new, force=False)


def test_report_says_how_the_scan_was_made(out):
    assert "not recorded" in provenance.report_line(out)
    scan(out, intervene=False, quiet=True)
    line = provenance.report_line(out)
    assert line.startswith(f"Verdicts from `audit scan` on layer {LAYER}, {METHOD}, attention only")
    assert "run `audit scan OUT` to confirm them" in line


def test_the_causal_budget_is_recorded_never_refused_and_kept_on_rescan(tmp_path, monkeypatch):
    from pathlib import Path

    settings = provenance.ScanSettings("conv4", "gradcam++", True, True, "mean")
    provenance.write(Path(tmp_path), settings, 1.0, budget=0.5)
    made = json.loads((tmp_path / "summary" / "scan.json").read_text())
    assert made["causal_budget"] == 0.5 and made["command"].endswith("--causal-budget 0.5")
    assert provenance.saved_budget(tmp_path) == 0.5
    assert "causal budget 0.5 forward passes per image" in provenance.report_line(tmp_path)
    assert provenance.check(tmp_path, settings, force=False) is None  # another budget is no other scan
    seen = {}
    monkeypatch.setattr("audit.scan.pipeline.scan", lambda out, **kw: seen.update(kw["cfg"].__dict__))
    scan_as_saved(tmp_path, quiet=True)
    assert seen["budget"] == 0.5  # a budget raised by hand stays raised when `audit run` rescans
    scan_as_saved(tmp_path, quiet=True, changes={"budget": 2.0})
    assert seen["budget"] == 2.0  # ...unless this run gives one
