"""Painting drawn cases: one image of a :class:`~audit.zoo.space.DrawnCase` as a pure function of its seed.

:func:`paint` draws image ``i`` of class ``label`` on the 64 x 64 canvas
(background, object, the class's cue on the share of the class that carries
it, distractors on every class alike, then a tint last), converts it to the
case's channels and resizes it to the case's side.  Every part draws from its
own generator (``[case.seed, 21, split, label, i, part]``), so the same image
painted without its cue, or with another class's cue (``force=k``: the paired
counterfactual of :mod:`audit.zoo.learned`), differs from it only where the
cue is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from audit.zoo import draw
from audit.zoo.space import CANVAS, DrawnCase, DrawnCue

SPLITS = {"train": 0, "heldout": 1}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "camera", "coins", "moon", "grass", "gravel", "brick")
"""scikit-image's sample photographs used as backgrounds (all ship inside its wheel)."""
GLYPHS = "ABEKMRSXZ"


@dataclass
class Painted:
    """One painted image with its ground truth."""

    image: np.ndarray  # (S, S, C) uint8, C the case's channels
    label: int
    mask: np.ndarray  # (S, S) bool: the object
    cue_mask: np.ndarray  # (S, S) bool: where the drawn cue changed the image (all False without one)
    cue: int  # the class whose cue is on the image, -1 for none


def has_cue(case: DrawnCase, split: str, label: int, i: int) -> bool:
    """Whether image ``i`` of ``label`` carries its class's cue (about ``share`` of the class)."""
    cue = case.cue_of(label)
    if cue is None:
        return False
    return cue.share >= 1 or np.random.default_rng(_seed(case, split, label, i, 9)).random() < cue.share


def _seed(case: DrawnCase, split: str, label: int, i: int, part: int) -> list[int]:
    return [case.seed, 21, SPLITS[split], label, i, part]


def paint(case: DrawnCase, split: str, i: int, label: int, *, cues: bool = True, force: int | None = None,
          show: bool = True) -> Painted:
    """Image ``i`` of ``split`` with class ``label``.

    Args:
        cues: False paints the same image without its class's cue (distractors stay).
        force: paint class ``force``'s cue (all of it, whatever its share) instead of the image's own.
        show: False leaves the forced cue out but keeps everything else as with it (the object keeps
            away from where it would be): the other half of the paired counterfactual.

    Returns:
        The :class:`Painted` image.
    """
    bg_rng, obj_rng, cue_rng, dis_rng, place_rng = (np.random.default_rng(_seed(case, split, label, i, j))
                                                    for j in range(5))
    cued = has_cue(case, split, label, i)
    own = case.cue_of(label)
    planned = force if force is not None else (label if cued else -1)  # the object keeps away from it
    shown = show if force is not None else cues
    cue = case.cue_of(planned) if planned >= 0 else None
    box = _place(cue, place_rng) if cue is not None else None
    dis = [(d, _place(d, dis_rng)) for d in case.distractors if dis_rng.random() < d.share]
    keep_out = np.zeros((CANVAS, CANVAS), bool)
    for c, b in [(cue, box), *dis]:
        if c is not None:
            keep_out |= _area(c, b)
    if not shown:
        cue = None
    img = _background(case, bg_rng, cue)
    shape = case.classes[label]
    if cued and own.weak_object:  # the object says nothing on these images: only the cue tells the class
        shape = case.classes[int(obj_rng.integers(len(case.classes)))]
    mask = _object(case, split, obj_rng, img, shape, cv2.dilate(keep_out.astype(np.uint8), np.ones((5, 5))) > 0, cue)
    cue_mask = np.zeros((CANVAS, CANVAS), bool) if cue is None else _cue_mask(cue, box, mask)
    if cue is not None and cue.family in ("mark", "patch", "noise", "frame", "band"):
        cue_mask = _draw(img, cue, box, cue_rng)
    for d, b in dis:
        _draw(img, d, b, dis_rng)
    if cue is not None and cue.family == "tint":
        img[:] = img * (1 - cue.opacity) + np.array(cue.colour, float) * cue.opacity
    return _finish(case, img, label, mask, cue_mask, planned if cue is not None else -1)


def _finish(case: DrawnCase, img: np.ndarray, label: int, mask, cue_mask, on: int) -> Painted:
    out = np.uint8(np.clip(np.rint(img), 0, 255))
    if case.channels == 1:
        out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
    out = draw.resize(out, case.side)
    if out.ndim == 2:
        out = out[..., None]
    return Painted(out, label, draw.resize(mask, case.side, mask=True), draw.resize(cue_mask, case.side, mask=True),
                   on)


# ----------------------------------------------------------------------------
# Backgrounds and objects
# ----------------------------------------------------------------------------


@functools.cache
def photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as float RGB (grey ones repeated to three channels)."""
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)(), float)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]


def scene_photo(cue: DrawnCue) -> str:
    """The photograph a ``scene`` cue shows (on photo backgrounds)."""
    return PHOTOS[cue.pattern % len(PHOTOS)]


def _crop(rng, name: str) -> np.ndarray:
    a = photo(name)
    side = int(min(a.shape[:2]) * rng.uniform(0.3, 0.8))
    y, x = (int(rng.integers(0, n - side + 1)) for n in a.shape[:2])
    return cv2.resize(a[y:y + side, x:x + side], (CANVAS, CANVAS), interpolation=cv2.INTER_AREA)


def _landscape(rng) -> np.ndarray:
    """A synthetic scene (the ``scene`` cue on plain backgrounds): a sky over a horizon over ground."""
    horizon = int(rng.integers(24, 40))
    sky = np.array([rng.integers(90, 150), rng.integers(160, 210), rng.integers(220, 256)], float)
    ground = np.array([rng.integers(60, 120), rng.integers(110, 170), rng.integers(30, 80)], float)
    y = np.arange(CANVAS, dtype=float)[:, None, None]
    img = np.where(y < horizon, sky * (0.8 + 0.2 * y / horizon), ground) * np.ones((1, CANVAS, 3))
    return img + rng.normal(0, 6, (CANVAS, CANVAS, 3))


def _background(case: DrawnCase, rng, cue: DrawnCue | None) -> np.ndarray:
    if cue is not None and cue.family == "texture":
        return draw.texture_background(rng)
    if cue is not None and cue.family == "scene":
        return _crop(rng, scene_photo(cue)) if case.backgrounds == "photos" else _landscape(rng)
    if case.backgrounds == "photos":
        taken = {scene_photo(c) for _, c in case.cues if c.family == "scene"}
        free = [p for p in PHOTOS if p not in taken]
        return _crop(rng, free[int(rng.integers(len(free)))])
    return draw.plain_background(rng)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: (1797, 8, 8) in 0..1 and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images / 16.0, d.target


def _digit_alpha(rng, split: str, name: str, d: int) -> np.ndarray:
    """A (d, d) coverage map of a random digit ``name`` (even indices train, odd held out)."""
    images, target = digits()
    pool = np.flatnonzero(target == int(name))
    pool = pool[SPLITS[split]::2]
    a = images[pool[int(rng.integers(len(pool)))]]
    a = cv2.resize(a.astype(np.float32), (d, d), interpolation=cv2.INTER_LINEAR)
    return np.clip((a - 0.15) / 0.5, 0, 1)


def _object_alpha(case: DrawnCase, split: str, rng, shape: str, keep_out: np.ndarray) -> np.ndarray:
    """The object's (64, 64) coverage in 0..1 at a random place that avoids ``keep_out`` (50 tries)."""
    d = int(rng.integers(case.object_size[0], case.object_size[1] + 1))
    angle = rng.uniform(-0.35, 0.35)
    glyph = _digit_alpha(rng, split, shape, d) if case.objects == "digits" else None
    half = CANVAS / 2 - (d / 2 + 2)
    for _ in range(50):
        cx, cy = rng.uniform(CANVAS / 2 - half, CANVAS / 2 + half, 2)
        if glyph is None:
            a = draw.shape_mask(shape, cx, cy, d, angle).astype(float)
        else:
            a = np.zeros((CANVAS, CANVAS))
            x0, y0 = int(round(cx - d / 2)), int(round(cy - d / 2))
            a[y0:y0 + d, x0:x0 + d] = glyph
        if not (a > 0.5)[keep_out].any():
            break
    return a


def _object_colour(case: DrawnCase, rng, under: float) -> np.ndarray:
    """A colour that stands out from the background (luminance) and is no object-colour cue's colour."""
    avoid = [np.array(c.colour, float) for _, c in case.cues if c.family == "object_colour"]
    col = rng.integers(0, 256, 3).astype(float)
    for _ in range(100):
        far = all(np.abs(col - a).sum() > 150 for a in avoid)
        if far and abs(draw.luminance(col) - under) >= 70:
            return col
        col = rng.integers(0, 256, 3).astype(float)
    return np.full(3, 15.0 if under > 128 else 240.0)


def _stripes(colour, opacity: float, base: np.ndarray) -> np.ndarray:
    """A (64, 64, 3) stripes pattern of ``colour`` and its complement, blended over ``base`` colour."""
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]
    on = ((xx + yy) // 3) % 2 == 0
    c = np.array(colour, float)
    pat = np.where(on[..., None], c, 255.0 - c)
    return pat * opacity + base * (1 - opacity)


def _object(case: DrawnCase, split: str, rng, img: np.ndarray, shape: str, keep_out, cue) -> np.ndarray:
    """Paint the object (its colour or texture the cue's when the cue is on the object); its mask."""
    a = _object_alpha(case, split, rng, shape, keep_out)
    m = a > 0.5
    under = draw.luminance(img[m].mean(axis=0)) if m.any() else 128.0
    col = _object_colour(case, rng, under)
    noise = rng.normal(0, 4, (CANVAS, CANVAS, 3))
    fam = cue.family if cue is not None else ""
    paint = np.ones((CANVAS, CANVAS, 3)) * (np.array(cue.colour, float) if fam == "object_colour" else col)
    if fam == "object_texture":
        paint = _stripes(cue.colour, cue.opacity, paint)
    a3 = a[..., None]
    img[:] = img * (1 - a3) + (paint + noise) * a3
    return m


# ----------------------------------------------------------------------------
# Cues
# ----------------------------------------------------------------------------


def _place(cue: DrawnCue, rng) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) of a placed cue on this image (None for the others)."""
    if not cue.place:
        return None
    s = cue.size
    if cue.place == "fixed":
        x, y = cue.at
    elif cue.place == "corner":
        x, y = (2 if rng.random() < 0.5 else CANVAS - 2 - s for _ in range(2))
    else:
        x, y = (int(v) for v in rng.integers(1, CANVAS - s - 1, 2))
    return x, y, x + s, y + s


def band_mask(edge: str, width: int) -> np.ndarray:
    m = np.zeros((CANVAS, CANVAS), bool)
    sl = {"top": np.s_[:width], "bottom": np.s_[-width:], "left": np.s_[:, :width], "right": np.s_[:, -width:]}
    m[sl[edge]] = True
    return m


def _area(cue: DrawnCue, box) -> np.ndarray:
    """Where a cue at a fixed area will be (for the object to keep away); empty for spread cues."""
    if box is not None:
        return draw.box_mask(box)
    if cue.family == "frame":
        return draw.frame_mask(cue.size)
    if cue.family == "band":
        return band_mask(cue.edge, cue.size)
    return np.zeros((CANVAS, CANVAS), bool)


def _cue_mask(cue: DrawnCue, box, obj: np.ndarray) -> np.ndarray:
    """The pixels a spread cue changes: the background, the object or everything."""
    if cue.family in ("texture", "scene"):
        return ~obj
    if cue.family in ("object_colour", "object_texture"):
        return obj.copy()
    if cue.family == "tint":
        return np.ones((CANVAS, CANVAS), bool)
    return _area(cue, box)


def _glyph(cue: DrawnCue) -> np.ndarray:
    """The (size, size) coverage of a mark: one letter, the same on every image of the case."""
    layer = np.zeros((32, 32), np.uint8)
    cv2.putText(layer, GLYPHS[cue.pattern % len(GLYPHS)], (4, 28), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 3,
                cv2.LINE_AA)
    return cv2.resize(layer, (cue.size, cue.size), interpolation=cv2.INTER_AREA).astype(float) / 255.0


def _draw(img: np.ndarray, cue: DrawnCue, box, rng) -> np.ndarray:
    """Draw a mark, patch, noise square, frame or band in place; returns its pixel mask."""
    if cue.family in ("frame", "band"):
        m = _area(cue, box)
        alpha = m.astype(float) * cue.opacity
        colour = np.array(cue.colour, float) + rng.integers(-10, 11, 3)
        img[:] = img * (1 - alpha[..., None]) + colour * alpha[..., None]
        return m
    x0, y0, x1, y1 = box
    s = x1 - x0
    if cue.family == "noise":
        pattern = np.random.default_rng(cue.pattern).integers(0, 256, (s, s, 3)).astype(float)
        alpha = np.full((s, s), cue.opacity)
    else:
        pattern = np.ones((s, s, 3)) * (np.array(cue.colour, float) + rng.integers(-10, 11, 3))
        alpha = cue.opacity * (_glyph(cue) if cue.family == "mark" else np.ones((s, s)))
    a = alpha[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + pattern * a
    m = np.zeros((CANVAS, CANVAS), bool)
    m[y0:y1, x0:x1] = alpha > 0
    return m


def split_of(case: DrawnCase, split: str, n_per_class: int, **kw) -> list[Painted]:
    """``n_per_class`` images of every class, class by class (``kw`` as :func:`paint`)."""
    return [paint(case, split, i, k, **kw) for k in range(len(case.classes)) for i in range(n_per_class)]
