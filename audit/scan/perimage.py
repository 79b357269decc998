"""Per-image cue evidence: which images carry a flagged cue, and does it decide their prediction?

The scan names a cue per suspected class from a sample of 32 images; this
module says, for every image of the dataset and every named cue:

* ``cue_share``: the share of the image's heatmap energy (ReLU'd, resized to
  the model input, as in the record statistics) inside the cue's pixels
  (:func:`cue_share`; from the stored maps, no model call);
* ``cue_decides`` / ``pred_without_cue``: the prediction after the cue is
  removed with the same edit the causal test used (:func:`remove_cue`: the
  place occluded with the test's fill, the background replaced, or the
  background transform), and whether it changed: one forward pass per image
  and cue, for the images predicted as the cue's class only (:func:`candidates`;
  any other image keeps its prediction and the cue does not decide it);
* ``cue_present``: the estimate that the image carries the cue
  (:func:`cue_present`): the cue decides its prediction, or the heatmap puts
  at least :data:`PRESENT_SHARE` of its energy on the cue's pixels (and
  clearly more than their area).

Everything here is a pure function of arrays; :mod:`audit.scan.imagepass`
runs it over the shards of a job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audit.engine.stats import _CV_MAX_CHANNELS, box_mask, resize_maps
from audit.scan.probes import PROBES, flipped
from audit.scan.probes import edits as intervene
from audit.scan.probes.places import place_bank

PRESENT_SHARE = 0.4  # heatmap energy on the cue's pixels that marks an image as carrying it ...
PRESENT_OVER_AREA = 2.0  # ... when also at least this many times the cue's share of the image


@dataclass(frozen=True)
class Cue:
    """A cue the scan named for one class: ``place`` is the causal test's place (``corner:top_left``,
    ``border:4%``, ``region:sky``, ``hot area``, ``background``, ``background:texture``,
    ``background:flat``, ``image:colour``), ``box`` its box (fractions) when it has one, ``fill`` the
    test's fill."""

    class_id: int
    class_name: str
    name: str  # the classes.parquet ``cue`` (what the user reads)
    place: str
    box: tuple | None = None
    fill: str = "mean"

    @property
    def kind(self) -> str:
        """``background`` (masks: the background replaced), ``transform`` (background or whole-image
        edit) or ``place`` (a fixed place occluded)."""
        if self.place == "background":
            return "background"
        if self.place.startswith(("background:", "image:")):
            return "transform"
        return "place"


def cues_of(classes_df, tests_df=None) -> list[Cue]:
    """The cues of the suspected classes of ``classes.parquet``, with the fill of their test.

    Args:
        classes_df: ``summary/classes.parquet``.
        tests_df: ``summary/interventions.parquet`` (the fill of each cue's test), or None.

    Returns:
        One :class:`Cue` per suspected class that names a causal cue, by class id.
    """
    out = []
    if classes_df is None or not len(classes_df) or "cue_region" not in classes_df:
        return out
    sus = classes_df[(classes_df["verdict"] == "shortcut_suspected") & classes_df["cue_region"].fillna("").ne("")]
    for r in sus.sort_values("class_id").itertuples():
        box = tuple(float(v) for v in r.cue_box) if r.cue_box is not None and len(r.cue_box) == 4 else None
        out.append(Cue(int(r.class_id), str(r.class_name), str(r.cue or r.cue_region), str(r.cue_region), box,
                       _fill_of(tests_df, int(r.class_id), str(r.cue_region))))
    return out


def _fill_of(tests_df, class_id: int, place: str) -> str:
    if tests_df is None or not len(tests_df):
        return "mean"
    t = tests_df[(tests_df["class_id"] == class_id) & (tests_df["place"] == place)]
    return str(t["fill"].iloc[0]) if len(t) else "mean"


def place_pixels(cue: Cue, size, regions=None) -> np.ndarray | None:
    """(H, W) bool pixels of a place cue at ``size`` (the causal test's bank), None for other cues."""
    if cue.kind != "place":
        return None
    hot = cue.box if cue.place == "hot area" else None
    spot = next((s for s in place_bank(size, regions, hot, cells=True) if s.name == cue.place), None)
    if spot is not None:
        return spot.mask
    if cue.box is None:
        return None

    return box_mask(cue.box, size)


def cue_pixels(cue: Cue, size, *, regions=None, objects=None, spare=None, n: int = 1) -> np.ndarray:
    """(N, H, W) bool: the pixels each image's cue edit touches.

    A place: its pixels, less each image's object (``objects``) when masks
    are known; ``background``: everything but the object; ``background:*``:
    everything but the spared area (``spare``, see
    :func:`audit.scan.probes.edits.spare_masks`); ``image:*``: the whole image.
    """
    H, W = int(size[0]), int(size[1])
    n = len(objects) if objects is not None else (len(spare) if spare is not None else n)
    if cue.kind == "place":
        m = place_pixels(cue, size, regions)
        m = np.zeros((H, W), bool) if m is None else m
        m = np.broadcast_to(m, (n, H, W))
        return m & ~np.asarray(objects, bool) if objects is not None else np.array(m)
    if cue.kind == "background":
        return ~np.asarray(objects, bool) if objects is not None else np.zeros((n, H, W), bool)
    if cue.place.startswith("image:"):
        return np.ones((n, H, W), bool)
    return ~np.asarray(spare, bool) if spare is not None else np.zeros((n, H, W), bool)


def cue_share(maps: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(N,) share of each map's energy inside its cue pixels; NaN for a map without energy.

    Args:
        maps: (N, h, w) raw maps at the layer's resolution.
        pixels: (N, H, W) or (H, W) bool cue pixels at the model input size.

    Returns:
        float64 shares: the ReLU of the map resized (bilinear) to (H, W),
        summed over the cue pixels, over its sum.
    """
    maps = np.asarray(maps, np.float32)
    px = np.asarray(pixels, bool)
    if len(maps) == 0:
        return np.zeros(0)
    H, W = px.shape[-2:]
    raw = np.where(np.isfinite(maps), maps, np.float32(0))
    inside, tot = np.zeros(len(raw)), np.zeros(len(raw))
    todo = np.ones(len(raw), bool)
    if px.ndim == 2 and raw.shape[1:] != (H, W):
        # A map without negative values stays >= 0 resized (bilinear weights are >= 0), so the ReLU does
        # nothing and both sums are linear in the map: dot products with the resize's weights.
        todo = (raw < 0).any(axis=(1, 2))
        w_in, w_tot = _resize_weights(raw.shape[1:], (H, W), px)
        flat = raw[~todo].reshape(int((~todo).sum()), -1).astype(np.float64)
        inside[~todo], tot[~todo] = flat @ w_in, flat @ w_tot
    if todo.any():
        e = np.maximum(resize_maps(raw[todo], (H, W)), 0)
        tot[todo] = e.sum(axis=(1, 2), dtype=np.float64)
        inside[todo] = (e[:, px].sum(axis=1, dtype=np.float64) if px.ndim == 2
                        else np.where(px[todo], e, np.float32(0)).sum(axis=(1, 2), dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, inside / np.where(tot > 0, tot, 1.0), np.nan)


def _resize_weights(shape, size, px: np.ndarray):
    """(h*w,) float64 weights of each map cell in the resized map's sum over ``px`` and over the whole image."""
    h, w = int(shape[0]), int(shape[1])
    basis = resize_maps(np.eye(h * w, dtype=np.float32).reshape(h * w, h, w), size)
    return basis[:, px].sum(axis=1, dtype=np.float64), basis.sum(axis=(1, 2), dtype=np.float64)


def cue_present(share: np.ndarray, decides: np.ndarray, area) -> np.ndarray:
    """(N,) bool estimate that an image carries the cue.

    The cue decides its prediction, or its heatmap puts at least
    :data:`PRESENT_SHARE` of the energy on the cue's pixels and at least
    :data:`PRESENT_OVER_AREA` times their share of the image (``area``,
    scalar or (N,)): attention there beyond chance.
    """
    share = np.asarray(share, np.float64)
    dec = np.asarray(decides, bool)
    area = np.broadcast_to(np.asarray(area, np.float64), share.shape)
    with np.errstate(invalid="ignore"):
        hot = (share >= PRESENT_SHARE) & (share >= PRESENT_OVER_AREA * area)
    return dec | np.nan_to_num(hot, nan=False).astype(bool)


FEATURE_SIDE = 16  # the cue's pixels are described at this side


def pixel_features(images: np.ndarray, pixels: np.ndarray, side: int = FEATURE_SIDE) -> np.ndarray:
    """(N, side * side * C) float32: each image's colours relative to its own median colour outside the cue,
    blacked out outside its cue pixels, resized (area) to ``side`` x ``side``: what lies on the cue's place
    that the rest of the image does not have (a white mark, a magenta frame, a stamp).

    Resizing is linear, so this is ``resize(image x mask) - median x resize(mask)``; the median is taken
    over the cells of the resized image that the cue does not cover.
    """
    imgs = np.asarray(images)  # uint8 stays uint8 here: area_resize converts a few images at a time
    n, c = len(imgs), imgs.shape[-1]
    if n == 0:
        return np.zeros((0, side * side * c), np.float32)
    m = np.broadcast_to(np.asarray(pixels, bool), imgs.shape[:3])
    scale = np.float32(255.0 if imgs.dtype == np.uint8 else 1.0)
    cover = area_resize(m.astype(np.float32)[..., None], side)[..., 0]  # (N, side, side)
    on = _area_on(imgs, m, cover, side) / scale  # (N, side, side, C)
    med = _median_outside(area_resize(imgs, side).reshape(n, -1, c) / scale, (cover >= 0.5).reshape(n, -1))
    return (on - cover[..., None] * med[:, None, None, :]).reshape(n, -1)


def _area_on(imgs: np.ndarray, m: np.ndarray, cover: np.ndarray, side: int) -> np.ndarray:
    """Area resize of the images blacked out outside ``m``: zero in every cell the cue does not touch, so with
    a whole number of pixels per cell only the cells' bounding box of the cue is resized (exactly the same
    block means; a small place costs a small crop)."""
    n, H, W, c = imgs.shape
    out = np.zeros((n, side, side, c), np.float32)
    rows, cols = np.nonzero((cover > 0).any(axis=0))
    if not len(rows):
        return out
    if H % side or W % side:
        return area_resize(imgs * m[..., None].astype(imgs.dtype), side)
    fy, fx = H // side, W // side
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = imgs[:, r0 * fy:r1 * fy, c0 * fx:c1 * fx] * m[:, r0 * fy:r1 * fy, c0 * fx:c1 * fx, None].astype(imgs.dtype)
    out[:, r0:r1, c0:c1] = area_resize(crop, (r1 - r0, c1 - c0))
    return out


def _median_outside(cells: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """(N, C) median of each image's cells (N, K, C) that its cue does not cover (0 where it covers all)."""
    vals = np.sort(np.where(covered[..., None], np.inf, cells), axis=1)  # covered cells sort last
    k = (~covered).sum(axis=1)  # (N,)
    lo, hi = np.maximum((k - 1) // 2, 0), np.maximum(k // 2, 0)
    rows = np.arange(len(cells))
    med = (vals[rows, lo] + vals[rows, hi]) / 2
    return np.where((k > 0)[:, None], med, 0).astype(np.float32)


def area_resize(x: np.ndarray, side) -> np.ndarray:
    """(N, H, W, C) -> (N, h, w, C) float32 (``side``: h = w, or (h, w)): OpenCV's area resize of each image,
    many images per call (converted to float32 a call's worth at a time)."""
    import cv2

    h, w = (side, side) if np.isscalar(side) else (int(side[0]), int(side[1]))
    n, H, W, c = x.shape
    many = H % h == 0 and W % w == 0  # OpenCV takes more than 4 channels at a whole-number scale only
    if many and x.dtype == np.uint8 and (H // h) * (W // w) * 255 < 2 ** 16:
        return _block_mean_u8(x, h, w)
    per = max(1, (_CV_MAX_CHANNELS if many else 4) // c)
    out = np.empty((n, h, w, c), np.float32)
    for s in range(0, n, per):
        part = x[s:s + per]
        k = len(part)
        stack = np.ascontiguousarray(part.transpose(1, 2, 0, 3).reshape(H, W, k * c), dtype=np.float32)
        r = cv2.resize(stack, (w, h), interpolation=cv2.INTER_AREA)
        out[s:s + k] = r.reshape(h, w, k, c).transpose(2, 0, 1, 3)
    return out


def _block_mean_u8(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area resize of uint8 images at a whole-number scale: exact integer block sums (uint16), then the means."""
    n, H, W, c = x.shape
    fy, fx = H // h, W // w
    rows = x.reshape(n * h, fy, W * c).sum(axis=1, dtype=np.uint16)  # (n*h, W*c)
    cells = rows.reshape(n * h, w, fx, c).sum(axis=2, dtype=np.uint16)  # (n*h, w, c)
    return (cells.astype(np.float32) / np.float32(fy * fx)).reshape(n, h, w, c)


def candidates(pred, cue_class: int) -> np.ndarray:
    """(N,) bool: the images whose prediction the cue of ``cue_class`` can decide, those predicted as that
    class (single-label).  Only these get the extra forward pass: the cue of a class can only have taken an
    image's prediction *to* that class, so for every other image ``cue_decides`` is False and
    ``pred_without_cue`` is its prediction."""
    return np.asarray(pred) == int(cue_class)


def decides_for(pred, pred_without, cue_class: int) -> np.ndarray:
    """(N,) bool: the cue took the prediction *to its class*: predicted as the cue's class, and not without the cue."""
    pred, new = np.asarray(pred), np.asarray(pred_without)
    return (pred == cue_class) & (new != cue_class)


MIN_TRAIN = 5  # each side of the presence detector needs at least this many confident images
MAX_TRAIN = 4000  # ... and uses at most this many of each


@dataclass
class Detector:
    """A fitted presence detector: standardisation and a logistic regression on :func:`pixel_features`."""

    mean: np.ndarray
    std: np.ndarray
    model: object

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(N,) P(the image carries the cue)."""
        x = (np.asarray(features, np.float64) - self.mean) / self.std
        return self.model.predict_proba(x)[:, 1]


def fit_presence(pos_features: np.ndarray, neg_features: np.ndarray) -> Detector | None:
    """A :class:`Detector` from confident carriers and non-carriers, or None with fewer than
    :data:`MIN_TRAIN` of either (balanced classes, standardised features)."""
    from sklearn.linear_model import LogisticRegression

    if len(pos_features) < MIN_TRAIN or len(neg_features) < MIN_TRAIN:
        return None
    x = np.concatenate([pos_features, neg_features]).astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    y = np.r_[np.ones(len(pos_features)), np.zeros(len(neg_features))]
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit((x - mean) / std, y)
    return Detector(mean, std, lr)


def presence(features: np.ndarray, positive: np.ndarray, negative: np.ndarray, seed: int = 0):
    """P(the image carries the cue) from its cue pixels, or None with too few confident images.

    A logistic regression (:func:`fit_presence`) on :func:`pixel_features`,
    trained on the confident carriers (``positive``: the cue took the
    prediction to its class) against confident non-carriers (``negative``:
    images of other labels, not predicted as the cue's class), at most
    :data:`MAX_TRAIN` of each; applied to every image.
    """
    pos, neg = np.nonzero(positive)[0], np.nonzero(negative)[0]
    rng = np.random.default_rng(seed)
    pos = rng.choice(pos, min(len(pos), MAX_TRAIN), replace=False)
    neg = rng.choice(neg, min(len(neg), MAX_TRAIN), replace=False)
    det = fit_presence(features[pos], features[neg])
    return None if det is None else det(features)


def remove_cue(images: np.ndarray, cue: Cue, pixels: np.ndarray, objects=None, levels=None) -> np.ndarray:
    """Copies of ``images`` (N, H, W, C) uint8 with the cue removed by the causal test's own edit.

    A place: :func:`audit.scan.probes.edits.occlude` with the test's fill; the
    background (masks): :func:`audit.scan.probes.edits.replace_background`
    (neutral); a transform: :func:`audit.scan.probes.edits.transform` of
    ``pixels`` with the test's kind (``levels``: the dataset's typical image).
    """
    if cue.kind == "background":
        if objects is None:
            return np.array(images)
        return intervene.replace_background(images, objects, None)[0]
    if cue.kind == "transform":
        kind = next((p.kind for p in PROBES.values() if p.is_transform and p.place == cue.place), cue.fill)
        return intervene.transform(images, pixels, kind, levels)
    fill = cue.fill if cue.fill in intervene.FILLS else "mean"
    return intervene.occlude(images, pixels, fill)


def decides(base_pred, new_pred, classes=None) -> np.ndarray:
    """(N,) bool: the prediction changed when the cue went (see :func:`audit.scan.probes.flipped`)."""
    return flipped(base_pred, new_pred, classes)


def area_of(pixels: np.ndarray) -> np.ndarray:
    """(N,) share of each image the cue pixels cover."""
    px = np.asarray(pixels, bool)
    return px.reshape(len(px), -1).mean(axis=1) if len(px) else np.zeros(0)


def finite_or_none(v):
    return float(v) if v is not None and math.isfinite(float(v)) else None
