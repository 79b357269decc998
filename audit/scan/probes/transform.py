"""Transforms: edits that keep the object's identity and change an attribute a shape-based model
should ignore, on the background alone (the object spared: its dilated mask, or without masks the
image's own heatmap hot area) or on the whole image.

* ``background:texture``: the background blurred finely (a texture of stripes or grain goes, shapes
  and colours stay);
* ``background:flat``: the background one flat grey (a control: it says whether the class's own
  background matters; never a cue by itself);
* ``image:colour``: the whole image recoloured grey-world at the dataset's typical brightness and
  contrast (a colour cast goes, shapes and texture stay).
"""

from __future__ import annotations

import numpy as np

from audit.scan.config import Config
from audit.scan.probes.base import Family, Probe, Sample, Trial, Where
from audit.scan.probes.edits import transform


class Transform(Probe):
    """An attribute edit of the pixels ``edited(spare)``; subclasses set the place, the kind and the words."""

    family = Family.TRANSFORM
    is_transform = True
    place = ""
    kind = ""  # the edit of :func:`audit.scan.probes.edits.transform`
    verb = ""
    fill_text = ""

    def edited(self, spare: np.ndarray) -> np.ndarray:
        return ~spare

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        if s.spare is None:
            return []
        m = self.edited(s.spare)
        return [Trial(self, self.place, None, self.kind, m.reshape(s.n, -1).any(axis=1), m, float(m.mean()),
                      self.where)]

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        return transform(s.images[rows], t.mask[rows], self.kind, s.levels, s.cfg.texture_sigma)

    def planned(self, masked: bool, n_places: int) -> int:
        return 1

    def words(self, t) -> str:
        return f"{self.verb} ({self.fill_text})"


class BackgroundTexture(Transform):
    name = "texture"
    place = "background:texture"
    kind = "fine-blur"
    where = Where.BACKGROUND
    background_only = True
    verb = "blurring the background"
    fill_text = "a fine blur, the object spared"
    cue = "background texture"


class FlatBackground(Transform):
    name = "flat"
    place = "background:flat"
    kind = "flat-grey"
    where = Where.BACKGROUND
    background_only = True
    control = True
    verb = "making the background flat grey"
    fill_text = "the object spared"
    cue = "background"


class ImageColour(Transform):
    name = "colour"
    place = "image:colour"
    kind = "colour-levels"
    where = Where.IMAGE
    whole_image = True
    verb = "recolouring the image"
    fill_text = "grey-world colours at the dataset's brightness and contrast"
    cue = "colour cast"

    def edited(self, spare: np.ndarray) -> np.ndarray:
        return np.ones_like(spare)
