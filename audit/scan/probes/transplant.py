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
(:class:`BackgroundTransplant`): everything outside each image's own hot
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

from audit.scan.config import DEFAULT, Config
from audit.scan.probes.base import Family, PlaceFlip, Probe, Sample, Trial, Where, flipped, predict_chunks
from audit.scan.probes.edits import occlude, paste, transform


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

    def for_class(self, target: int, cfg: Config = DEFAULT) -> Recipients | None:
        """The first ``cfg.recipients`` images not predicted as ``target`` (None when fewer than
        ``cfg.min_recipients``)."""
        base = np.asarray(self.base)
        other = base != target if base.ndim == 1 else ~base[:, int(target)].astype(bool)
        rows = np.nonzero(other)[0][:cfg.recipients]
        if len(rows) < cfg.min_recipients:
            return None
        return self._take(rows)

    def join(self, more: Recipients) -> Recipients:
        """These recipients, then ``more``."""
        def cat(a, b):
            return None if a is None or b is None else np.concatenate([a, b])

        return Recipients(np.concatenate([self.images, more.images]),
                          np.concatenate([np.asarray(self.base), np.asarray(more.base)]),
                          cat(self.keep, more.keep), cat(self.hot, more.hot))

    def rows(self, start: int, stop: int | None = None) -> Recipients:
        """The recipients ``start:stop`` (sequential testing takes the next ones)."""
        return self._take(slice(start, stop))

    def _take(self, idx) -> Recipients:
        return Recipients(self.images[idx], np.asarray(self.base)[idx], None if self.keep is None else self.keep[idx],
                          None if self.hot is None else self.hot[idx])

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


def beyond_control(predict_fn, base, edited: np.ndarray, control, target: int, chunk: int) -> Transplant:
    """The share of recipients (their predictions ``base``) that ``edited`` turns into ``target``, less the
    share its control turns (``control()``: the control images, made and predicted only where some turned;
    none turned: the rate is 0 whatever the control would turn)."""
    got, = predict_chunks(predict_fn, [edited], chunk)
    p = float(turned_into(base, got, target).mean())
    if p == 0.0:
        return Transplant(0.0, len(edited), p, math.nan)
    ctl, = predict_chunks(predict_fn, [control()], chunk)
    c = float(turned_into(base, ctl, target).mean())
    return Transplant(max(0.0, p - c), len(edited), p, c)


def candidates(trials: list, cfg: Config) -> list:
    """The place trials worth a transplant: flipped at least ``cfg.transplant_from`` of a tested sample."""
    found = [t for t in trials if len(t.flips) >= cfg.min_rate_n and t.rate() >= cfg.transplant_from]
    found.sort(key=lambda t: (-t.rate(), t.area))
    return found[:cfg.max_transplant]


def transplant_places(predict_fn, trials: list, s: Sample, cfg: Config, chunk: int) -> dict:
    """Transplant each candidate place of one sample into its recipients.

    Args:
        predict_fn: uint8 images -> predictions, as for the other tests.
        trials: the sample's place trials, screened and run.
        s: the sample (``recipients`` and ``target``; nothing is done without them).
        cfg: ``transplant_from``, ``max_transplant``, ``min_rate_n``.
        chunk: images per ``predict_fn`` call.

    Returns:
        {id(trial): :class:`Transplant`} for the candidate places that had donors.
    """
    rec = s.recipients
    if rec is None or s.target is None:
        return {}
    jobs = []
    for t in candidates(trials, cfg):
        rows = np.array(sorted(i for i, f in t.flips.items() if f), int)
        if not len(rows):
            continue
        spots = rec.spots(t.mask[rows])
        jobs.append((t, paste(rec.images, s.images[rows], spots), occlude(rec.images, spots, t.fill)))
    if not jobs:
        return {}
    preds = predict_chunks(predict_fn, [v for _, a, b in jobs for v in (a, b)], chunk)
    out = {}
    target = int(s.target)
    for j, (t, _, _) in enumerate(jobs):
        pasted = float(turned_into(rec.base, preds[2 * j], target).mean())
        control = float(turned_into(rec.base, preds[2 * j + 1], target).mean())
        changed = float(flipped(rec.base, preds[2 * j + 1], np.full(len(preds[2 * j + 1]), target)).mean())
        out[id(t)] = Transplant(max(0.0, pasted - control), len(rec.images), pasted, control, changed)
    return out


def transplant_background(predict_fn, images: np.ndarray, spare: np.ndarray, recipients: Recipients | None,
                          target: int, chunk: int) -> Transplant | None:
    """Paste each sample image's background (outside its ``spare`` area) around the recipients' objects
    (``recipients.keep``, with masks) or own hot areas (``recipients.hot``, without); the control makes
    the same pixels one flat grey (not run where the pasted backgrounds turned none).

    Args:
        predict_fn: uint8 images -> predictions.
        images: the sample (N, H, W, C).
        spare: (N, H, W) bool, each sample image's object (its mask grown, or as far as its heatmap tells).
        recipients: images of other classes with their objects or hot areas, or None.
        target: the sample's class id.
        chunk: images per ``predict_fn`` call.

    Returns:
        A :class:`Transplant`, or None without recipients or their kept areas.
    """
    kept = None if recipients is None else recipients.hot if recipients.hot is not None else recipients.keep
    if kept is None or not len(images):
        return None
    where = recipients.spots(~np.asarray(spare, bool), avoid=kept)
    return beyond_control(predict_fn, recipients.base, paste(recipients.images, images, where),
                          lambda: transform(recipients.images, where, "flat-grey"), target, chunk)


class BackgroundTransplant(Probe):
    """The class's backgrounds pasted around other classes' objects (with masks) or own hot areas (without).

    Without masks it runs unless removing the hot area flipped clearly more than
    ``cfg.background_object_max`` (its interval's lower end); with masks only where the background
    verdict may hold (each background replacement flipped at least ``background_flip_min`` of the
    class, removing the object not clearly more than ``object_flip_max``), as the test
    that tells a background that carries the class from a class the model says when nothing else is
    there (an empty background around another class's object keeps that object's class).
    """

    name = "background-transplant"
    family = Family.TRANSPLANT
    where = Where.BACKGROUND
    sufficiency = True
    grows = False  # its rate is on the recipients: more images of the class do not change it
    more_recipients = True

    def transplant_into(self, predict_fn, s: Sample, recipients, chunk: int) -> Transplant | None:
        if s.spare is None or s.target is None:
            return None
        return transplant_background(predict_fn, s.images, s.spare, recipients, int(s.target), chunk)

    def due(self, trials: list, s: Sample, cfg: Config) -> bool:
        """Is the transplant worth its forward passes on this sample (see the class)?"""
        obj = next((t for t in trials if t.probe.removes_object), None)
        if s.recipients is None or obj is None or len(obj.flips) < cfg.min_rate_n:
            return False
        if s.masks is None:
            return not obj.clearly_above(cfg.background_object_max)
        bgs = [t for t in trials if t.probe.replaces_background and len(t.flips) >= cfg.min_rate_n]
        return bool(bgs) and min(t.rate() for t in bgs) >= cfg.background_flip_min \
            and not obj.clearly_above(cfg.object_flip_max)  # else the background verdict cannot hold

    def follow_up(self, predict_fn, trials: list, s: Sample, cfg: Config, chunk: int) -> list[Trial]:
        if not self.due(trials, s, cfg):
            return []
        tr = self.transplant_into(predict_fn, s, s.recipients, chunk)
        if tr is None:
            return []
        return [Trial(self, "background", None, "pasted", np.zeros(s.n, bool), transplant=tr, where=self.where)]

    def result(self, t: Trial, s: Sample, cfg: Config) -> PlaceFlip:
        tr = t.transplant
        return PlaceFlip(self.family.value, t.place, None, t.fill, tr.n, tr.rate, t.area, tr.rate, tr.n,
                         probe=self.name, where=t.where, k=int(round(tr.rate * tr.n)))

    def words(self, t) -> str:
        return f"its backgrounds pasted around the objects or hot areas of {t.n} images of other classes"
