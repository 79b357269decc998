"""Score scans of drawn cases: precision and recall of flagged classes, with 95% Wilson intervals.

Per case, every class is one of:

* **planted**: its cue was learned (:mod:`audit.zoo.learned`): the scan must flag it (a flag is a
  true positive, its absence a miss);
* **partial**: its cue was learned only partly: left out of the score either way;
* **healthy**: no cue, or a cue the model ignored: a flag is a false flag.

A case with no planted and no partial class is a *negative control*: any flag there is a false flag on
a control. Intervals are the scan's own Wilson intervals (:func:`audit.scan.interval.wilson`). Per cue family, the planted classes of that family give its recall and the flags on classes
of that family its precision (false flags on classes without a cue count under ``none``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from audit.scan.interval import wilson


@dataclass
class Rate:
    """``k`` of ``n`` with its Wilson interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def text(self) -> str:
        if not self.n:
            return "- (0)"
        lo, hi = self.interval
        return f"{self.value:.2f} ({self.k}/{self.n}, {lo:.2f}-{hi:.2f})"


@dataclass
class CaseOutcome:
    """What one drawn case should have given and what the scan flagged.

    families: class name -> cue family (``none`` for a class without a cue).
    """

    name: str
    planted: list[str]
    partial: list[str]
    healthy: list[str]
    flagged: list[str]
    families: dict[str, str] = field(default_factory=dict)
    also: CaseOutcome | None = None  # the same scan scored another way (bench/draws.py --objects-learned)

    @property
    def control(self) -> bool:
        return not self.planted and not self.partial

    @property
    def missed(self) -> list[str]:
        return [c for c in self.planted if c not in self.flagged]

    @property
    def false_flags(self) -> list[str]:
        return [c for c in self.flagged if c in self.healthy]

    @property
    def hits(self) -> list[str]:
        return [c for c in self.flagged if c in self.planted]


@dataclass
class Tally:
    """Totals over cases."""

    recall: Rate
    precision: Rate
    controls: int  # negative-control cases
    controls_flagged: int  # of them, cases with at least one flag
    by_family: dict[str, tuple[Rate, Rate]]  # family -> (recall, precision)
    ignored: dict[str, int] = field(default_factory=dict)  # family -> cues the models ignored (healthy classes)


def tally(outcomes: list[CaseOutcome]) -> Tally:
    """Precision and recall of flagged classes over ``outcomes``, overall and per cue family."""
    hits = sum(len(o.hits) for o in outcomes)
    planted = sum(len(o.planted) for o in outcomes)
    false = sum(len(o.false_flags) for o in outcomes)
    fam: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # hits, planted, false flags
    for o in outcomes:
        for c in o.planted:
            fam[o.families.get(c, "none")][1] += 1
        for c in o.hits:
            fam[o.families.get(c, "none")][0] += 1
        for c in o.false_flags:
            fam[o.families.get(c, "none")][2] += 1
    by_family = {f: (Rate(h, p), Rate(h, h + x)) for f, (h, p, x) in sorted(fam.items())}
    controls = [o for o in outcomes if o.control]
    ignored: dict[str, int] = defaultdict(int)
    for o in outcomes:
        for c in o.healthy:
            if o.families.get(c, "none") != "none":
                ignored[o.families[c]] += 1
    return Tally(Rate(hits, planted), Rate(hits, hits + false), len(controls),
                 sum(bool(o.flagged) for o in controls), by_family, dict(sorted(ignored.items())))


def format_tally(t: Tally) -> str:
    """The Markdown table of a :class:`Tally`."""
    lines = ["| cue family | recall (found/planted, 95% CI) | precision (right/flagged, 95% CI) |",
             "| --- | --- | --- |"]
    for f, (r, p) in t.by_family.items():
        lines.append(f"| {f} | {r.text()} | {p.text()} |")
    lines.append(f"| **all** | **{t.recall.text()}** | **{t.precision.text()}** |")
    lines.append("")
    lines.append(f"negative controls (no cue learned): {t.controls} case(s), {t.controls_flagged} with a false flag")
    if t.ignored:
        lines.append("cues the models ignored (their classes count as healthy): "
                     + ", ".join(f"{f} {n}" for f, n in t.ignored.items()))
    return "\n".join(lines)
