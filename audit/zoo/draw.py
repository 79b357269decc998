"""Drawing for the zoo: backgrounds, objects (the true class signal) and planted cues.

Everything works on a (64, 64, 3) float64 RGB canvas in 0..255 and draws with
OpenCV; a function that takes ``rng`` draws from it and from nothing else, so
an image is a pure function of its seed.  A case of another image size is
drawn at 64 x 64 and resized (:func:`resize`).  Coordinates are pixels; a box is
``(x0, y0, x1, y1)`` with exclusive right/bottom ends.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SIZE = 64
SHAPES = ("disc", "triangle", "square", "cross")
SHAPES6 = SHAPES + ("ring", "bar")  # the six-class cases
PLAIN_BACKGROUNDS = ("plain", "gradient", "blobs")
TEXTURES = ("stripes",)  # the family a texture cue draws from (every image a different one)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
WATERMARK_TEXT = "ZOO"
STAMP_SIDE = 7
FRAME_WIDTH = 2  # about 3% of the side
TINT_COLOUR = (255.0, 150.0, 40.0)  # the colour a tint cue blends every pixel towards ...
TINT_ALPHA = 0.45  # ... by this much
PATCH_SIDE = 6  # a patch cue: a solid square of this side ...
NOISE_SIDE = 8  # a noise cue: a square of random pixels of this side ...
SPOTS = {"left": (3, 29), "right": (55, 29), "top": (29, 3), "bottom": (29, 55), "inner": (29, 16)}
"""... with its top-left pixel here (a patch is centred in the same place as a noise square): the middle
of an edge, 3 px in, or ``inner``, on no edge or corner of the scan's bank (x 0.45-0.55, y 0.25-0.34)."""
SKY_COLOUR = (120.0, 185.0, 250.0)  # a sky cue blends the top of the background towards this blue ...
SKY_DEPTH = 0.45  # ... fading out at this fraction of the height ...
SKY_ALPHA = 0.8  # ... from this much at the top row


def luminance(rgb) -> float:
    r, g, b = np.asarray(rgb, float)[..., :3].T
    return float(np.mean(0.299 * r + 0.587 * g + 0.114 * b))


# ----------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------


def _colour(rng, lo: int = 30, hi: int = 226) -> np.ndarray:
    return rng.integers(lo, hi, 3).astype(float)


def plain_background(rng) -> np.ndarray:
    """One of the plain family: a flat colour, a linear gradient or soft blobs (all with fine noise)."""
    kind = PLAIN_BACKGROUNDS[int(rng.integers(len(PLAIN_BACKGROUNDS)))]
    a = _colour(rng)
    if kind == "plain":
        img = np.ones((SIZE, SIZE, 1)) * a
    elif kind == "gradient":
        b = np.clip(a + rng.integers(-60, 61, 3), 0, 255)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
        t = np.clip(0.5 + xx * math.cos(ang) + yy * math.sin(ang), 0, 1)[..., None]
        img = a * (1 - t) + b * t
    else:
        low = cv2.GaussianBlur(rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32), (0, 0), 6.0)
        low = low / (np.abs(low).max() + 1e-6)
        img = a + 40 * low[..., None] * np.array([1.0, 0.8, 0.6])
    return img + rng.normal(0, 3, (SIZE, SIZE, 3))


def texture_background(rng) -> np.ndarray:
    """A stripes texture with its own angle, period and two colours: every call a different one."""
    a, b = _colour(rng), _colour(rng)
    while np.abs(a - b).sum() < 120:
        b = _colour(rng)
    ang = rng.uniform(0, math.pi)
    period = rng.uniform(3.5, 7.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    phase = (xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period + rng.uniform(0, 2 * math.pi)
    t = (0.5 + 0.5 * np.sin(phase))[..., None]
    return a * (1 - t) + b * t + rng.normal(0, 3, (SIZE, SIZE, 3))


# ----------------------------------------------------------------------------
# Objects
# ----------------------------------------------------------------------------


def shape_mask(shape: str, cx: float, cy: float, d: float, angle: float) -> np.ndarray:
    """(64, 64) bool mask of ``shape`` centred at (cx, cy) with diameter ``d`` px, turned by ``angle`` rad."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    r = d / 2
    if shape == "disc":
        cv2.circle(m, (round(cx), round(cy)), max(1, round(r)), 1, -1)
        return m.astype(bool)
    if shape == "ring":  # an annulus: a disc with a hole of half its diameter
        cv2.circle(m, (round(cx), round(cy)), max(2, round(r)), 1, -1)
        cv2.circle(m, (round(cx), round(cy)), max(1, round(r / 2)), 0, -1)
        return m.astype(bool)
    if shape == "triangle":
        pts = [(r * math.cos(angle + k * 2 * math.pi / 3 - math.pi / 2),
                r * math.sin(angle + k * 2 * math.pi / 3 - math.pi / 2)) for k in range(3)]
    elif shape == "square":
        s = r / math.sqrt(2) * 1.15
        pts = [(s * math.cos(angle + math.pi / 4 + k * math.pi / 2), s * math.sin(angle + math.pi / 4 + k * math.pi / 2))
               for k in range(4)]
    elif shape == "bar":  # a thick bar, a third as wide as it is long
        w = max(1.0, d / 6)
        c, s_ = math.cos(angle), math.sin(angle)
        pts = [(x * c - y * s_, x * s_ + y * c) for x, y in ((-r, -w), (r, -w), (r, w), (-r, w))]
    elif shape == "cross":
        w = max(1.0, d * 0.16)
        arm = [(-r, -w), (r, -w), (r, w), (-r, w)]
        for rot in (angle, angle + math.pi / 2):
            c, s_ = math.cos(rot), math.sin(rot)
            poly = np.array([[cx + x * c - y * s_, cy + x * s_ + y * c] for x, y in arm])
            cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
        return m.astype(bool)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    poly = np.array([[cx + x, cy + y] for x, y in pts])
    cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
    return m.astype(bool)


def draw_object(rng, img: np.ndarray, shape: str, size: tuple[int, int], keep_out: np.ndarray,
                spread: float = 1.0) -> np.ndarray:
    """Draw ``shape`` (random place, size in ``size`` px, angle, colour) in place; return its mask.

    The colour differs from the background under it by at least 70 in
    luminance; the object avoids ``keep_out`` (a bool mask of cue pixels,
    dilated) when a place that does is found in 50 tries.  ``spread``: the
    share of the free range around the image centre the object's centre may
    take (1: anywhere it fits; 0.2: near the centre, as in many photo datasets).
    """
    d = float(rng.integers(size[0], size[1] + 1))
    half = (SIZE / 2 - (d / 2 + 3)) * spread
    angle = rng.uniform(-0.35, 0.35)
    for _ in range(50):
        cx, cy = rng.uniform(SIZE / 2 - half, SIZE / 2 + half, 2)
        m = shape_mask(shape, cx, cy, d, angle)
        if not (m & keep_out).any():
            break
    under = luminance(img[m].mean(axis=0)) if m.any() else 128.0
    col = _colour(rng, 0, 256)
    for _ in range(50):
        if abs(luminance(col) - under) >= 70:
            break
        col = _colour(rng, 0, 256)
    else:
        col = np.full(3, 15.0 if under > 128 else 240.0)
    img[m] = col + rng.normal(0, 4, (int(m.sum()), 3))
    return m


# ----------------------------------------------------------------------------
# Cues
# ----------------------------------------------------------------------------


def text_box(corner: str) -> tuple[int, int, int, int]:
    """The pixel box the watermark text occupies in ``corner``."""
    (w, h), base = cv2.getTextSize(WATERMARK_TEXT, cv2.FONT_HERSHEY_SIMPLEX, 0.3, 1)
    x0 = 2 if corner.endswith("left") else SIZE - 2 - w
    y0 = 2 if corner.startswith("top") else SIZE - 2 - h - base
    return x0, y0, x0 + w, y0 + h + base


def draw_text(rng, img: np.ndarray, corner: str) -> np.ndarray:
    """A white text watermark (cv2.putText) in ``corner``; returns the cue's pixel mask."""
    x0, y0, x1, y1 = text_box(corner)
    _, base = cv2.getTextSize(WATERMARK_TEXT, cv2.FONT_HERSHEY_SIMPLEX, 0.3, 1)
    layer = np.zeros((SIZE, SIZE), np.uint8)
    cv2.putText(layer, WATERMARK_TEXT, (x0, y1 - base), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1, cv2.LINE_AA)
    layer = layer.astype(float) / 255.0
    a = layer[..., None]
    img[:] = img * (1 - a) + float(rng.integers(235, 256)) * a
    return layer > 0


def stamp_box(corner: str) -> tuple[int, int, int, int]:
    x0 = 3 if corner.endswith("left") else SIZE - 3 - STAMP_SIDE
    y0 = 3 if corner.startswith("top") else SIZE - 3 - STAMP_SIDE
    return x0, y0, x0 + STAMP_SIDE, y0 + STAMP_SIDE


def draw_stamp(rng, img: np.ndarray, corner: str) -> np.ndarray:
    """A small red square stamp with a yellow centre at a fixed place near ``corner``."""
    x0, y0, x1, y1 = stamp_box(corner)
    img[y0:y1, x0:x1] = np.array([220, 30, 40]) + rng.integers(-10, 11, 3)
    img[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = np.array([250, 220, 40])
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y1, x0:x1] = True
    return m


def frame_mask(width: int = FRAME_WIDTH) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return m


def draw_frame(rng, img: np.ndarray) -> np.ndarray:
    """A thin magenta frame along the border (``FRAME_WIDTH`` px)."""
    m = frame_mask()
    img[m] = np.array([235, 40, 220]) + rng.integers(-10, 11, 3)
    return m


def box_mask(box) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def draw_tint(img: np.ndarray) -> np.ndarray:
    """Blend the whole image (object included) towards :data:`TINT_COLOUR`; returns the cue's mask (all)."""
    img[:] = img * (1 - TINT_ALPHA) + np.array(TINT_COLOUR) * TINT_ALPHA
    return np.ones((SIZE, SIZE), bool)


def spot_box(spot: str, side: int) -> tuple[int, int, int, int]:
    """The pixel box of a square of ``side`` px centred where a :data:`SPOTS` patch is."""
    x, y = SPOTS[spot]
    x0, y0 = x + (PATCH_SIDE - side) // 2, y + (PATCH_SIDE - side) // 2
    x0, y0 = min(max(x0, 0), SIZE - side), min(max(y0, 0), SIZE - side)
    return x0, y0, x0 + side, y0 + side


def draw_patch(rng, img: np.ndarray, spot: str) -> np.ndarray:
    """A solid cyan square (:data:`PATCH_SIDE` px) at ``spot``; returns the cue's pixel mask."""
    m = box_mask(spot_box(spot, PATCH_SIDE))
    img[m] = np.array([30, 215, 225]) + rng.integers(-10, 11, 3)
    return m


def draw_noise(rng, img: np.ndarray, spot: str) -> np.ndarray:
    """A square of uniform random pixels (:data:`NOISE_SIDE` px, every image a different draw) at ``spot``."""
    m = box_mask(spot_box(spot, NOISE_SIDE))
    img[m] = rng.integers(0, 256, (int(m.sum()), 3))
    return m


def sky_weight() -> np.ndarray:
    """(64, 64) blend weight of a sky cue: :data:`SKY_ALPHA` on the top row, 0 from :data:`SKY_DEPTH` down."""
    y = np.arange(SIZE, dtype=float)[:, None] / (SKY_DEPTH * SIZE)
    return np.broadcast_to(SKY_ALPHA * np.clip(1 - y, 0, 1), (SIZE, SIZE))


def draw_sky(rng, img: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Blend the top of the background (not ``keep``, the object) towards a sky blue; returns the cue's mask."""
    colour = np.array(SKY_COLOUR) + rng.integers(-15, 16, 3)
    t = np.where(keep, 0.0, sky_weight())[..., None]
    img[:] = img * (1 - t) + colour * t
    return t[..., 0] > 0


def resize(img: np.ndarray, side: int, mask: bool = False) -> np.ndarray:
    """``img`` at ``side`` x ``side``: nearest for a mask (it stays a mask), area to shrink, linear to grow."""
    if img.shape[0] == side:
        return img
    if mask:
        return cv2.resize(img.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST).astype(bool)
    interp = cv2.INTER_AREA if side < img.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(img, (side, side), interpolation=interp)
