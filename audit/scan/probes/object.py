"""Object removal: does the prediction change when the object goes?

With masks the object (its mask dilated by a few pixels, so that no
silhouette is left) is inpainted away (OpenCV's Telea inpainting); without
masks each image's own heatmap hot area is (place ``own hot area``), which
tells a model that decides by that area.
"""

from __future__ import annotations

import numpy as np

from audit.scan.config import Config
from audit.scan.probes.base import Family, Probe, Sample, Trial, Where
from audit.scan.probes.edits import remove_objects

OWN_HOT_AREA = "own hot area"  # the place of the object test without masks (a value of the ``place`` column)


class _Removal(Probe):
    family = Family.OBJECT
    removes_object = True
    follows_others = True  # worth its images only while a background test or a transform goes on

    def planned(self, masked: bool, n_places: int) -> int:
        return 1


class ObjectRemoval(_Removal):
    """The masked object inpainted away."""

    name = "object"
    where = Where.OBJECT

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        if s.masks is None:
            return []
        return [Trial(self, "object", None, "inpaint", s.has_object, where=self.where)]

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        return remove_objects(s.images[rows], s.masks[rows])

    def planned(self, masked: bool, n_places: int) -> int:
        return 1 if masked else 0

    def area(self, t: Trial, s: Sample) -> float:
        return float(s.masks[t.sel].mean()) if t.sel.any() else t.area

    def words(self, t) -> str:
        return "removing the object (inpainted)"


class HotAreaRemoval(_Removal):
    """Without masks: each image's spared area (its own heatmap's hot area, grown) inpainted away."""

    name = "own-hot-area"
    where = Where.HOT

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        if s.masks is not None or s.spare is None:
            return []
        sel = s.spare.reshape(s.n, -1).any(axis=1)
        return [Trial(self, OWN_HOT_AREA, None, "inpaint", sel, s.spare, float(s.spare.mean()), self.where)]

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        return remove_objects(s.images[rows], t.mask[rows], dilate=0)  # the spared area is grown already

    def planned(self, masked: bool, n_places: int) -> int:
        return 0 if masked else 1

    def words(self, t) -> str:
        return "removing each image's own hot area (inpainted)"
