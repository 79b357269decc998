"""The image edits of the causal tests: pure functions of uint8 image stacks (N, H, W, C) and masks.

Each probe (:mod:`audit.scan.probes`) names one of these as its edit; they
know nothing about samples, predictions or verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audit.errors import AuditError
from audit.scan.config import Config

FILLS = ("mean", "blur")  # fills of the place tests (Config.fill)
TRANSFORM_KINDS = ("fine-blur", "colour-levels", "flat-grey")


def occlude(images: np.ndarray, masks: np.ndarray, fill: str = "mean") -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 with ``masks`` (N, H, W) pixels neutralised.

    ``fill="mean"``: each image's own mean colour (removes colour and texture
    cues such as a blue sky or a coloured frame); ``fill="blur"``: a heavy
    Gaussian blur of the image (removes shapes and texture, keeps colours).
    Neither removes an object's silhouette: use :func:`remove_objects` for that.

    Raises:
        AuditError: an unknown fill.
    """
    import cv2

    if fill not in FILLS:
        raise AuditError(f"unknown occlusion fill {fill!r}; expected one of {', '.join(FILLS)}")
    imgs = np.asarray(images)
    m = np.asarray(masks, bool)
    if fill == "mean" and len(imgs):  # every image at once: each one's own mean colour where its mask is
        colour = np.round(imgs.reshape(len(imgs), -1, imgs.shape[-1]).mean(axis=1)).astype(imgs.dtype)
        return np.where(m[..., None], colour[:, None, None, :], imgs)
    out = imgs.copy()
    for i in range(len(imgs)):
        if m[i].any():
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
        lum = luminance(np.asarray(images, np.float32))
        return cls(float(np.median(lum.mean(axis=(1, 2)))), float(np.median(lum.std(axis=(1, 2)))))


def luminance(x: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of (..., C) pixels (the only channel when C < 3)."""
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
    lum = luminance(img)[m]
    return (img - lum.mean()) * (levels.std / max(float(lum.std()), 1.0)) + levels.mean


def transform(images: np.ndarray, edit: np.ndarray, kind: str, levels: Levels | None = None,
              sigma: float = Config.texture_sigma) -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 whose ``edit`` (N, H, W) pixels are transformed.

    ``fine-blur``: a Gaussian blur of ``sigma`` of the side (a texture of
    stripes or grain goes, shapes and colours stay); ``colour-levels``: each
    channel of the edited pixels scaled so that their mean is the same in
    every channel, at their mean luminance, then their luminance's mean and
    spread set to the dataset's typical ``levels`` (a colour cast, a haze, a
    brightness or contrast of its own go; texture and shapes stay);
    ``flat-grey``: one flat grey at the edited pixels' mean (texture, colour
    and anything drawn there go).

    Raises:
        AuditError: an unknown kind.
    """
    import cv2

    if kind not in TRANSFORM_KINDS:
        raise AuditError(f"unknown transform {kind!r}; expected one of {', '.join(TRANSFORM_KINDS)}")
    side = max(np.shape(images)[1], np.shape(images)[2])

    def new(img, m):
        if kind == "fine-blur":
            return cv2.GaussianBlur(img, (0, 0), sigma * side).reshape(img.shape)
        if kind == "colour-levels":
            return _colour_levels(img, m, levels)
        return np.full_like(img, img[m].mean())

    return each_image(images, edit, new)


def each_image(images: np.ndarray, edit: np.ndarray, new) -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 whose ``edit`` (N, H, W) pixels come from
    ``new(image, mask)`` (a float32 (H, W, C) image and its (H, W) bool mask -> a float image of the
    same shape), rounded and clipped to 0..255; images with nothing to edit stay as they are."""
    imgs = np.asarray(images)
    m = np.asarray(edit, bool)
    out = imgs.copy()
    for i in range(len(imgs)):
        if not m[i].any():
            continue
        img = new(imgs[i].astype(np.float32), m[i])
        out[i][m[i]] = np.clip(np.rint(img[m[i]]), 0, 255).astype(imgs.dtype)
    return out


def spare_masks(size, object_masks=None, grids=None, hot: float = Config.spare_hot,
                most: float = Config.spare_max) -> np.ndarray | None:
    """(N, H, W) bool: where each image's object is taken to be, spared by the background edits.

    With object masks: each mask dilated by :func:`dilation_px`.  Without:
    the cells of the image's own heatmap (``grids``, (N, g, g)) holding at
    least ``hot`` of its maximum, at most the ``most`` share of its cells
    (the strongest: a diffuse map would otherwise spare most of the image),
    grown by one cell, at ``size``.  None when neither is given.
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
    k = max(1, int(math.ceil(most * flat.shape[1]))) if flat.size else 1
    kth = -np.partition(-flat, k - 1, axis=1)[:, k - 1] if flat.size else top  # the k-th strongest value
    thr = np.maximum(hot * top, kth)[:, None, None]
    on = (g >= thr) & (top[:, None, None] > 0)
    k = np.ones((3, 3), np.uint8)
    grown = [cv2.dilate(x.astype(np.uint8), k) for x in on]
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


def paste(images: np.ndarray, donors: np.ndarray, spots: np.ndarray) -> np.ndarray:
    """Copies of ``images`` whose ``spots[j]`` pixels come from donor ``j % len(donors)`` (in turn)."""
    out = images.copy()
    for j in range(len(out)):
        out[j][spots[j]] = donors[j % len(donors)][spots[j]]
    return out


ATTRIBUTE_KINDS = ("greyscale", "permute", "contrast", "darken", "blur", "smooth", "shift")


def attribute(images: np.ndarray, edit: np.ndarray, kind: str, sigma: float = Config.texture_sigma,
              shift: float = Config.identity_shift) -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 whose ``edit`` (N, H, W) pixels change one attribute that a
    model reading shapes should ignore, keeping what the object is.

    ``greyscale``: the luma (ITU-R BT.601) to every channel (colour goes; a one-channel image is unchanged);
    ``permute``: the channels rotated (R, G, B) -> (G, B, R) (every hue moves by a third of the circle,
    brightness patterns stay); ``contrast``: the edited pixels' spread around their mean halved;
    ``darken``: every value times 0.6; ``blur``: a Gaussian blur of ``sigma`` of the side (texture goes);
    ``smooth``: the same blur taken over the edited pixels alone (a normalised convolution: stripes or
    grain inside the object, or inside the background, go, and nothing from the other part bleeds in);
    ``shift``: the image moved right and down by ``shift`` of the side, its edges repeated.

    Raises:
        AuditError: an unknown kind.
    """
    if kind not in ATTRIBUTE_KINDS:
        raise AuditError(f"unknown attribute edit {kind!r}; expected one of {', '.join(ATTRIBUTE_KINDS)}")
    side = max(np.shape(images)[1], np.shape(images)[2])
    if kind in ELEMENTWISE:  # the same arithmetic on the whole stack at once (no loop over the images)
        imgs, m = np.asarray(images), np.asarray(edit, bool)
        new = np.clip(np.rint(_elementwise(imgs.astype(np.float32), kind, shift)), 0, 255).astype(imgs.dtype)
        return np.where(m[..., None], new, imgs)
    return each_image(images, edit, lambda img, m: _attribute(img, m, kind, sigma * side, shift))


ELEMENTWISE = ("greyscale", "permute", "darken", "shift")  # attribute edits that need no per-image statistic


def _elementwise(x: np.ndarray, kind: str, shift: float) -> np.ndarray:
    """:func:`attribute`'s ``kind`` on a float32 stack (N, H, W, C), pixel by pixel as :func:`_attribute`
    does it on one image (the shift's edges repeated)."""
    if kind == "greyscale":
        return np.repeat(luminance(x)[..., None], x.shape[-1], axis=-1)
    if kind == "permute":
        return x[..., [1, 2, 0]] if x.shape[-1] >= 3 else x
    if kind == "darken":
        return x * 0.6
    d = max(1, int(round(shift * max(x.shape[1:3]))))
    return np.pad(x, ((0, 0), (d, 0), (d, 0), (0, 0)), mode="edge")[:, :x.shape[1], :x.shape[2]]


def _attribute(img: np.ndarray, m: np.ndarray, kind: str, sigma_px: float, shift: float) -> np.ndarray:
    """One image with ``kind`` (:func:`attribute`) applied everywhere; the caller keeps the ``m`` pixels."""
    import cv2

    if kind == "greyscale":
        return np.repeat(luminance(img)[..., None], img.shape[-1], axis=-1)
    if kind == "permute":
        return img[..., [1, 2, 0]] if img.shape[-1] >= 3 else img
    if kind == "contrast":
        mean = img[m].mean(axis=0)
        return (img - mean) * 0.5 + mean
    if kind == "darken":
        return img * 0.6
    if kind == "blur":
        return cv2.GaussianBlur(img, (0, 0), sigma_px).reshape(img.shape)
    if kind == "smooth":
        w = cv2.GaussianBlur(m.astype(np.float32), (0, 0), sigma_px)[..., None]
        num = cv2.GaussianBlur(img * m[..., None], (0, 0), sigma_px).reshape(img.shape)
        return num / np.maximum(w, 1e-6)
    d = max(1, int(round(shift * max(img.shape[:2]))))
    moved = cv2.copyMakeBorder(img, d, 0, d, 0, cv2.BORDER_REPLICATE)[:img.shape[0], :img.shape[1]]
    return moved.reshape(img.shape)


def colour_transfer(images: np.ndarray, donors: np.ndarray) -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 given the colours of ``donors`` (N, H, W, C): each channel's
    mean and standard deviation over the whole image moved to the donor's (Reinhard et al. 2001, in the
    image's own channels); shapes and texture stay."""
    x = np.asarray(images, np.float32)
    d = np.asarray(donors, np.float32)
    mx, sx = x.mean(axis=(1, 2), keepdims=True), x.std(axis=(1, 2), keepdims=True)
    md, sd = d.mean(axis=(1, 2), keepdims=True), d.std(axis=(1, 2), keepdims=True)
    out = (x - mx) * (sd / np.maximum(sx, 1.0)) + md
    return np.clip(np.rint(out), 0, 255).astype(np.asarray(images).dtype)
