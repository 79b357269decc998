"""The shape of a causal test (a *probe*) and of its results.

A :class:`Probe` says which images of a sample it edits (:meth:`Probe.trials`),
the edit (:meth:`Probe.edit`), how it is screened (:meth:`Probe.go_on`), its
planned cost in forward passes (:meth:`Probe.planned`), its result row
(:meth:`Probe.result`) and its words in the evidence (:meth:`Probe.words`).
What the verdict needs to know about a test is a property of its probe
(``removes_object``, ``whole_image``, ``control``...), never its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from audit.scan.config import DEFAULT, Config
from audit.scan.interval import wilson


class Family(Enum):
    """The ``test`` column of ``interventions.parquet``: what kind of edit a probe makes."""

    OBJECT = "object"  # the object goes
    BACKGROUND = "background"  # the object stays, its background goes
    REGION = "region"  # one place of the bank is filled
    TRANSFORM = "transform"  # an attribute changes, the object's identity stays
    TRANSPLANT = "transplant"  # a class's pixels pasted into other classes' images
    PLACEBO = "placebo"  # a place's box at random places of the class's own images: the place's baseline


class Where(Enum):
    """What kind of place a test edits (the ``place`` column names it)."""

    OBJECT = "object"
    BACKGROUND = "background"
    IMAGE = "image"  # the whole image, object included
    BORDER = "border"
    EDGE = "edge"
    CORNER = "corner"
    CELL = "cell"  # a cell of the grid inside the image (without masks)
    REGION = "region"  # a region named by the job
    HOT = "hot"  # the group's hot area


@dataclass(frozen=True)
class PlaceFlip:
    """One test's result: ``test`` (its :class:`Family`), the ``place``, its ``box``, the ``fill``,
    the images tested ``n``, how many flipped ``k`` and the share whose prediction changed."""

    test: str
    place: str
    box: tuple | None
    fill: str
    n: int
    flip_rate: float
    area: float = math.nan  # share of the image the place covers
    transplant: float = math.nan  # share of other classes' images the place turns into the class
    transplant_n: int = 0  # recipients of the transplant
    others_same: float = math.nan  # share of the recipients (other classes) that the same place, occluded, flips
    probe: str = ""  # the registry name of the probe that made it
    where: Where | None = None
    k: int = 0  # flipped images of n
    to_class: int = -1  # the class most of the flipped images went to (single-label predictions), else -1

    @property
    def spec(self):
        """The :class:`Probe` that made this result."""
        from audit.scan.probes import PROBES  # a cycle: the registry imports this module first

        return PROBES[self.probe]

    @property
    def low(self) -> float:
        """Lower end of the flip rate's 95% Wilson interval (NaN when the rate is unknown)."""
        return wilson(self.k, self.n)[0] if self.n and math.isfinite(self.flip_rate) else math.nan

    @property
    def high(self) -> float:
        return wilson(self.k, self.n)[1] if self.n and math.isfinite(self.flip_rate) else math.nan


@dataclass
class CausalResult:
    """All causal tests of one group's sample."""

    n: int  # images in the sample
    tests: list = field(default_factory=list)  # [PlaceFlip]
    masked: bool = False  # object masks were used (object and background tests, objects spared)
    absence: bool = False  # masks were used but no image of the sample has an object
    forwards: dict = field(default_factory=dict)  # {what: forward passes}: the cost, by probe and base
    stopped: dict = field(default_factory=dict)  # {(probe, place): why sequential testing left it undecided}

    def first(self, role: str) -> PlaceFlip | None:
        """The first test whose probe has the property ``role`` (e.g. ``removes_object``)."""
        return next((t for t in self.tests if getattr(t.spec, role)), None)

    def at(self, place: str) -> PlaceFlip | None:
        """The first test of the place called ``place`` (a value of the ``place`` column)."""
        return next((t for t in self.tests if t.place == place), None)

    def rate_at(self, place: str) -> float:
        t = self.at(place)
        return t.flip_rate if t is not None else math.nan

    def object(self) -> PlaceFlip | None:
        """The object test (the object's mask, or without masks each image's own hot area)."""
        return self.first("removes_object")

    def object_rate(self) -> float:
        t = self.object()
        return t.flip_rate if t is not None else math.nan

    def background_rate(self) -> float:
        """The smaller of the neutral and the other-background rates: the background matters whichever
        way it is replaced (NaN when not run)."""
        rates = [t.flip_rate for t in self.tests if t.spec.replaces_background and math.isfinite(t.flip_rate)]
        return min(rates) if rates else math.nan

    def background_transplant(self) -> PlaceFlip | None:
        """The class's backgrounds pasted around other classes' objects (masks) or hot areas (without)."""
        return self.first("sufficiency")

    @property
    def places(self) -> list:
        return [t for t in self.tests if t.spec.is_place]

    @property
    def transforms(self) -> list:
        return [t for t in self.tests if t.spec.is_transform]

    def placebo(self, place: str) -> PlaceFlip | None:
        """The placebo of the place called ``place`` (its box at random places), or None when not run."""
        return next((t for t in self.tests if t.spec.is_placebo and t.place == place and t.n), None)


@dataclass
class Sample:
    """The inputs of one sample's causal tests.

    images: (N, H, W, C) uint8 at the model input size.
    places: the :class:`audit.scan.probes.places.Spot` bank.
    masks: None (no masks) or (N, H, W) bool; an all-False mask means no object in that image.
    classes: (N,) class of each image (multi-label predictions only).
    backgrounds, background_classes: object-free images of other classes and their classes.
    base_pred: predictions on the unmodified images (computed when None).
    spare: (N, H, W) bool, where each object is taken to be; None: no transforms.
    levels: the dataset's typical image (:class:`audit.scan.probes.edits.Levels`).
    recipients: images of other classes (:class:`audit.scan.probes.transplant.Recipients`) or None.
    target: the sample's class id (for the transplants).
    cfg: the thresholds (the edits' sizes).
    """

    images: np.ndarray
    places: list = field(default_factory=list)
    masks: np.ndarray | None = None
    classes: np.ndarray | None = None
    backgrounds: np.ndarray | None = None
    background_classes: np.ndarray | None = None
    base_pred: np.ndarray | None = None
    spare: np.ndarray | None = None
    levels: object = None
    recipients: object = None
    target: int | None = None
    cfg: Config = DEFAULT

    def __post_init__(self):
        self.images = np.asarray(self.images)
        self.masks = None if self.masks is None else np.asarray(self.masks, bool)
        self.spare = None if self.spare is None else np.asarray(self.spare, bool)
        self.classes = None if self.classes is None else np.asarray(self.classes)

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def has_object(self) -> np.ndarray:
        """(N,) bool: the image's mask holds an object (all False without masks)."""
        if self.masks is None:
            return np.zeros(self.n, bool)
        return self.masks.reshape(self.n, -1).any(axis=1)


@dataclass
class Trial:
    """One test of one sample while it runs: which images it may edit and the flips so far."""

    probe: Probe
    place: str
    box: tuple | None
    fill: str
    sel: np.ndarray  # (N,) images it can test
    mask: np.ndarray | None = None  # (N, H, W) pixels it edits (places and transforms)
    area: float = math.nan
    where: Where | None = None
    flips: dict = field(default_factory=dict)  # image index -> flipped
    to: dict = field(default_factory=dict)  # image index -> new class, for the flipped images (single-label)
    transplant: object = None  # a Transplant, for the places that flipped the sample

    def rate(self) -> float:
        return float(np.mean(list(self.flips.values()))) if self.flips else math.nan

    def bounds(self) -> tuple[float, float]:
        """The 95% Wilson interval of the flips so far."""
        return wilson(int(sum(self.flips.values())), len(self.flips))

    def clearly_above(self, threshold: float) -> bool:
        """The flips so far put the rate above ``threshold`` even at their interval's lower end: only such
        a clear result may stop another test (a screening of 8 images never vetoes)."""
        return len(self.flips) > 0 and self.bounds()[0] > threshold

    def promising(self, cfg: Config) -> bool:
        if len(self.flips) < cfg.min_rate_n:  # too few screened: test the rest
            return True
        return self.rate() >= cfg.screen_min


class Probe:
    """A causal test: subclass it, set the class attributes, and add one line to the registry."""

    name: str = ""  # the registry key
    family: Family = Family.REGION
    where: Where | None = None
    # what the verdict asks (properties, never names)
    removes_object = False  # the object test (masks, or the own hot area without)
    replaces_background = False  # the object kept, the background replaced (masks)
    is_place = False  # one place of the bank filled
    is_transform = False  # an attribute edit (a transform)
    keeps_identity = False  # ... that keeps every shape: counts whatever removing the object does
    whole_image = False  # edits the object too: needs Config.image_flip_min
    background_only = False  # edits the background with the object spared
    control = False  # a control: reported, never a cue
    sufficiency = False  # its rate is a transplant's (other classes' images turned into the class)
    follows_others = False  # screening: goes on when any background test or transform goes on
    grows = True  # sequential testing may grow its sample (not a rate on other classes' recipients)
    edits_others = False  # gives this class's attribute to other classes' images, taking theirs (their cues) away
    removed_by = ""  # the registry name of the probe whose edit takes its cue away ("": its own)
    is_placebo = False  # a place's box at random places: the rate a place must clear
    screened = True  # runs on the screening images first (False: only after, on the whole sample)
    more_recipients = False  # sequential testing may give its transplant more recipients (transplant_into)

    def rule(self, cfg: Config) -> Config | None:
        """Its own thresholds (``cue_flip_min``, ``cue_specific_min``) where the verdict's are not its own."""
        return None

    def trials(self, s: Sample, cfg: Config) -> list[Trial]:
        """The trials of this probe on a sample (none when it does not apply)."""
        return []

    def edit(self, t: Trial, s: Sample, rows: np.ndarray) -> np.ndarray:
        """The edited copies of ``s.images[rows]``."""
        raise NotImplementedError

    def go_on(self, t: Trial, trials: list, cfg: Config) -> bool:
        """After the screening: test the rest of the sample?"""
        return t.promising(cfg)

    def settled(self, t: Trial, cfg: Config) -> bool:
        """An unscreened trial (``screened`` False), run on the screening images: do those settle it
        (the rest of the sample could not change what it decides)?"""
        return False

    def planned(self, masked: bool, n_places: int) -> int:
        """Edited images per screened image, for planning the cost."""
        return 0

    def follow_up(self, predict_fn, trials: list, s: Sample, cfg: Config, chunk: int) -> list[Trial]:
        """A stage after the screening and the rest (the transplants); new trials or []."""
        return []

    def transplant_into(self, predict_fn, s: Sample, recipients, chunk: int):
        """Its transplant from the sample ``s`` into ``recipients`` (a ``Transplant``), for the probes with
        ``more_recipients``; None where there is none."""
        return None

    def result(self, t: Trial, s: Sample, cfg: Config) -> PlaceFlip:
        """The trial's row."""
        idx = np.array(sorted(t.flips), int)
        f = np.array([t.flips[i] for i in idx], bool)
        k = len(f)
        enough = k >= cfg.min_rate_n
        tr = t.transplant
        went = list(t.to.values())
        return PlaceFlip(self.family.value, t.place, t.box, t.fill, k if enough else 0,
                         float(f.mean()) if enough else math.nan, self.area(t, s),
                         tr.rate if tr is not None else math.nan, tr.n if tr is not None else 0,
                         tr.occluded if tr is not None else math.nan, self.name, t.where,
                         int(f.sum()) if enough else 0, max(set(went), key=went.count) if went else -1)

    def area(self, t: Trial, s: Sample) -> float:
        return t.area

    def words(self, t: PlaceFlip) -> str:
        """How the edit reads in the evidence: ``"occluding edge:top (mean-colour fill)"``."""
        return f"occluding {t.place} ({fill_words(t.fill)})"


def fill_words(fill: str) -> str:
    return {"mean": "mean-colour fill", "blur": "blur fill", "inpaint": "inpainted"}.get(fill, fill)


def flipped(base, new, classes=None) -> np.ndarray:
    """(N,) bool: the prediction changed.

    Single-label predictions (N,): ``new != base``.  Multi-label (N, C) bool:
    the label of each image's own class (``classes``) changed.
    """
    base, new = np.asarray(base), np.asarray(new)
    if base.ndim == 1:
        return new != base
    idx = np.arange(len(base))
    c = np.asarray(classes, int)
    return new[idx, c] != base[idx, c]


def predict_chunks(predict_fn, variants: list, chunk: int) -> list:
    """Predict a list of image stacks with one call per ``chunk`` images; returns one array per stack."""
    sizes = [len(v) for v in variants]
    if sum(sizes) == 0:
        return [np.zeros(0, int) for _ in variants]
    preds, buf, n_buf = [], [], 0
    for v in variants:
        s = 0
        while s < len(v):  # fill each call to exactly ``chunk`` images across the stacks
            take = v[s:s + chunk - n_buf]
            buf.append(take)
            n_buf += len(take)
            s += len(take)
            if n_buf == chunk:
                preds.append(np.asarray(predict_fn(np.concatenate(buf))))
                buf, n_buf = [], 0
    if buf:
        preds.append(np.asarray(predict_fn(np.concatenate(buf))))
    return np.split(np.concatenate(preds), np.cumsum(sizes)[:-1])


__all__ = ["DEFAULT", "CausalResult", "Family", "PlaceFlip", "Probe", "Sample", "Trial", "Where", "flipped",
           "predict_chunks"]
