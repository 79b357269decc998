"""The causal tests of the scan, one probe per module, and their registry.

A heatmap only says where the gradient was large; the probes ask the model
itself, with extra forward passes on a small deterministic sample of each
class (or cluster).  Each probe (:class:`audit.scan.probes.base.Probe`)
says which images it edits, the edit, how it is screened, its cost, its
result row and its words in the evidence; the verdict asks the results by
their probe's properties.  Adding a test is one module and one line in
:data:`PROBES` (and its row in docs/scan.md, which a test checks).

:func:`causal_tests` runs the registry on one sample; :func:`remove_cue`
applies the edit that a verdict's cue was found with to any images.
"""

from __future__ import annotations

import numpy as np

from audit.errors import AuditError
from audit.scan.config import DEFAULT, Config
from audit.scan.probes.background import NeutralBackground, OtherBackground
from audit.scan.probes.base import (
    CausalResult,
    Family,
    PlaceFlip,
    Probe,
    Sample,
    Where,
    flipped,
    predict_chunks,
)
from audit.scan.probes.colour import ColourTransplant
from audit.scan.probes.edits import spare_masks
from audit.scan.probes.identity import identity_probes
from audit.scan.probes.object import HotAreaRemoval, ObjectRemoval
from audit.scan.probes.place import PlaceOcclusion
from audit.scan.probes.placebo import PlaceboOcclusion
from audit.scan.probes.places import spot_named
from audit.scan.probes.transform import BackgroundTexture, FlatBackground, ImageColour
from audit.scan.probes.transplant import BackgroundTransplant

# registry order is the order of the trials and of their rows in interventions.parquet
PROBES: dict[str, Probe] = {p.name: p for p in (
    ObjectRemoval(),
    NeutralBackground(),
    OtherBackground(),
    HotAreaRemoval(),
    BackgroundTexture(),
    FlatBackground(),
    ImageColour(),
    *identity_probes(),  # greyscale, channel rotation, texture of object/background/image, a shift
    ColourTransplant(),
    PlaceOcclusion(),
    PlaceboOcclusion(),
    BackgroundTransplant(),
)}

TEST_VALUES = tuple(dict.fromkeys(p.family.value for p in PROBES.values()))  # the ``test`` column's values

from audit.scan.probes.run import causal_tests, extra_forwards  # noqa: E402  (run.py reads PROBES)


def remove_cue(images, cue_region: str, *, cue_box=None, masks=None, spare=None, levels=None,
               cfg: Config = DEFAULT) -> np.ndarray:
    """``images`` with a verdict's cue removed by the same edit the causal test that found it used.

    Args:
        images: (N, H, W, C) uint8 at the model input size.
        cue_region: the ``cue_region`` of a ``classes.parquet`` / ``clusters.parquet`` row (the
            ``place`` of its test): a place of the bank (``border:4%``, ``edge:top``,
            ``corner:top_left``, ``region:<name>``), ``hot area`` (with ``cue_box``), a transform's
            place (``background:texture``, ``image:colour``...) or ``background``.
        cue_box: the row's ``cue_box`` (fractions x0, y0, x1, y1), needed for ``hot area``.
        masks: (N, H, W) bool object masks, or None; their pixels are spared as in the test.
        spare: (N, H, W) bool, where each object is taken to be without masks (the transforms and a
            background cue without masks need it; default: derived from ``masks``).
        levels: the dataset's typical image (:class:`audit.scan.probes.edits.Levels`) for ``image:colour``.
        cfg: the scan's thresholds (fill, texture blur).

    Returns:
        Edited copies (N, H, W, C) uint8.

    Raises:
        AuditError: a cue this function cannot remove (or a transform without ``masks`` or ``spare``).
    """
    imgs = np.asarray(images)
    if spare is None and masks is not None:
        spare = spare_masks(imgs.shape[1:3], masks)
    s = Sample(imgs, masks=masks, spare=spare, levels=levels, cfg=cfg)
    rows = np.arange(s.n)
    if cue_region == "background":
        if masks is not None:
            return PROBES["background-neutral"].edit(None, s, rows)
        cue_region = FlatBackground.place
    for p in PROBES.values():
        if p.is_transform and getattr(p, "place", None) == cue_region:
            p = PROBES.get(p.removed_by, p)
            trials = p.trials(s, cfg)
            if not trials:
                raise AuditError(f"removing the cue {cue_region!r} needs object masks or spared areas "
                                 "(or colour images)")
            return p.edit(trials[0], s, rows)
    spot = spot_named(cue_region, imgs.shape[1:3], cue_box, cfg=cfg)
    if spot is None:
        raise AuditError(f"cannot remove the cue {cue_region!r}: not a place, transform or background of the scan")
    s.places = [spot]
    t = PROBES["place"].trials(s, cfg)[0]
    return PROBES["place"].edit(t, s, rows)


__all__ = ["PROBES", "TEST_VALUES", "CausalResult", "Family", "PlaceFlip", "Probe", "Sample", "Where",
           "causal_tests", "extra_forwards", "flipped", "predict_chunks", "remove_cue"]
