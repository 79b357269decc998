"""The colour transplant: do a class's colours alone carry it into other classes' images?

A tint, a cast or a colour grading that a class's images share (object
included) survives every place test, and a rotation of the colour channels
moves it only as far as it moves any colour.  This test asks the other way
round, like the place transplants: each image the model gives to another
class (a recipient) gets the colours of one image of the class, each channel's
mean and spread (Reinhard et al. 2001's transfer, in RGB), shapes and texture
kept.  The control gives the same recipients each other's colours (recipient
``j`` those of ``j + 1``): a colour change of the same kind that carries no
class's colours, so a class the model says whenever colours look unusual (a
default class) does not pass for a colour cue.  The rate is the share turned
into the class beyond the control; it is judged against the other classes'
own colour transplants (the largest, at its interval's end least favourable
to a flag) with ``colour_transplant_min`` and ``colour_transplant_specific``.  Where the class's
colours turn none of the recipients the control is not run: the rate is 0 whatever it shows.
"""

from __future__ import annotations

import numpy as np

from audit.scan.config import Config
from audit.scan.probes.base import Family, PlaceFlip, Probe, Sample, Trial, Where
from audit.scan.probes.edits import colour_transfer
from audit.scan.probes.transplant import Transplant, beyond_control


def colour_transplant(predict_fn, images: np.ndarray, recipients, target: int, chunk: int) -> Transplant | None:
    """Give each recipient the colours of sample image ``j % len(images)``; the control gives it those of
    recipient ``j + 1``.

    Args:
        predict_fn: uint8 images -> predictions.
        images: the class's sample (N, H, W, C) uint8.
        recipients: :class:`audit.scan.probes.transplant.Recipients` of other classes, or None.
        target: the class id.
        chunk: images per ``predict_fn`` call.

    Returns:
        A :class:`Transplant` (the rate beyond the control), or None without recipients.
    """
    if recipients is None or not len(images) or len(recipients.images) < 2:
        return None
    rec = np.asarray(recipients.images)
    donors = np.stack([images[j % len(images)] for j in range(len(rec))])
    return beyond_control(predict_fn, recipients.base, colour_transfer(rec, donors),
                          lambda: colour_transfer(rec, np.roll(rec, -1, axis=0)), target, chunk)


class ColourTransplant(Probe):
    """The class's colours given to other classes' images (:func:`colour_transplant`); judged as an edit that
    keeps every shape, against the other classes' own colour transplants."""

    name = "colour-transplant"
    family = Family.TRANSPLANT
    where = Where.IMAGE
    place = "image:colour-transplant"
    kind = "colour-levels"  # what takes such a cue away from an image: grey-world colours and typical levels
    cue = "colour"
    is_transform = True
    keeps_identity = True
    whole_image = True
    grows = False  # its rate is on the recipients: more images of the class do not change it
    edits_others = True  # the recipients lose their own colours: a frame's or a tint's, another class's cue
    removed_by = "colour"  # the whole image's grey-world colours and typical levels take such a cue away
    more_recipients = True

    def transplant_into(self, predict_fn, s: Sample, recipients, chunk: int) -> Transplant | None:
        if recipients is None or s.target is None:
            return None
        return colour_transplant(predict_fn, s.images, recipients, int(s.target), chunk)

    def follow_up(self, predict_fn, trials: list, s: Sample, cfg: Config, chunk: int) -> list[Trial]:
        tr = self.transplant_into(predict_fn, s, s.recipients, chunk)
        if tr is None:
            return []
        return [Trial(self, self.place, None, "colour-transfer", np.zeros(s.n, bool), transplant=tr,
                      area=1.0, where=self.where)]

    def result(self, t: Trial, s: Sample, cfg: Config) -> PlaceFlip:
        tr = t.transplant
        k = int(round(tr.rate * tr.n))
        return PlaceFlip(self.family.value, t.place, None, t.fill, tr.n, k / tr.n, t.area, k / tr.n, tr.n,
                         probe=self.name, where=t.where, k=k, to_class=int(s.target))

    def rule(self, cfg: Config) -> Config:
        return cfg.replace(cue_flip_min=cfg.colour_transplant_min, cue_specific_min=cfg.colour_transplant_specific)

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        return []

    def words(self, t) -> str:
        return ("giving its colours (each channel's mean and spread; shapes kept) to images of other classes, "
                "beyond giving them each other's,")
