"""The space of drawn shortcut cases: :func:`draw_case` turns a seed into one :class:`DrawnCase`.

The hand-written cases of :mod:`audit.zoo.cases` are the ones the scan was
tuned on; a drawn case is one nobody wrote.  Every choice below is drawn
from ``numpy.random.default_rng(seed)`` and from nothing else, so a draw is
a pure function of its seed:

* the objects (the true class signal): the zoo's shapes, or scikit-learn's
  handwritten digits (``sklearn.datasets.load_digits``, 8 x 8, scaled up);
* the backgrounds: the zoo's plain family, or crops of scikit-image's sample
  photographs (the ``photos`` extra: without scikit-image such a draw cannot
  be painted, :func:`DrawnCase.paintable` says so and the benchmark skips it;
  the draw itself never depends on what is installed);
* the cues (:data:`FAMILIES`), how many classes carry one (0 up to all but
  one), and for each: its size, place (fixed, a random corner per image, or
  anywhere per image), opacity, colour, the share of its class that carries
  it (5-100%) and whether those images keep their own object or get one of a
  random class (then only the cue tells the class);
* distractors: cues that every class carries alike (never a shortcut);
* the network (:data:`ARCHS`: GAP, Flatten, residual, depthwise), its head
  (softmax, or one sigmoid unit for two classes), the image side (28-128),
  the channels (1 or 3) and whether the audit gets the object masks.

Sizes and places are in pixels of the 64 x 64 canvas the images are drawn on
(:mod:`audit.zoo.paint` resizes to the case's side).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audit.zoo import draw

VERSION = "drawn-4"
CANVAS = draw.SIZE
FAMILIES = ("mark", "frame", "band", "patch", "texture", "tint", "object_colour", "object_texture",
            "scene", "noise")
PLACED = ("mark", "patch", "noise")  # the families with a place (the others cover a fixed area)
PLACES = ("fixed", "corner", "random")
SPREAD = ("frame", "band", "texture", "tint", "object_colour", "object_texture", "scene")
ARCHS = {"gap": "cnn", "flatten": "flatten", "residual": "resnet", "depthwise": "mobile"}
"""Drawn network -> the :func:`audit.zoo.train.build_model` body (``deep`` replaces ``cnn`` from 96 px)."""
SIDES = (28, 32, 48, 64, 64, 96, 128)  # 64 twice: the common case
EDGES = ("top", "bottom", "left", "right")
DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DrawnCue:
    """One cue of a drawn case.

    family: one of :data:`FAMILIES`.
    size: the side of a mark, patch or noise square, the width of a frame or band (canvas pixels).
    place: ``fixed``, ``corner`` (a random corner per image) or ``random`` (anywhere per image) for
        :data:`PLACED` families; ``""`` for the others.
    at: the top-left pixel of a fixed place; unused otherwise.
    edge: the side a band runs along.
    opacity: how much the cue covers what is under it (1 = opaque; a tint's blend weight).
    colour: its RGB colour (a texture's or object texture's first stripe colour).
    share: the share of its class's images that carry it.
    weak_object: the images with the cue get an object of a random class.
    pattern: the seed of a noise pattern or a mark's glyph (the same on every image of the case).
    """

    family: str
    size: int = 8
    place: str = ""
    at: tuple[int, int] = (0, 0)
    edge: str = "top"
    opacity: float = 1.0
    colour: tuple[int, int, int] = (255, 255, 255)
    share: float = 1.0
    weak_object: bool = True
    pattern: int = 0

    def describe(self) -> str:
        where = f" at {self.place}{' ' + str(self.at) if self.place == 'fixed' else ''}" if self.place else ""
        if self.family == "band":
            where = f" along the {self.edge}"
        size = f"{self.size} px" if self.size else "spread"
        return (f"{self.family} ({size}{where}, opacity {self.opacity:.2f}) on {self.share:.0%} "
                f"of the class{', random objects' if self.weak_object else ''}")


@dataclass(frozen=True)
class DrawnCase:
    """One drawn shortcut problem; everything :mod:`audit.zoo.paint` and the training need."""

    seed: int
    classes: tuple[str, ...]
    objects: str  # "shapes" | "digits"
    backgrounds: str  # "plain" | "photos"
    cues: tuple[tuple[int, DrawnCue], ...]
    distractors: tuple[DrawnCue, ...]
    arch: str  # a key of ARCHS
    head: str  # "softmax" | "sigmoid" (two classes, one unit)
    side: int
    channels: int
    masks: bool  # the audit gets the object masks
    object_size: tuple[int, int] = (16, 28)
    n_per_class: int = 80
    n_heldout: int = 24
    max_steps: int = 1200  # gradient steps at most (audit.zoo.learned.train)
    width: float = 0.5  # the network's channels, as a share of the zoo's (tiny: a case trains in seconds)

    @property
    def name(self) -> str:
        return f"draw{self.seed}"

    @property
    def binary(self) -> bool:
        return self.head == "sigmoid"

    def paintable(self) -> str:
        """Empty when this machine can paint the case, else why not (scikit-image missing for photos)."""
        if self.backgrounds == "photos" and not photos_available():
            return "needs scikit-image's photographs (pip install 'shortcut-audit[photos]')"
        return ""

    def cue_of(self, k: int) -> DrawnCue | None:
        return dict(self.cues).get(k)

    def body(self) -> str:
        """The :func:`audit.zoo.train.build_model` body."""
        return "deep" if self.arch == "gap" and self.side >= 96 else ARCHS[self.arch]

    def describe(self) -> str:
        cues = "; ".join(f"{self.classes[k]}: {c.describe()}" for k, c in self.cues) or "no cue"
        dis = "; ".join(c.describe() for c in self.distractors)
        return (f"{self.name}: {len(self.classes)} {self.objects} classes on {self.backgrounds} backgrounds, "
                f"{self.arch}/{self.head}, {self.side} px x {self.channels} ch, masks {'yes' if self.masks else 'no'}"
                f"; {cues}{'; distractor ' + dis if dis else ''}")


def photos_available() -> bool:
    """Whether scikit-image (the ``photos`` extra) is importable."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _colour(rng) -> tuple[int, int, int]:
    """A saturated colour: one channel high, one low, one anywhere."""
    c = [int(rng.integers(200, 256)), int(rng.integers(0, 60)), int(rng.integers(0, 256))]
    order = rng.permutation(3)
    return tuple(c[i] for i in order)


def draw_cue(rng, family: str, *, distractor: bool = False) -> DrawnCue:
    """One cue of ``family`` with drawn size, place, opacity, colour, share and object rule."""
    size = {"mark": (7, 14), "patch": (4, 12), "noise": (5, 14), "frame": (1, 4), "band": (3, 10)}.get(
        family, (0, 0))
    place = _pick(rng, PLACES) if family in PLACED else ""
    s = int(rng.integers(size[0], size[1] + 1)) if size[1] else 0
    at = tuple(int(v) for v in rng.integers(1, CANVAS - max(s, 1) - 1, 2))
    low = {"tint": 0.25, "object_colour": 1.0, "texture": 1.0, "scene": 1.0}.get(family, 0.5)
    opacity = float(np.round(rng.uniform(low, 1.0) if low < 1 else 1.0, 2))
    if family == "tint":
        opacity = float(np.round(rng.uniform(0.25, 0.5), 2))
    share = float(np.round(rng.choice([1.0, 1.0, rng.uniform(0.05, 1.0)]), 2))
    if distractor:
        share = float(np.round(rng.uniform(0.3, 0.8), 2))
    return DrawnCue(family, s, place, at, _pick(rng, EDGES), opacity, _colour(rng),
                    share, bool(rng.random() < 0.7) and not distractor, int(rng.integers(1 << 30)))


def _classes(rng, objects: str) -> tuple[str, ...]:
    n = int(rng.choice([2, 3, 4, 4, 5]))
    pool = draw.SHAPES6 if objects == "shapes" else DIGITS
    pick = sorted(rng.choice(len(pool), n, replace=False))
    return tuple(pool[i] for i in pick)


def draw_case(seed: int) -> DrawnCase:
    """The case of ``seed`` (a pure function of it, whatever is installed).

    Args:
        seed: any integer >= 0.

    Returns:
        The :class:`DrawnCase`.
    """
    rng = np.random.default_rng([seed, 21])
    objects = "digits" if rng.random() < 0.3 else "shapes"
    wants_photos = bool(rng.random() < 0.3)
    classes = _classes(rng, objects)
    n_cued = int(rng.choice([0, 1, 1, 1, 2, 2, 3]))
    n_cued = min(n_cued, len(classes) - 1)
    cued = sorted(int(k) for k in rng.choice(len(classes), n_cued, replace=False))
    fams = [_pick(rng, FAMILIES) for _ in cued]
    cues = tuple((k, draw_cue(rng, f)) for k, f in zip(cued, fams))
    distractors = ()
    if rng.random() < 0.3:
        distractors = (draw_cue(rng, _pick(rng, ("mark", "patch", "frame", "band", "noise")), distractor=True),)
    arch = _pick(rng, tuple(ARCHS))
    head = "sigmoid" if len(classes) == 2 and rng.random() < 0.5 else "softmax"
    side, channels = int(_pick(rng, SIDES)), int(_pick(rng, (1, 3, 3)))
    masks = bool(rng.random() < 0.5)
    size = (14, 26) if objects == "shapes" else (22, 34)
    return DrawnCase(seed, classes, objects, "photos" if wants_photos else "plain", cues,
                     distractors, arch, head, side, channels, masks, size)
