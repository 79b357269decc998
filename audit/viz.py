"""Small image helpers shared by queries, the report and ``audit explain``.

All pure NumPy/OpenCV: maps in, uint8 RGB pictures out.
"""

from __future__ import annotations

import cv2
import numpy as np


def normalize(cam: np.ndarray) -> np.ndarray:
    """ReLU then scale to [0, 1] by the maximum; an all-zero or non-finite map gives zeros."""
    m = np.nan_to_num(np.asarray(cam, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    m = np.maximum(m, 0.0)
    top = float(m.max()) if m.size else 0.0
    return m / top if top > 0 else np.zeros_like(m)


def resize_map(cam: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of a (h, w) map to ``size`` = (H, W)."""
    h, w = int(size[0]), int(size[1])
    return cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


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


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 RGB (or grayscale) image as PNG."""
    arr = np.asarray(rgb)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:  # pragma: no cover - OpenCV only fails on invalid arrays
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
