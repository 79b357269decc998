"""Heatmaps as pictures: the JET colour map and its blend over an image (pure NumPy/OpenCV).

Shared by :func:`audit.overlay` (the data layer's query API), the report and
``audit explain``.
"""

from __future__ import annotations

import cv2
import numpy as np

from audit.engine.stats import resize_map


def colorize(map01: np.ndarray) -> np.ndarray:
    """JET colormap of a [0, 1] map, as uint8 RGB (the seeds' cv2.applyColorMap)."""
    u8 = np.uint8(np.clip(map01, 0.0, 1.0) * 255)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay_image(image: np.ndarray, map01: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a JET heatmap over an RGB image (any size; the map is resized to it)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.dtype != np.uint8:
        img = np.uint8(np.clip(img, 0, 255))
    heat = colorize(resize_map(map01, img.shape[:2]))
    return cv2.addWeighted(heat, alpha, img[..., :3], 1.0 - alpha, 0.0)
