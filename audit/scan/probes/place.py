"""Place occlusion: each place of the bank (:mod:`audit.scan.probes.places`: border bands, each edge,
each corner, the job's named regions, the group's hot area) filled one at a time with the image's mean
colour (or a heavy blur), sparing the object's pixels when a mask is known.  The places that flip the
sample are then transplanted (:mod:`audit.scan.probes.transplant`)."""

from __future__ import annotations

import math

import numpy as np

from audit.scan.config import Config
from audit.scan.probes.base import Family, Probe, Sample, Trial, Where
from audit.scan.probes.edits import occlude
from audit.scan.probes.transplant import transplant_places


def occlusion_trials(probe: Probe, s: Sample, cfg: Config, masks_of) -> list[Trial]:
    """One trial of ``probe`` per place of the sample: the pixels ``masks_of(place)`` ((n, H, W) bool)
    filled with ``cfg.fill``, the object's pixels spared where masks are known."""
    out = []
    for p in s.places:
        m = masks_of(p)
        m = m & ~s.masks if s.masks is not None else m
        out.append(Trial(probe, p.name, p.box, cfg.fill, m.reshape(s.n, -1).any(axis=1), m, p.area, p.where))
    return out


class PlaceOcclusion(Probe):
    name = "place"
    family = Family.REGION
    is_place = True

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        return occlusion_trials(self, s, cfg, lambda p: np.broadcast_to(p.mask, (s.n, *p.mask.shape)))

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        return occlude(s.images[rows], t.mask[rows], t.fill)

    def go_on(self, t: Trial, trials: list, cfg: Config) -> bool:
        """Every promising named region, and the ``cfg.max_promising`` other promising places that
        flipped most, the smallest first (a corner tag also flips the edges and bands that contain it)."""
        if not t.promising(cfg):
            return False
        if t.where is Where.REGION:
            return True
        ranked = sorted((x for x in trials if x.probe is self and x.where is not Where.REGION and x.promising(cfg)),
                        key=lambda x: (-(x.rate() if math.isfinite(x.rate()) else 1.0), x.area))
        return any(x is t for x in ranked[:cfg.max_promising])

    def planned(self, masked: bool, n_places: int) -> int:
        return n_places

    def follow_up(self, predict_fn, trials: list, s: Sample, cfg: Config, chunk: int) -> list[Trial]:
        """Transplant the places that flipped the sample (their results go into those trials)."""
        found = transplant_places(predict_fn, [t for t in trials if t.probe is self], s, cfg, chunk)
        for t in trials:
            if id(t) in found:
                t.transplant = found[id(t)]
        return []
