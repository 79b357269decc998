"""Causal tests: does the prediction change when the object, the background or a fixed place goes?

A heatmap only says where the gradient was large; these tests ask the model
itself, with extra forward passes on a small deterministic sample of each
class (or cluster):

* **object** (with masks): the object is removed by inpainting
  (:func:`remove_objects`: OpenCV's Telea inpainting over the mask dilated by
  a few pixels, so that no silhouette or outline is left) -> ``flip_rate``
  of test ``object``;
* **background** (with masks): the object is kept and everything else is
  replaced by a neutral colour, and separately by the background of an
  image of another class (its own object inpainted away)
  (:func:`replace_background`) -> two ``background`` tests;
* **transforms** (with and without masks): the object is spared (its
  dilated mask, or without masks the image's own heatmap hot area:
  :func:`spare_masks`) and the rest is (a) blurred finely, which destroys a
  texture and keeps shapes and colours, or (b) made one flat grey, which
  says whether the class's own background matters; and (c) the whole image,
  object included, is recoloured grey-world, which removes a colour cast and
  keeps shapes and texture, with the brightness and contrast of the dataset's
  typical image (:func:`transform`) -> test ``transform``, places
  ``background:texture``, ``background:flat`` and ``image:colour``;
  without masks the spared area is also inpainted away (test ``object``,
  place ``own hot area``), which tells a model that decides by that area;
* **places** (with and without masks): each place of a fixed bank
  (:func:`place_bank`: border bands of several widths, each edge, each
  corner, the job's named regions, the class's hot area) is filled one at a
  time (:func:`occlude`: the image's mean colour, or a heavy blur), sparing
  the object's pixels when a mask is known -> test ``region``.

All variants of a sample are stacked and predicted in chunks, so a class's
whole bank costs one batched pass over ``sample x tests`` images.  The core,
:func:`causal_tests`, is a pure function of a ``predict_fn``, images and
masks; :class:`Intervener` wires it to a finished job (model, preprocessing,
head and dataset from ``OUT/job.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.errors import AuditError
from audit.scan.config import SPARE_HOT, SPARE_MAX, TEXTURE_SIGMA
from audit.scan.transplant import BACKGROUND_OBJECT_MAX, transplant_background, transplant_places

FILLS = ("mean", "blur")
OBJECT_FILL = "inpaint"
MIN_SAMPLE = 5  # fewer testable images than this: the rate is reported as unknown (NaN)
BORDER_WIDTHS = (0.04, 0.1, 0.2)  # border bands, fraction of each side (0.04: a thin frame)
EDGE_WIDTH = 0.2  # each edge band
CORNER_SIDE = 1 / 3  # each corner box
CHUNK = 256  # images per predict call
BATCH = 64  # images per model call inside it (larger batches run no faster on a CPU)
SCREEN = 8  # places are screened on this many images of a sample ...
SCREEN_MIN = 0.2  # ... and tested on the rest when they flip at least this share of them
PROMISING = 3  # places expected to pass the screening, for planning the cost
MAX_PROMISING = 4  # at most this many places (besides named regions) go on after the screening
OBJECT_SCREEN_MAX = 0.5  # the background tests go on only while removing the object flips at most this
TRANSFORMS = {"background:texture": "fine-blur", "background:flat": "flat-grey",
              "image:colour": "colour-levels"}  # place -> fill; ``image:`` edits the whole image, object included
HOT_OBJECT = "own hot area"  # the object test's place without masks: each image's spared area inpainted


# ----------------------------------------------------------------------------
# Image edits
# ----------------------------------------------------------------------------


def occlude(images: np.ndarray, masks: np.ndarray, fill: str = "mean") -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 with ``masks`` (N, H, W) pixels neutralised.

    ``fill="mean"``: each image's own mean colour (removes colour and texture
    cues such as a blue sky or a coloured frame); ``fill="blur"``: a heavy
    Gaussian blur of the image (removes shapes and texture, keeps colours).
    Neither removes an object's silhouette: use :func:`remove_objects` for that.
    """
    import cv2

    if fill not in FILLS:
        raise AuditError(f"unknown occlusion fill {fill!r}; expected one of {', '.join(FILLS)}")
    imgs = np.asarray(images)
    m = np.asarray(masks, bool)
    out = imgs.copy()
    for i in range(len(imgs)):
        if not m[i].any():
            continue
        if fill == "mean":
            colour = imgs[i].reshape(-1, imgs.shape[-1]).mean(axis=0)
            out[i][m[i]] = np.round(colour).astype(imgs.dtype)
        else:
            sigma = max(imgs.shape[1], imgs.shape[2]) / 8.0
            blurred = cv2.GaussianBlur(imgs[i], (0, 0), sigma).reshape(imgs[i].shape)
            out[i][m[i]] = blurred[m[i]]
    return out


@dataclass(frozen=True)
class Levels:
    """A dataset's typical image: the median over a pool of images of each one's mean luminance and of
    its luminance's standard deviation (0..255)."""

    mean: float
    std: float

    @classmethod
    def of(cls, images) -> Levels | None:
        if images is None or not len(images):
            return None
        lum = _luminance(np.asarray(images, np.float32))
        return cls(float(np.median(lum.mean(axis=(1, 2)))), float(np.median(lum.std(axis=(1, 2)))))


def _luminance(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] < 3:
        return x[..., 0]
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _colour_levels(img: np.ndarray, m: np.ndarray, levels: Levels | None) -> np.ndarray:
    """Grey-world colours (each channel scaled to the same mean, at the mean luminance), then the
    luminance's mean and spread moved to the dataset's typical ``levels`` (when known)."""
    if img.shape[-1] >= 3:
        mean = img[m].mean(axis=0)
        img = img * (mean.mean() / np.maximum(mean, 1.0))
    if levels is None:
        return img
    lum = _luminance(img)[m]
    return (img - lum.mean()) * (levels.std / max(float(lum.std()), 1.0)) + levels.mean


def transform(images: np.ndarray, edit: np.ndarray, kind: str, levels: Levels | None = None) -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 whose ``edit`` (N, H, W) pixels are transformed.

    ``fine-blur``: a Gaussian blur of :data:`TEXTURE_SIGMA` of the side (a
    texture of stripes or grain goes, shapes and colours stay);
    ``colour-levels``: each channel of the edited pixels scaled so that their
    mean is the same in every channel, at their mean luminance, then their
    luminance's mean and spread set to the dataset's typical ``levels`` (a
    colour cast, a haze, a brightness or contrast of its own go; texture
    and shapes stay); ``flat-grey``: one flat grey
    at the edited pixels' mean (texture, colour and anything drawn there go).
    """
    import cv2

    imgs = np.asarray(images)
    m = np.asarray(edit, bool)
    out = imgs.copy()
    for i in range(len(imgs)):
        if not m[i].any():
            continue
        img = imgs[i].astype(np.float32)
        if kind == "fine-blur":
            sigma = TEXTURE_SIGMA * max(imgs.shape[1], imgs.shape[2])
            new = cv2.GaussianBlur(img, (0, 0), sigma).reshape(img.shape)
        elif kind == "colour-levels":
            new = _colour_levels(img, m[i], levels)
        elif kind == "flat-grey":
            new = np.full_like(img, img[m[i]].mean())
        else:
            raise AuditError(f"unknown transform {kind!r}; expected one of {', '.join(TRANSFORMS.values())}")
        out[i][m[i]] = np.clip(np.rint(new[m[i]]), 0, 255).astype(imgs.dtype)
    return out


def spare_masks(size, object_masks=None, grids=None) -> np.ndarray | None:
    """(N, H, W) bool: where each image's object is taken to be, spared by the background transforms.

    With object masks: each mask dilated by :func:`dilation_px`.  Without:
    the cells of the image's own heatmap (``grids``, (N, g, g)) holding at
    least :data:`SPARE_HOT` of its maximum, at most the :data:`SPARE_MAX`
    strongest of its cells (a diffuse map would otherwise spare most of the
    image), grown by one cell, at ``size``.  None when neither is given.
    """
    import cv2

    h, w = int(size[0]), int(size[1])
    if object_masks is not None:
        m = np.asarray(object_masks, bool)
        d = dilation_px((h, w))
        k = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
        return np.stack([cv2.dilate(x.astype(np.uint8), k).astype(bool) for x in m]) if len(m) else m
    if grids is None:
        return None
    g = np.asarray(grids, np.float32)
    flat = g.reshape(len(g), -1)
    top = flat.max(axis=1) if flat.size else np.zeros(len(g), np.float32)
    k = max(1, int(math.ceil(SPARE_MAX * flat.shape[1]))) if flat.size else 1
    kth = -np.partition(-flat, k - 1, axis=1)[:, k - 1] if flat.size else top  # the k-th strongest value
    thr = np.maximum(SPARE_HOT * top, kth)[:, None, None]
    hot = (g >= thr) & (top[:, None, None] > 0)
    k = np.ones((3, 3), np.uint8)
    grown = [cv2.dilate(x.astype(np.uint8), k) for x in hot]
    return np.stack([cv2.resize(x, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) for x in grown]) \
        if len(grown) else np.zeros((0, h, w), bool)


def dilation_px(size) -> int:
    """Pixels by which an object mask grows before inpainting: about 3% of the side, at least 2."""
    return max(2, int(round(0.03 * max(size))))


def remove_objects(images: np.ndarray, masks: np.ndarray, dilate: int | None = None) -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 with the masked objects inpainted away.

    The mask is dilated by ``dilate`` pixels (default :func:`dilation_px`) so
    that the object's outline and anti-aliased edge go too, then filled by
    OpenCV's Telea inpainting from the surrounding background: no constant
    patch keeps the object's shape.  Images with an empty mask are unchanged.
    """
    import cv2

    imgs = np.asarray(images)
    m = np.asarray(masks, bool)
    d = dilation_px(imgs.shape[1:3]) if dilate is None else int(dilate)
    kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    radius = max(3, d)
    out = imgs.copy()
    for i in range(len(imgs)):
        if not m[i].any():
            continue
        grown = cv2.dilate(m[i].astype(np.uint8), kernel) if d > 0 else m[i].astype(np.uint8)
        img = np.ascontiguousarray(imgs[i])
        if img.ndim == 3 and img.shape[-1] in (1, 3):
            res = cv2.inpaint(img, grown, radius, cv2.INPAINT_TELEA)
        else:  # any other channel count: channel by channel
            res = np.stack([cv2.inpaint(np.ascontiguousarray(img[..., c]), grown, radius, cv2.INPAINT_TELEA)
                            for c in range(img.shape[-1])], axis=-1)
        out[i] = res.reshape(img.shape)
    return out


def replace_background(images: np.ndarray, masks: np.ndarray, backgrounds=None) -> tuple[np.ndarray, str]:
    """Copies of ``images`` that keep the masked object and take everything else from ``backgrounds``.

    ``backgrounds``: (K, H, W, C) images without objects (K >= 1), assigned to
    the images in turn; None or empty: each image's own background mean colour.
    Returns the images and the fill used (``other-background`` or ``neutral``).
    """
    imgs = np.asarray(images)
    m = np.asarray(masks, bool)
    out = imgs.copy()
    if backgrounds is not None and len(backgrounds):
        bg = np.asarray(backgrounds)
        for i in range(len(imgs)):
            out[i][~m[i]] = bg[i % len(bg)][~m[i]]
        return out, "other-background"
    for i in range(len(imgs)):
        rest = imgs[i][~m[i]]
        if len(rest):
            out[i][~m[i]] = np.round(rest.mean(axis=0)).astype(imgs.dtype)
    return out, "neutral"


# ----------------------------------------------------------------------------
# The bank of places
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spot:
    """A place to occlude: its name (``border:4%``, ``edge:top``, ``corner:top_left``,
    ``region:<name>``, ``hot area``), box (x0, y0, x1, y1 fractions; None for a band) and pixels."""

    name: str
    box: tuple | None
    mask: np.ndarray = field(repr=False, compare=False)

    @property
    def area(self) -> float:
        return float(self.mask.mean())


def _band(size, w: float) -> np.ndarray:
    from audit.engine.stats import border_mask

    return border_mask(size, w)


def place_bank(size, regions: dict | None = None, hot_box=None) -> list[Spot]:
    """The fixed places tested for every class, at the model input ``size`` (H, W).

    Border bands (:data:`BORDER_WIDTHS`), each edge (:data:`EDGE_WIDTH`),
    each corner (:data:`CORNER_SIDE`), each named region, and the class's
    hot area (``hot_box``) when given.
    """
    from audit.engine.stats import box_mask

    places = [Spot(f"border:{round(100 * w)}%", None, _band(size, w)) for w in BORDER_WIDTHS]
    e, c = EDGE_WIDTH, CORNER_SIDE
    boxes = {"edge:top": (0, 0, 1, e), "edge:bottom": (0, 1 - e, 1, 1), "edge:left": (0, 0, e, 1),
             "edge:right": (1 - e, 0, 1, 1),
             "corner:top_left": (0, 0, c, c), "corner:top_right": (1 - c, 0, 1, c),
             "corner:bottom_left": (0, 1 - c, c, 1), "corner:bottom_right": (1 - c, 1 - c, 1, 1)}
    for r, b in (regions or {}).items():
        boxes[f"region:{r}"] = tuple(float(v) for v in b)
    if hot_box is not None:
        boxes["hot area"] = tuple(float(v) for v in hot_box)
    for name, b in boxes.items():
        m = box_mask(b, size)
        if m.any():
            places.append(Spot(name, tuple(float(v) for v in b), m))
    return places


# ----------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaceFlip:
    """One test's result: ``test`` object | background | region, the ``place``, its ``box``,
    the ``fill``, the images tested ``n`` and the share whose prediction changed."""

    test: str
    place: str
    box: tuple | None
    fill: str
    n: int
    flip_rate: float
    area: float = math.nan  # share of the image the place covers
    transplant: float = math.nan  # share of other classes' images the place turns into the class (transplant.py)
    transplant_n: int = 0  # recipients of the transplant
    others_same: float = math.nan  # share of the recipients (other classes) that the same place, occluded, flips


@dataclass
class CausalResult:
    """All causal tests of one group's sample."""

    n: int  # images in the sample
    tests: list = field(default_factory=list)  # [PlaceFlip]
    masked: bool = False  # object masks were used (object and background tests, objects spared)
    absence: bool = False  # masks were used but no image of the sample has an object

    def get(self, test: str, place: str | None = None) -> PlaceFlip | None:
        return next((t for t in self.tests if t.test == test and (place is None or t.place == place)), None)

    def rate(self, test: str, place: str | None = None) -> float:
        """A test's flip rate (NaN when not run).  ``background``: the smaller of the neutral and the
        other-background rates, i.e. the background matters whichever way it is replaced."""
        if test == "background":
            rates = [t.flip_rate for t in self.tests if t.test == test and math.isfinite(t.flip_rate)]
            return min(rates) if rates else math.nan
        t = self.get(test, place)
        return t.flip_rate if t is not None else math.nan

    @property
    def places(self) -> list:
        return [t for t in self.tests if t.test == "region"]

    @property
    def transforms(self) -> list:
        return [t for t in self.tests if t.test == "transform"]


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
    total = sum(sizes)
    if total == 0:
        return [np.zeros(0, int) for _ in variants]
    preds = []
    buf, n_buf = [], 0
    for v in variants:
        for s in range(0, len(v), chunk):
            buf.append(v[s:s + chunk])
            n_buf += len(buf[-1])
            if n_buf >= chunk:
                preds.append(np.asarray(predict_fn(np.concatenate(buf))))
                buf, n_buf = [], 0
    if buf:
        preds.append(np.asarray(predict_fn(np.concatenate(buf))))
    allp = np.concatenate(preds)
    return np.split(allp, np.cumsum(sizes)[:-1])


def causal_tests(predict_fn, images, places, object_masks=None, *, classes=None, backgrounds=None,
                 background_classes=None, fill: str = "mean", base_pred=None, chunk: int = CHUNK,
                 screen: int = SCREEN, screen_min: float = SCREEN_MIN, spare=None,
                 levels: Levels | None = None, recipients=None, target: int | None = None) -> CausalResult:
    """Run the object, background, background-transform and place tests on one sample.

    Every test is screened first on the sample's first ``screen`` images;
    only a place that flips at least ``screen_min`` of them is tested on the
    rest (a place that flips nothing on 8 images is no cue, and most places of
    most classes flip nothing), and the object and background tests only
    while the background rule could still hold (see :func:`_promising`).  A
    healthy class then costs about ``screen x tests`` forward passes instead of
    ``sample x tests``.

    Args:
        predict_fn: uint8 images (N, H, W, C) -> predictions (N,) class ids, or (N, C) bool.
        images: (N, H, W, C) uint8 at the model input size.
        places: the :class:`Spot` bank.
        object_masks: None (no masks: place tests only) or (N, H, W) bool; an
            all-False mask means no object in that image (left out of the
            object and background tests).  Object pixels are spared by every
            place test.
        classes: (N,) class of each image (multi-label predictions only).
        backgrounds: object-free images for the background test (see
            :func:`replace_background`), assigned in turn.
        background_classes: the class of each background; the background
            flip rate is then the median over these classes of the rate with
            that class's backgrounds, so that one other class's own shortcut
            (its texture, its sky) does not pass for this class's.
        fill: ``mean`` or ``blur`` for the places.
        base_pred: predictions on the unmodified images (computed when None).
        chunk: images per ``predict_fn`` call.
        screen, screen_min: the screening of the places (``screen=0``: none).
        spare: (N, H, W) bool, where each object is taken to be
            (:func:`spare_masks`); the background transforms edit the rest.
            None: no transform tests.
        levels: the dataset's typical image (:class:`Levels`) for the colour transform.
        recipients: images of other classes (:class:`audit.scan.transplant.Recipients`) that receive
            the places that flipped the sample (the transplant test), or None.
        target: the sample's class id (for the transplant).

    Returns:
        A :class:`CausalResult`; a rate is NaN with fewer than :data:`MIN_SAMPLE` testable images.
    """
    images = np.asarray(images)
    n = len(images)
    obj = None if object_masks is None else np.asarray(object_masks, bool)
    tests = _make_tests(n, obj, places, fill, backgrounds, spare, levels)
    cls = None if classes is None else np.asarray(classes)
    first = np.arange(n) < (screen if 0 < screen < n else n)
    run = _Runner(predict_fn, images, obj, cls, backgrounds, chunk, base_pred)
    run.stage(tests, [t.sel & first for t in tests])  # stage 1: every test on the first images
    rest = [t.sel & ~first if go else np.zeros(n, bool) for t, go in zip(tests, _promising(tests, screen_min))]
    run.stage(tests, rest)  # stage 2: the promising tests on the rest
    if recipients is not None and target is not None:  # stage 3: do the flipping places carry the class?
        tests += _transplants(predict_fn, images, tests, recipients, int(target), chunk, spare, obj is None)
    has_obj = obj.reshape(n, -1).any(axis=1) if obj is not None else np.zeros(n, bool)
    out = CausalResult(n=n, masked=obj is not None, absence=obj is not None and not has_obj.any())
    out.tests = [t.result(obj, background_classes, backgrounds) for t in tests]
    return out


def _make_tests(n: int, obj, places, fill: str, backgrounds, spare, levels=None) -> list:
    """The tests of one sample, each with the images it can edit."""
    has_obj = obj.reshape(n, -1).any(axis=1) if obj is not None else np.zeros(n, bool)
    tests = [_Test("object", "object", None, OBJECT_FILL, has_obj),
             _Test("background", "background", None, "neutral", has_obj)] if obj is not None else []
    if obj is not None and backgrounds is not None and len(backgrounds):
        tests.append(_Test("background", "background", None, "other-background", has_obj))
    if spare is not None:
        spare = np.asarray(spare, bool)
        if obj is None:  # the object test without masks: each image's own hot area removed
            tests.append(_Test("object", HOT_OBJECT, None, OBJECT_FILL, spare.reshape(n, -1).any(axis=1), spare,
                               float(spare.mean())))
        for place, kind in TRANSFORMS.items():
            edit = np.ones_like(spare) if place.startswith("image:") else ~spare
            tests.append(_Test("transform", place, None, kind, edit.reshape(n, -1).any(axis=1), edit,
                               float(edit.mean()), levels=levels))
    for p in places:
        m = np.broadcast_to(p.mask, (n, *p.mask.shape))
        m = m & ~obj if obj is not None else m
        tests.append(_Test("region", p.name, p.box, fill, m.reshape(n, -1).any(axis=1), m, p.area))
    return tests


def _transplants(predict_fn, images, tests: list, recipients, target: int, chunk: int, spare,
                 unmasked: bool) -> list:
    """Transplant the places that flipped the sample (their results go into those tests); without
    masks also the background, while removing the hot area changed little: that test is returned."""
    found = transplant_places(predict_fn, images, tests, recipients, target, chunk)
    for t in tests:
        t.transplant = found.get(id(t))
    obj = next((t for t in tests if t.test == "object"), None)
    if not unmasked or spare is None or obj is None or not obj.rate() <= BACKGROUND_OBJECT_MAX:
        return []
    tr = transplant_background(predict_fn, images, spare, recipients, target, chunk)
    if tr is None:
        return []
    t = _Test("transplant", "background", None, "pasted", np.zeros(len(images), bool), area=math.nan)
    t.transplant = tr
    return [t]


class _Runner:
    """Edits and predicts the selected images of the tests of one sample, stage by stage."""

    def __init__(self, predict_fn, images, obj, cls, backgrounds, chunk: int, base_pred=None):
        self.predict_fn, self.images, self.obj, self.cls = predict_fn, images, obj, cls
        self.backgrounds, self.chunk = backgrounds, chunk
        self.base = None if base_pred is None else np.asarray(base_pred)
        self.known = np.ones(len(images), bool) if base_pred is not None else np.zeros(len(images), bool)

    def stage(self, tests: list, selections: list) -> None:
        """Predict the unmodified images that are needed and not known, then every test's edits."""
        need = np.logical_or.reduce(selections) & ~self.known if selections else np.zeros(0, bool)
        if need.any():  # predictions on the unmodified images, as far as they are needed
            self.base = _base(self.predict_fn, self.images, need, self.base)
            self.known |= need
        _run(self.predict_fn, self.images, self.obj, tests, selections, self.base, self.cls, self.backgrounds,
             self.chunk)


@dataclass
class _Test:
    """One test of :func:`causal_tests` while it runs: which images it may edit and the flips so far."""

    test: str
    place: str
    box: tuple | None
    fill: str
    sel: np.ndarray  # (N,) images it can test
    mask: np.ndarray | None = None  # (N, H, W) pixels to occlude (region tests)
    area: float = math.nan
    flips: dict = field(default_factory=dict)  # image index -> flipped
    levels: Levels | None = None  # the dataset's typical image (the colour transform)
    transplant: object = None  # audit.scan.transplant.Transplant, for the places that flipped the sample

    def rate(self) -> float:
        return float(np.mean(list(self.flips.values()))) if self.flips else math.nan

    def promising(self, screen_min: float) -> bool:
        if len(self.flips) < MIN_SAMPLE:  # too few screened: test the rest
            return True
        return self.rate() >= screen_min

    def result(self, obj, background_classes, backgrounds) -> PlaceFlip:
        idx = np.array(sorted(self.flips), int)
        f = np.array([self.flips[i] for i in idx], bool)
        area = self.area
        if self.test in ("object", "background") and obj is not None and self.sel.any():
            area = float(obj[self.sel].mean()) if self.test == "object" else float(1 - obj[self.sel].mean())
        k = len(f)
        rate = float(f.mean()) if k >= MIN_SAMPLE else math.nan
        if k >= MIN_SAMPLE and self.fill == "other-background" and background_classes is not None:
            rate = _median_by_donor(f, idx, np.asarray(background_classes), len(backgrounds))
        tr = self.transplant
        if self.test == "transplant":  # its rate is the transplant's: other classes' images turned into this one
            return PlaceFlip(self.test, self.place, None, self.fill, tr.n, tr.rate, area, tr.rate, tr.n)
        return PlaceFlip(self.test, self.place, self.box, self.fill, k if k >= MIN_SAMPLE else 0, rate, area,
                         tr.rate if tr is not None else math.nan, tr.n if tr is not None else 0,
                         tr.occluded if tr is not None else math.nan)


def _edit(t: _Test, images, obj, rows: np.ndarray, backgrounds) -> np.ndarray:
    if t.test == "object" and t.place == HOT_OBJECT:  # the spared area, already grown
        return remove_objects(images[rows], t.mask[rows], dilate=0)
    if t.test == "object":
        return remove_objects(images[rows], obj[rows])
    if t.test == "background":
        bg = None if t.fill == "neutral" else \
            np.asarray(backgrounds)[np.nonzero(t.sel)[0].searchsorted(rows) % len(backgrounds)]
        return replace_background(images[rows], obj[rows], bg)[0]
    if t.test == "transform":
        return transform(images[rows], t.mask[rows], t.fill, t.levels)
    return occlude(images[rows], t.mask[rows], t.fill)


def _base(predict_fn, images, rows: np.ndarray, base):
    """Predictions on the unmodified ``images[rows]`` merged into ``base`` (created when None)."""
    pred = np.asarray(predict_fn(images[rows]))
    if base is None:
        base = np.zeros((len(images), *pred.shape[1:]), pred.dtype)
    base[rows] = pred
    return base


def _promising(tests: list, screen_min: float) -> list[bool]:
    """Which tests go on to the rest of the sample after the screening.

    A place: when it flipped at least ``screen_min`` of the screened images
    (every named region, and the :data:`MAX_PROMISING` other places that
    flipped most, the smallest first: a corner tag also flips the edges and
    bands that contain it).
    A background transform: when it flipped at least ``screen_min``.
    The background tests: the same, and only while the object test could still
    come out low (at most :data:`OBJECT_SCREEN_MAX`): the background rule
    needs both.  The object test: when a background test or a transform goes on
    (a background transform counts only while removing the object changes little).
    """
    obj = next((t for t in tests if t.test == "object"), None)
    obj_low = obj is None or len(obj.flips) < MIN_SAMPLE or obj.rate() <= OBJECT_SCREEN_MAX
    places = [t for t in tests if t.test == "region" and t.promising(screen_min)]
    # the named regions, and at most MAX_PROMISING other places: the most flipping, the smallest first
    ranked = sorted((t for t in places if not t.place.startswith("region:")),
                    key=lambda t: (-(t.rate() if math.isfinite(t.rate()) else 1.0), t.area))
    keep = {id(t) for t in places if t.place.startswith("region:")} | {id(t) for t in ranked[:MAX_PROMISING]}
    go = []
    for t in tests:
        if t.test == "region":
            go.append(id(t) in keep)
        elif t.test == "transform":
            go.append(t.promising(screen_min))
        elif t.test == "background":
            go.append(obj_low and t.promising(screen_min))
        else:
            go.append(None)
    bg_go = any(g for t, g in zip(tests, go) if t.test in ("background", "transform"))
    return [bg_go if g is None else g for g in go]


def _run(predict_fn, images, obj, tests, selections, base, cls, backgrounds, chunk) -> None:
    """Edit and predict the selected images of every test (one predict call per chunk); record flips."""
    jobs = [(t, np.nonzero(sel)[0]) for t, sel in zip(tests, selections) if sel.any()]
    if not jobs:
        return
    preds = predict_chunks(predict_fn, [_edit(t, images, obj, rows, backgrounds) for t, rows in jobs], chunk)
    for (t, rows), pred in zip(jobs, preds):
        f = flipped(base[rows], pred, None if cls is None else cls[rows])
        t.flips.update(zip(rows.tolist(), f.tolist()))


def _median_by_donor(flips: np.ndarray, rows: np.ndarray, donor_class: np.ndarray, k: int) -> float:
    """Median over donor classes of the flip rate with that class's backgrounds.

    The j-th tested image (``rows`` in order) got background ``j % k``.
    """
    got = donor_class[np.arange(len(rows)) % k]
    return float(np.median([flips[got == c].mean() for c in np.unique(got)]))


def extra_forwards(n: int, n_places: int, masked: bool, screen: int = SCREEN) -> int:
    """Forward passes :func:`causal_tests` costs for a sample of ``n``, planned: every test on the
    screening images (the object test: with masks and, as the own hot area, without; the two
    background tests with masks; the transforms; the places), and the base and about
    :data:`PROMISING` tests on the rest."""
    k = min(n, screen) if screen > 0 else n
    return k * (1 + (3 if masked else 1) + len(TRANSFORMS) + n_places) + (n - k) * (1 + min(PROMISING, n_places))


# ----------------------------------------------------------------------------
# A finished job's model and data
# ----------------------------------------------------------------------------


class Intervener:
    """The model, head and dataset of a finished job (``OUT/job.json``), for :func:`causal_tests`.

    The model is loaded lazily, once, on first use.
    """

    def __init__(self, out_dir, *, fill: str = "mean", batch_size: int = BATCH):
        from audit.data import fs, io

        self.out = str(out_dir) if fs.is_uri(str(out_dir)) else Path(out_dir)
        job = io.read_job(self.out)
        if job is None:
            raise AuditError(f"{io.job_path(self.out)} not found: intervention needs the job's model and dataset")
        self.job = job
        self.spec = self.job.get("spec") or {}
        self.fill = fill
        self.batch_size = batch_size
        self._model = None
        self._head = None
        self._size = None
        self._predict = None
        self.forwards = 0  # images predicted so far (the cost of the tests)

    @property
    def size(self) -> tuple[int, int]:
        if self._size is None:
            size = self.job.get("input_size") or (self.spec.get("model") or {}).get("input_size")
            if size:
                self._size = (int(size[0]), int(size[1]))
            else:
                from audit.engine.models import input_size_of

                self._size = input_size_of(self.model)
        return self._size

    @property
    def model(self):
        if self._model is None:
            from audit.data import fs
            from audit.engine.models import load_model

            m = self.spec.get("model") or {}
            path = fs.local_copy(m["path"]) if fs.is_uri(m.get("path")) else m.get("path")
            self._model = load_model(path, application=m.get("application"),
                                     weights=m.get("weights"), input_size=m.get("input_size"),
                                     num_classes=m.get("num_classes"),
                                     trust_code=bool(m.get("trust_code")))
        return self._model

    @property
    def head(self):
        """The model's classifier head: how its outputs become class ids (binary and multi-label too)."""
        if self._head is None:
            from audit.engine.heads import Head

            self._head = Head.of(self.model, (self.spec.get("model") or {}).get("output"))
        return self._head

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predictions for uint8 RGB images at the input size: (N,) ids, or (N, C) bool (multi-label)."""
        from audit.engine.models import model_input

        if self._predict is None:
            self._predict = CompiledPredict(self.model, self.head, self.batch_size)
        mode = (self.spec.get("model") or {}).get("preprocess", "none")
        self.forwards += len(images)
        return self._predict(model_input(images, self.model.inputs[0].shape[-1], mode))

    def load(self, image_ids):
        """(images, object masks or None) of the sample at the model input size."""
        from audit.data.datasets import load_images

        images, masks, has_mask = load_images(self.spec, list(image_ids), self.size)
        if masks is not None:
            masks = masks & np.asarray(has_mask, bool)[:, None, None]
        return images, masks


class CompiledPredict:
    """A model's predictions through one compiled graph, traced once for any batch size (an eager
    Keras call costs several times a compiled one on small models)."""

    def __init__(self, model, head, batch: int = BATCH):
        import tensorflow as tf

        self.head, self.batch = head, int(batch)
        shape = [None, *[int(d) if d is not None else None for d in model.inputs[0].shape[1:]]]
        # one trace for every batch size (a None batch dimension)
        self._fn = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec(shape, tf.float32)])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(x), self.batch):
            part = np.asarray(x[s:s + self.batch], np.float32)
            k = len(part)
            y = self._fn(part)
            y = [np.asarray(t)[:k] for t in y] if isinstance(y, (list, tuple)) else \
                ({n: np.asarray(t)[:k] for n, t in y.items()} if isinstance(y, dict) else np.asarray(y)[:k])
            out.append(self.head.predict(y))
        return np.concatenate(out) if out else np.zeros(0, int)


class SafeIntervener:
    """An intervention that cannot run (model or data moved) warns once; later calls return None."""

    def __init__(self, inner, quiet: bool):
        self.inner, self.quiet, self.failed = inner, quiet, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def call(self, fn, *a, **k):
        """``fn(*a, **k)``, or None once the job's model or data could not be loaded."""
        if self.failed:
            return None
        try:
            return fn(*a, **k)
        except AuditError as e:
            self.failed = str(e)
            if not self.quiet:
                import sys

                print(f"audit: scan: causal tests skipped ({e})", file=sys.stderr)
            return None
