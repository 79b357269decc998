"""Edits that keep the object's identity: does the class hang on an attribute a shape-based model ignores?

Each probe changes one attribute (:func:`audit.scan.probes.edits.attribute`) of the object alone (its
dilated mask), of the background alone (both only with masks: a heatmap's hot area is no outline of the
object), or of the whole image, and keeps every shape.  A class whose predictions flip under such an edit far more than
the other classes' do (:func:`audit.scan.verdict.causal_cue`: at least ``identity_flip_min`` of the class
and ``identity_specific_min`` more than the other class it flips most (the placebo:
:func:`audit.scan.verdict.placebo_rates`), each at its interval's end least favourable to a flag)
depends on that attribute: the cue is named after it
(``colour of the object``, ``background colour``, ``colour``, ``texture of the object``, ``background
texture``, ``position``).  The attributes: colour (greyscale, a rotation of the colour channels), texture
(a smoothing inside the object's own mask or inside the background; a blur of the whole image, even of 2 px
at 64, flipped every healthy class of the zoo's clean model but one, so there is none without masks) and
position (the whole image shifted by a sixteenth of its side).  An edit that every class survives, or that
every class fails alike, is no cue.  Unlike the background transforms these count whatever removing the
object does: a colour carried by the object goes with the object.
"""

from __future__ import annotations

import numpy as np

from audit.scan.config import Config
from audit.scan.probes.base import Family, Probe, Sample, Trial, Where
from audit.scan.probes.edits import attribute


class IdentityEdit(Probe):
    """One attribute edit on one part of the image; subclasses set ``kind``, ``part`` and the words."""

    family = Family.TRANSFORM
    is_transform = True
    keeps_identity = True
    kind = ""  # the attribute edit
    part = "image"  # object | background | image
    attribute_words = ""  # "colour", "contrast"...
    verb = ""
    needs_colour = False  # no-op on one-channel images

    @property
    def place(self) -> str:
        return f"{self.part}:{self.name.split('-')[-1]}"

    @property
    def where(self) -> Where:
        return {"object": Where.OBJECT, "background": Where.BACKGROUND, "image": Where.IMAGE}[self.part]

    @property
    def whole_image(self) -> bool:
        return self.part == "image"

    @property
    def cue(self) -> str:
        return {"object": f"{self.attribute_words} of the object", "background": f"background {self.attribute_words}",
                "image": self.attribute_words}[self.part]

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        if self.needs_colour and s.images.shape[-1] < 3:
            return []
        if self.part != "image" and (s.spare is None or s.masks is None):
            return []  # the object's own pixels need its mask: a heatmap's hot area is no object outline
        m = np.ones((s.n, *s.images.shape[1:3]), bool) if self.part == "image" else \
            (self.object_pixels(s) if self.part == "object" else ~s.spare)
        return [Trial(self, self.place, None, self.kind, m.reshape(s.n, -1).any(axis=1), m, float(m.mean()),
                      self.where)]

    def object_pixels(self, s: Sample) -> np.ndarray:
        """The object's pixels this edit changes: its mask grown (:func:`audit.scan.probes.edits.spare_masks`),
        so that an anti-aliased outline changes with it."""
        return s.spare

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        return attribute(s.images[rows], t.mask[rows], self.kind, s.cfg.texture_sigma, s.cfg.identity_shift)

    def planned(self, masked: bool, n_places: int) -> int:
        return 1

    def words(self, t) -> str:
        what = {"object": "the object's", "background": "the background's", "image": "the image's"}[self.part]
        return f"{self.verb.format(what=what)} (shapes kept)"


class TextureEdit(IdentityEdit):
    """A smoothing taken inside the object's own mask (not grown: the ring of background a grown mask holds
    would blend into the object's colour), or inside the background."""

    def object_pixels(self, s: Sample) -> np.ndarray:
        return s.masks


def _edit(name: str, kind: str, part: str, attribute_words: str, verb: str, needs_colour: bool = False) -> IdentityEdit:
    base = TextureEdit if kind == "smooth" else IdentityEdit
    cls = type(f"IdentityEdit_{name}", (base,), {
        "name": name, "kind": kind, "part": part, "attribute_words": attribute_words, "verb": verb,
        "needs_colour": needs_colour, "__doc__": f"{verb.format(what='the ' + part + chr(39) + 's')}."})
    return cls()


def identity_probes() -> list[IdentityEdit]:
    """The identity-keeping probes of the registry, in order."""
    return [
        _edit("object-greyscale", "greyscale", "object", "colour", "turning {what} colours grey", True),
        _edit("background-greyscale", "greyscale", "background", "colour", "turning {what} colours grey", True),
        _edit("image-greyscale", "greyscale", "image", "colour", "turning {what} colours grey", True),
        _edit("object-hue", "permute", "object", "colour", "rotating {what} colour channels", True),
        _edit("image-hue", "permute", "image", "colour", "rotating {what} colour channels", True),
        _edit("object-smooth", "smooth", "object", "texture", "smoothing {what} texture"),
        _edit("background-smooth", "smooth", "background", "texture", "smoothing {what} texture"),
        _edit("image-shift", "shift", "image", "position", "shifting {what} content by a sixteenth of its side"),
    ]
