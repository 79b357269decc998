"""Background replacement (with masks): the object is kept and everything else is replaced by a
neutral colour, and separately by the background of an image of another class (its own object
inpainted away)."""

from __future__ import annotations

import numpy as np

from audit.scan.config import Config
from audit.scan.probes.base import Family, PlaceFlip, Probe, Sample, Trial, Where
from audit.scan.probes.edits import replace_background


class _Replace(Probe):
    family = Family.BACKGROUND
    where = Where.BACKGROUND
    replaces_background = True
    fill = ""
    fill_text = ""

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        if s.masks is None or not self.applies(s):
            return []
        return [Trial(self, "background", None, self.fill, s.has_object, where=self.where)]

    def applies(self, s: Sample) -> bool:
        return True

    def go_on(self, t: Trial, trials: list, cfg: Config) -> bool:
        """Only while the object test could still come out low (the background rule needs both): not when
        removing the object already flipped clearly more than ``object_screen_max`` (its interval's lower end)."""
        obj = next((x for x in trials if x.probe.removes_object), None)
        return not (obj is not None and obj.clearly_above(cfg.object_screen_max)) and t.promising(cfg)

    def planned(self, masked: bool, n_places: int) -> int:
        return 1 if masked else 0

    def area(self, t: Trial, s: Sample) -> float:
        return float(1 - s.masks[t.sel].mean()) if t.sel.any() else t.area

    def words(self, t) -> str:
        return f"replacing the background by {self.fill_text}"


class NeutralBackground(_Replace):
    """Everything but the object one neutral colour (the image's own background mean)."""

    name = "background-neutral"
    fill = "neutral"
    fill_text = "a neutral colour"

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        return replace_background(s.images[rows], s.masks[rows], None)[0]


class OtherBackground(_Replace):
    """Everything but the object from another class's image, its object inpainted away; the rate is
    the median over the donor classes, so that one other class's own shortcut does not pass for this
    class's."""

    name = "background-swap"
    fill = "other-background"
    fill_text = "another class's background"

    def applies(self, s: Sample) -> bool:
        return s.backgrounds is not None and len(s.backgrounds) > 0

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        bg = np.asarray(s.backgrounds)[np.nonzero(t.sel)[0].searchsorted(rows) % len(s.backgrounds)]
        return replace_background(s.images[rows], s.masks[rows], bg)[0]

    def result(self, t: Trial, s: Sample, cfg: Config) -> PlaceFlip:
        from dataclasses import replace

        row = super().result(t, s, cfg)
        if row.n and s.background_classes is not None:
            idx = np.array(sorted(t.flips), int)
            f = np.array([t.flips[i] for i in idx], bool)
            rate = median_by_donor(f, idx, np.asarray(s.background_classes), len(s.backgrounds))
            row = replace(row, flip_rate=rate, k=int(round(rate * row.n)))
        return row


def median_by_donor(flips: np.ndarray, rows: np.ndarray, donor_class: np.ndarray, k: int) -> float:
    """Median over donor classes of the flip rate with that class's backgrounds.

    The j-th tested image (``rows`` in order) got background ``j % k``.
    """
    got = donor_class[np.arange(len(rows)) % k]
    return float(np.median([flips[got == c].mean() for c in np.unique(got)]))
