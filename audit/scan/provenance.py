"""How the tables in ``OUT/summary/`` were made (``summary/scan.json``), and no silent replacement.

A scan records its settings next to its tables.  A later scan with other
settings (``--no-intervene`` after a scan with causal tests, another layer,
method, fill or masks choice) would replace stronger or different verdicts
without a word, so it is refused unless ``--force`` is given; the one
replacement that loses nothing, the causal tests run where the saved scan had
none (same view), goes ahead and says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields

from audit.data import fs, io
from audit.errors import AuditError

FILE = "scan.json"


@dataclass(frozen=True)
class ScanSettings:
    """What decides a scan's tables (the thresholds are the code's own)."""

    layer: str
    method: str
    intervene: bool
    use_masks: bool
    fill: str

    def describe(self) -> str:
        """One phrase: "layer conv4, gradcam++, causal tests (mean fill), masks used"."""
        tests = f"causal tests ({self.fill} fill)" if self.intervene else "attention only (no causal test)"
        return f"layer {self.layer}, {self.method}, {tests}, masks {'used' if self.use_masks else 'ignored'}"

    def options(self) -> str:
        """The `audit scan` options that make this scan."""
        parts = [f"--layer {self.layer}", f"--method {self.method}"]
        parts += [] if self.intervene else ["--no-intervene"]
        parts += [] if self.use_masks else ["--ignore-masks"]
        parts += [] if self.fill == "mean" else [f"--fill {self.fill}"]
        return " ".join(parts)


def _path(out):
    from pathlib import Path

    return fs.join(str(out), "summary", FILE) if fs.is_uri(str(out)) else Path(out) / "summary" / FILE


def read(out) -> dict | None:
    """``summary/scan.json`` as a dict (``settings`` a :class:`ScanSettings`), or None when absent or unreadable."""
    p = _path(out)
    try:
        raw = json.loads(fs.read_bytes(str(p)).decode() if fs.is_uri(str(out)) else p.read_text())
        names = {f.name for f in fields(ScanSettings)}
        raw["settings"] = ScanSettings(**{k: raw["settings"][k] for k in names})
        return raw
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check(out, new: ScanSettings, force: bool) -> str | None:
    """Refuse to replace a saved scan made otherwise; returns a line to print when it replaces one.

    Raises:
        AuditError: a saved scan with other settings, and no ``force``.
    """
    saved = read(out)
    if saved is None or force:
        if saved is not None and saved["settings"] != new:
            return f"replacing the saved scan ({saved['settings'].describe()}) as --force asks"
        return None
    old = saved["settings"]
    if old == new:
        return None
    if not old.intervene and new.intervene and old == ScanSettings(**{**asdict(new), "intervene": False}):
        return f"replacing the attention-only scan in {out}/summary with one confirmed by causal tests"
    raise AuditError(
        f"{out}/summary holds a scan made with {old.describe()}; this one ({new.describe()}) would replace "
        f"it: add --force to replace it (or scan a copy of OUT)")


def write(out, settings: ScanSettings, seconds: float, budget: float | None = None) -> None:
    """Record how the tables now in ``summary/`` were made.

    ``budget`` (``--causal-budget``) is recorded but never refuses a rescan: a larger budget is how a user
    settles the groups the last scan left untested or undecided.
    """
    from importlib import metadata

    try:
        version = metadata.version("shortcut-audit")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = None
    command = f"audit scan OUT {settings.options()}"
    if budget is not None and settings.intervene:
        command += f" --causal-budget {budget:g}"
    record = {"settings": asdict(settings), "causal_budget": budget, "command": command,
              "made": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seconds": round(seconds, 1),
              "version": version, "tables": ["classes", "clusters", "interventions"]}
    p = _path(out)
    if not fs.is_uri(str(out)):
        p.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_bytes(p, (json.dumps(record, indent=1) + "\n").encode())


def saved_settings(out) -> ScanSettings | None:
    """The settings of the scan saved in ``out`` (for a rescan that keeps them), or None."""
    saved = read(out)
    return None if saved is None else saved["settings"]


def saved_budget(out) -> float | None:
    """The ``--causal-budget`` of the scan saved in ``out``, or None (not recorded)."""
    saved = read(out)
    value = None if saved is None else saved.get("causal_budget")
    return float(value) if isinstance(value, int | float) else None


def report_line(out) -> str:
    """What the report says about the verdicts it shows: how and when that scan was made."""
    saved = read(out)
    if saved is None:
        return "How the scan in summary/ was made is not recorded (it predates summary/scan.json)."
    s = saved["settings"]
    tail = "" if s.intervene else " The verdicts rest on the heatmaps alone: run `audit scan OUT` to confirm them."
    budget = saved.get("causal_budget")
    spent = f", causal budget {budget:g} forward passes per image" if s.intervene and budget is not None else ""
    return f"Verdicts from `audit scan` on {s.describe()}{spent}, {saved.get('made', '')}.{tail}"
