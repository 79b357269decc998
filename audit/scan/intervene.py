"""Confirmation by intervention: does the prediction change when the cue is removed?

A heatmap only says where the gradient was large; the scan's suspicion is a
hypothesis.  This module tests it on a small sample of a suspect class or
cluster with extra forward passes only:

* occlude the **cue** (the place where the group's attention concentrates,
  minus the object pixels when a mask is known) with a neutral fill, and
* with masks, separately occlude the **object**,

and count how often the predicted class changes (``flip_rate_cue``,
``flip_rate_object``).  A shortcut shows a high cue flip rate, or a model that
does not care when its object is removed; a healthy model flips when the
object goes and not when the background changes.

The core, :func:`flip_rates`, is a pure function of a ``predict_fn``, images
and masks.  :class:`Intervener` wires it to a finished job: it reads
``OUT/job.json``, loads the model once, and reads the sample images back with
:func:`audit.data.datasets.load_images`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from audit.errors import AuditError

FILLS = ("mean", "blur")
MIN_SAMPLE = 5  # fewer occludable images than this: the rate is reported as unknown (NaN)


@dataclass(frozen=True)
class FlipResult:
    """How often the prediction changed when the cue, or the object, was occluded.

    A rate is NaN when fewer than :data:`MIN_SAMPLE` images could be tested;
    ``n_cue``/``n_object`` are the sample sizes.
    """

    flip_rate_cue: float = math.nan
    flip_rate_object: float = math.nan
    n_cue: int = 0
    n_object: int = 0

    @property
    def n(self) -> int:
        return max(self.n_cue, self.n_object)


def occlude(images: np.ndarray, masks: np.ndarray, fill: str = "mean") -> np.ndarray:
    """Copies of ``images`` (N, H, W, 3) uint8 with ``masks`` (N, H, W) pixels neutralised.

    ``fill="mean"``: each image's own mean colour (removes colour and texture
    cues such as a blue sky); ``fill="blur"``: a heavy Gaussian blur of the
    image (removes shapes and texture, keeps colours).
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
            out[i][m[i]] = cv2.GaussianBlur(imgs[i], (0, 0), sigma)[m[i]]
    return out


def flip_rates(predict_fn, images, cue_masks, object_masks=None, *, fill: str = "mean",
               base_pred=None) -> FlipResult:
    """How often the prediction changes when the cue, or the object, is occluded.

    Args:
        predict_fn: uint8 images (N, H, W, 3) -> predicted class ids (N,).
        images: (N, H, W, 3) uint8 RGB at the model input size.
        cue_masks: (N, H, W) bool, or (H, W) for the same place in every image.
            Object pixels are removed from the cue mask when ``object_masks`` is given,
            so the cue test never hides the object.
        object_masks: None or (N, H, W) bool; an all-False mask means no object
            known for that image (it is left out of the object test).
        fill: neutral fill, see :func:`occlude`.
        base_pred: predictions on the unmodified images (computed when None).

    Returns:
        A :class:`FlipResult`.
    """
    images = np.asarray(images)
    n = len(images)
    cue = np.asarray(cue_masks, bool)
    if cue.ndim == 2:
        cue = np.broadcast_to(cue, (n, *cue.shape))
    obj = None if object_masks is None else np.asarray(object_masks, bool)
    if obj is not None:
        cue = cue & ~obj
    base = np.asarray(predict_fn(images) if base_pred is None else base_pred).reshape(n)

    def rate(masks):
        sel = masks.reshape(n, -1).any(axis=1)
        k = int(sel.sum())
        if k < MIN_SAMPLE:
            return math.nan, k
        pred = np.asarray(predict_fn(occlude(images[sel], masks[sel], fill))).reshape(k)
        return float(np.mean(pred != base[sel])), k

    r_cue, n_cue = rate(cue)
    r_obj, n_obj = rate(obj) if obj is not None else (math.nan, 0)
    return FlipResult(r_cue, r_obj, n_cue, n_obj)


class Intervener:
    """Runs :func:`flip_rates` for a finished job (model and dataset from ``OUT/job.json``).

    The model is loaded lazily, once, on the first call.
    """

    def __init__(self, out_dir, *, fill: str = "mean", batch_size: int = 64):
        import json

        self.out = Path(out_dir)
        p = self.out / "job.json"
        if not p.is_file():
            raise AuditError(f"{p} not found: intervention needs the job's model and dataset")
        self.job = json.loads(p.read_text())
        self.spec = self.job.get("spec") or {}
        self.fill = fill
        self.batch_size = batch_size
        self._model = None
        self._size = None

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
            from audit.engine.models import load_model

            m = self.spec.get("model") or {}
            self._model = load_model(m.get("path"), application=m.get("application"),
                                     weights=m.get("weights"), input_size=m.get("input_size"),
                                     num_classes=m.get("num_classes"),
                                     trust_code=bool(m.get("trust_code")))
        return self._model

    def predict(self, images: np.ndarray) -> np.ndarray:
        from audit.engine.models import preprocess

        mode = (self.spec.get("model") or {}).get("preprocess", "none")
        out = []
        for s in range(0, len(images), self.batch_size):
            x = preprocess(images[s:s + self.batch_size], mode)
            out.append(np.asarray(self.model(x, training=False)).argmax(axis=-1))
        return np.concatenate(out) if out else np.zeros(0, int)

    def load(self, image_ids):
        """(images, object masks or None) of the sample at the model input size."""
        from audit.data.datasets import load_images

        images, masks, has_mask = load_images(self.spec, list(image_ids), self.size)
        if masks is not None:
            masks = masks & np.asarray(has_mask, bool)[:, None, None]
        return images, masks

    def __call__(self, image_ids, cue_masks, *, use_masks: bool = True) -> FlipResult:
        """Flip rates on the images ``image_ids``; ``cue_masks`` (H, W) or (N, H, W) at input size."""
        images, masks = self.load(image_ids)
        cue = np.asarray(cue_masks, bool)
        if cue.shape[-2:] != tuple(self.size):
            cue = _resize_bool(cue, self.size)
        return flip_rates(self.predict, images, cue, masks if use_masks else None, fill=self.fill)


def _resize_bool(m: np.ndarray, size) -> np.ndarray:
    from audit.engine.stats import resize_maps

    m3 = m[None] if m.ndim == 2 else m
    r = resize_maps(m3.astype(np.float32), size) >= 0.5
    return r[0] if m.ndim == 2 else r


def cue_mask(cue_kind: str, cue_box, mean_map, size) -> np.ndarray | None:
    """The place to occlude for a group's cue, (H, W) bool at the model input size.

    A region's box, the border band, else the hot area of the group's mean map;
    None when there is nothing to occlude.
    """
    from audit.engine.stats import border_mask, box_mask
    from audit.scan.grids import hot_cells

    H, W = size
    if cue_kind == "region" and cue_box:
        return box_mask(cue_box, (H, W))
    if cue_kind == "border":
        return border_mask((H, W))
    if mean_map is not None:
        from audit.engine.stats import resize_maps

        hot = hot_cells(mean_map).astype(np.float32)
        return resize_maps(hot[None], (H, W))[0] >= 0.5
    return None


class SafeIntervener:
    """An intervention that cannot run (model or data moved) warns once and is skipped."""

    def __init__(self, inner, quiet: bool):
        self.inner, self.quiet, self.failed = inner, quiet, None

    @property
    def size(self):
        return self.inner.size

    def __call__(self, *a, **k):
        if self.failed:
            return None
        try:
            return self.inner(*a, **k)
        except AuditError as e:
            self.failed = str(e)
            if not self.quiet:
                import sys

                print(f"audit: scan: intervention skipped ({e})", file=sys.stderr)
            return None
