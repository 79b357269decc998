"""Transplant tests: does a place whose occlusion flips a class also carry that class's evidence?

Occluding a place can change a prediction for two reasons: the place held the
class's cue (a watermark, a frame), or the fill *added* something (a band of
the image's mean colour that extends a large object's silhouette, a patch that
looks like another class's stamp).  The transplant tells them apart: the
place's pixels, taken from the class's images whose prediction the occlusion
flipped, are pasted into images the model gives to *other* classes.  A real
cue carries the class with it and turns some of them into the class; a place
that only mattered by what its fill brought turns none.

The control: the same place occluded (same fill) in the same recipients; only
the turns beyond the control count, so a default class (the one the model
says when a patch hides another class's evidence) does not pass for a cue.

Without masks the same is done with a class's whole **background**
(:func:`transplant_background`): everything outside each image's own hot
area (its object, as far as the heatmap tells) is pasted around the
recipients' own hot areas.  A class decided by its background texture turns
the other classes' images into itself; a healthy class, whose background is
like anyone's, turns none.  This is the sufficiency test the object and
background tests give with masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRANSPLANT_FROM = 0.4  # a place is transplanted when its occlusion flipped at least this share of the sample
MAX_TRANSPLANT = 3  # at most this many places per sample (the most flipping, the smallest first)
RECIPIENTS = 16  # images of other classes that receive each place
MIN_RECIPIENTS = 8  # fewer: the transplant is not run (rate unknown)
BACKGROUND_OBJECT_MAX = 0.5  # the background transplant runs only while removing the hot area flips at most this


@dataclass(frozen=True)
class Recipients:
    """Images the model gives to various classes, and what it gives them.

    images: (K, H, W, C) uint8 at the model input size.
    base: (K,) predicted class ids, or (K, C) bool (multi-label).
    keep: (K, H, W) bool, pixels never pasted over by a place (each image's object mask, grown), or None
        (without masks: a place is pasted whole; the control, the same place occluded, accounts for what it
        covers).
    hot: (K, H, W) bool, each image's own heatmap's hot area (without masks), kept by the background
        transplant; None with masks.
    """

    images: np.ndarray
    base: np.ndarray
    keep: np.ndarray | None = None
    hot: np.ndarray | None = None

    def for_class(self, target: int, k: int = RECIPIENTS) -> Recipients | None:
        """The first ``k`` images not predicted as ``target`` (None when fewer than :data:`MIN_RECIPIENTS`)."""
        base = np.asarray(self.base)
        other = base != target if base.ndim == 1 else ~base[:, int(target)].astype(bool)
        rows = np.nonzero(other)[0][:k]
        if len(rows) < MIN_RECIPIENTS:
            return None
        return Recipients(self.images[rows], base[rows], None if self.keep is None else self.keep[rows],
                          None if self.hot is None else self.hot[rows])

    def spots(self, masks: np.ndarray, avoid: np.ndarray | None = None) -> np.ndarray:
        """(K, H, W) each recipient's pixels to paste: ``masks`` (N, H, W) taken in turn, less ``avoid``
        (default: the kept pixels)."""
        avoid = self.keep if avoid is None else avoid
        out = np.stack([masks[j % len(masks)] for j in range(len(self.images))])
        return out if avoid is None else out & ~avoid


@dataclass(frozen=True)
class Transplant:
    """A transplant's result: the share of recipients turned into the class beyond the control, of ``n``."""

    rate: float
    n: int
    pasted: float = math.nan  # share turned by the pasted place
    control: float = math.nan  # share turned by the same place occluded
    occluded: float = math.nan  # share whose prediction the same place occluded changed at all


def turned_into(base, new, target: int) -> np.ndarray:
    """(K,) bool: the prediction became ``target`` (multi-label: its label switched on)."""
    base, new = np.asarray(base), np.asarray(new)
    if base.ndim == 1:
        return (new == target) & (base != target)
    t = int(target)
    return new[:, t].astype(bool) & ~base[:, t].astype(bool)


def paste(images: np.ndarray, donors: np.ndarray, spots: np.ndarray) -> np.ndarray:
    """Copies of ``images`` whose ``spots[j]`` pixels come from donor ``j % len(donors)`` (in turn)."""
    out = images.copy()
    for j in range(len(out)):
        out[j][spots[j]] = donors[j % len(donors)][spots[j]]
    return out


def candidates(tests: list) -> list:
    """The place tests worth a transplant: flipped at least :data:`TRANSPLANT_FROM` of a tested sample."""
    from audit.scan.intervene import MIN_SAMPLE

    found = [t for t in tests if t.test == "region" and len(t.flips) >= MIN_SAMPLE
             and t.rate() >= TRANSPLANT_FROM]
    found.sort(key=lambda t: (-t.rate(), t.area))
    return found[:MAX_TRANSPLANT]


def transplant_places(predict_fn, images: np.ndarray, tests: list, recipients: Recipients | None,
                      target: int, chunk: int) -> dict:
    """Transplant each candidate place of one sample into the recipients.

    Args:
        predict_fn: uint8 images -> predictions, as for the other tests.
        images: the sample (N, H, W, C).
        tests: the sample's running tests (``_Test`` of :mod:`audit.scan.intervene`), screened and run.
        recipients: images of other classes (:meth:`Recipients.for_class`), or None.
        target: the class id of the sample.
        chunk: images per ``predict_fn`` call.

    Returns:
        {id(test): :class:`Transplant`} for the candidate places that had donors.
    """
    from audit.scan.intervene import flipped, occlude, predict_chunks

    if recipients is None:
        return {}
    jobs = []
    for t in candidates(tests):
        rows = np.array(sorted(i for i, f in t.flips.items() if f), int)
        if not len(rows):
            continue
        spots = recipients.spots(t.mask[rows])
        jobs.append((t, paste(recipients.images, images[rows], spots), occlude(recipients.images, spots, t.fill)))
    if not jobs:
        return {}
    preds = predict_chunks(predict_fn, [v for _, a, b in jobs for v in (a, b)], chunk)
    out = {}
    for j, (t, _, _) in enumerate(jobs):
        pasted = float(turned_into(recipients.base, preds[2 * j], target).mean())
        control = float(turned_into(recipients.base, preds[2 * j + 1], target).mean())
        changed = float(flipped(recipients.base, preds[2 * j + 1], np.full(len(preds[2 * j + 1]), target)).mean())
        out[id(t)] = Transplant(max(0.0, pasted - control), len(recipients.images), pasted, control, changed)
    return out


def transplant_background(predict_fn, images: np.ndarray, spare: np.ndarray, recipients: Recipients | None,
                          target: int, chunk: int) -> Transplant | None:
    """Paste each sample image's background (outside its ``spare`` area) around the recipients' own
    hot areas (``recipients.hot``); the control makes the same pixels one flat grey.

    Args:
        predict_fn: uint8 images -> predictions.
        images: the sample (N, H, W, C).
        spare: (N, H, W) bool, each sample image's object as far as its heatmap tells.
        recipients: images of other classes with their own hot areas (``hot``), or None.
        target: the sample's class id.
        chunk: images per ``predict_fn`` call.

    Returns:
        A :class:`Transplant`, or None without recipients or their kept areas.
    """
    from audit.scan.intervene import predict_chunks, transform

    if recipients is None or recipients.hot is None or not len(images):
        return None
    where = recipients.spots(~np.asarray(spare, bool), avoid=recipients.hot)
    pasted = paste(recipients.images, images, where)
    flat = transform(recipients.images, where, "flat-grey")
    got, ctl = predict_chunks(predict_fn, [pasted, flat], chunk)
    p = float(turned_into(recipients.base, got, target).mean())
    c = float(turned_into(recipients.base, ctl, target).mean())
    return Transplant(max(0.0, p - c), len(recipients.images), p, c)
