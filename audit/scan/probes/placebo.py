"""Placebo occlusions: a box of the same size as a place, filled the same way, at random places.

A place that flips a class may flip it because it holds the class's cue, or because occluding any
area that large on these images changes the answer (a wide edge cutting into large objects, a
class whose objects fill the image).  The other classes' rates of the same place do not tell the two
apart when this class's objects differ from theirs; the placebo measures it on the class's own images:
each image gets the place's box (a border band: a square of as many pixels) at a random position
that does not overlap the place (or overlaps it least), with the same fill (and the object spared,
with masks).  Its flip rate, with its 95% interval, is a threshold
measured per dataset and per class: a place is a cue only when its own rate clears the placebo's
(:func:`audit.scan.verdict.place_flip_score`).  It runs only after its place went on past the
screening and may still reach ``cue_flip_min``: on the screening images first, and on the rest of the
sample unless those settle it (:meth:`PlaceboOcclusion.settled`).
"""

from __future__ import annotations

import zlib

import numpy as np

from audit.scan.config import Config
from audit.scan.probes.base import Family, Probe, Sample, Trial
from audit.scan.probes.edits import occlude
from audit.scan.probes.place import occlusion_trials


def box_shape(place_mask: np.ndarray) -> tuple[int, int]:
    """(height, width) in pixels of the placebo box of a place: its bounding box for a box-shaped place,
    a square of as many pixels for any other shape (a border band)."""
    rows, cols = np.nonzero(place_mask.any(axis=1))[0], np.nonzero(place_mask.any(axis=0))[0]
    if not len(rows):
        return 0, 0
    bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if bh * bw == place_mask.sum():
        return int(bh), int(bw)
    side = int(round(float(np.sqrt(place_mask.sum()))))
    return min(side, place_mask.shape[0]), min(side, place_mask.shape[1])


def random_boxes(place_mask: np.ndarray, n: int, seed: int, steps: int = 9) -> np.ndarray:
    """(n, H, W) bool: a box of the place's size (:func:`box_shape`) at a random position per image, drawn
    from up to ``steps`` x ``steps`` pixel offsets, among those that cover fewest of the place's pixels
    (none where any offset avoids it)."""
    h, w = place_mask.shape
    bh, bw = box_shape(place_mask)
    out = np.zeros((n, h, w), bool)
    if not bh:
        return out
    ys = np.unique(np.linspace(0, h - bh, steps).round().astype(int))
    xs = np.unique(np.linspace(0, w - bw, steps).round().astype(int))
    py, px = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    sums = np.pad(place_mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # an integral image
    overlap = sums[py + bh, px + bw] - sums[py, px + bw] - sums[py + bh, px] + sums[py, px]
    ok = np.nonzero(overlap == overlap.min())[0]
    for i, k in enumerate(ok[np.random.default_rng(seed).integers(0, len(ok), n)]):
        out[i, py[k]:py[k] + bh, px[k]:px[k] + bw] = True
    return out


class PlaceboOcclusion(Probe):
    """A box of each place's size (a band: a square of its area) at random places of the class's own images."""

    name = "placebo"
    family = Family.PLACEBO
    is_placebo = True
    screened = False  # runs with its place on the whole sample, never on the screening images alone

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        return occlusion_trials(self, s, cfg, lambda p: random_boxes(p.mask, s.n, zlib.crc32(p.name.encode())))

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        return occlude(s.images[rows], t.mask[rows], t.fill)

    def go_on(self, t: Trial, trials: list, cfg: Config) -> bool:
        """Only where it may matter, after its place ran on the sample: the place was tested on at least
        ``min_tested`` images and its rate may reach ``cue_flip_min`` (its interval's upper end)."""
        place = next((x for x in trials if x.probe.is_place and x.place == t.place), None)
        return place is not None and len(place.flips) >= cfg.min_tested and place.bounds()[1] >= cfg.cue_flip_min

    def settled(self, t: Trial, cfg: Config) -> bool:
        """The screening images settle the placebo when even its interval's upper end plus
        ``placebo_margin`` stays at or under ``cue_flip_min`` (none of 8 flipped: at most 32%): then it
        can raise no place's threshold (:func:`audit.scan.verdict.place_flip_score`) whatever the rest
        would show; any flip and it runs on the whole sample."""
        return len(t.flips) >= cfg.min_rate_n and t.bounds()[1] + cfg.placebo_margin <= cfg.cue_flip_min

    def words(self, t) -> str:
        return f"occluding a box the size of {t.place} at random places"
