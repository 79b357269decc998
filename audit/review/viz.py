"""Small image helpers shared by queries, the report and ``audit explain``.

All pure NumPy/OpenCV: maps in, uint8 RGB pictures out.
"""

from __future__ import annotations

import cv2
import numpy as np

from audit.engine.overlay import colorize, overlay_image  # noqa: F401  (re-exported)
from audit.engine.stats import normalize, resize_map  # noqa: F401  (re-exported)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 RGB (or grayscale) image as PNG."""
    arr = np.asarray(rgb)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:  # pragma: no cover - OpenCV only fails on invalid arrays
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def jpeg_bytes(rgb: np.ndarray, quality: int = 85) -> bytes:
    """Encode a uint8 RGB image as JPEG (smaller than PNG for photos and overlays)."""
    arr = np.asarray(rgb)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def data_uri(rgb: np.ndarray, fmt: str = "png", quality: int = 85) -> str:
    """A ``data:`` URI of an RGB image, to inline pictures in a self-contained HTML page."""
    import base64

    if fmt == "png":
        data, mime = png_bytes(rgb), "image/png"
    else:
        data, mime = jpeg_bytes(rgb, quality), "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fit(image: np.ndarray, size: int, interpolation=None) -> np.ndarray:
    """Resize an RGB (or grey) uint8 image so that its longer side is ``size`` pixels."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if interpolation is None:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (nw, nh), interpolation=interpolation)


def caption(tile: np.ndarray, text: str, height: int = 18, above: bool = False) -> np.ndarray:
    """Add a white strip with ``text`` (truncated to fit) under (or above) an RGB tile."""
    tile = np.asarray(tile)
    w = tile.shape[1]
    strip = np.full((height, w, 3), 255, np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.38
    text = str(text)
    while text and cv2.getTextSize(text, font, scale, 1)[0][0] > w - 4:
        text = text[:-2] + "~" if len(text) > 2 else ""
    (tw, th), _ = cv2.getTextSize(text, font, scale, 1)
    cv2.putText(strip, text, (max(2, (w - tw) // 2), (height + th) // 2), font, scale,
                (20, 20, 20), 1, cv2.LINE_AA)
    return np.concatenate([strip, tile] if above else [tile, strip], axis=0)


def grid(tiles, cols: int, pad: int = 4, background: int = 255) -> np.ndarray:
    """Tile RGB images (any sizes; each cell is as large as the largest tile) into one picture."""
    tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t for t in tiles]
    if not tiles:
        return np.full((1, 1, 3), background, np.uint8)
    cols = max(1, min(int(cols), len(tiles)))
    rows = -(-len(tiles) // cols)
    ch = max(t.shape[0] for t in tiles)
    cw = max(t.shape[1] for t in tiles)
    out = np.full((rows * ch + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), background, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        out[y:y + t.shape[0], x:x + t.shape[1]] = t[..., :3]
    return out
