"""Robust image decoding with OpenCV: bytes in, RGB uint8 out, or a reason why not.

Every failure is a :class:`DecodeError` with a short human reason that ends up
in the ``error`` column of the records; nothing here raises anything else on
bad data.  Before decoding, the header is parsed (PNG, JPEG, GIF, BMP, WebP,
TIFF, PBM/PGM/PPM/PAM/PFM, Sun raster, Radiance HDR, JPEG 2000) and an image
claiming more than ``max_pixels`` pixels is refused, so a
crafted header cannot make a worker allocate gigabytes (OpenCV's own limit,
``OPENCV_IO_MAX_IMAGE_PIXELS``, is the second line of defence for formats we
do not parse).  Grayscale, RGBA and 16-bit images are converted to 8-bit RGB.
EXIF orientation is ignored (images and masks stay pixel-aligned).
"""

from __future__ import annotations

import struct

import numpy as np

DEFAULT_MAX_PIXELS = 100_000_000


class DecodeError(Exception):
    """An input that cannot be audited; ``str(e)`` is the reason."""


def _cv2():
    import cv2

    return cv2


# ----------------------------------------------------------------------------
# header sizes without decoding
# ----------------------------------------------------------------------------


def header_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from the header, or None when not recognised.

    Raises :class:`DecodeError` for a recognised format with a broken header.
    """
    b = data
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n":
            if len(b) < 24 or b[12:16] != b"IHDR":
                raise DecodeError("truncated PNG (no IHDR header)")
            w, h = struct.unpack(">II", b[16:24])
            return "png", w, h
        if b[:2] == b"\xff\xd8":
            return ("jpeg", *_jpeg_size(b))
        if b[:6] in (b"GIF87a", b"GIF89a"):
            if len(b) < 10:
                raise DecodeError("truncated GIF header")
            w, h = struct.unpack("<HH", b[6:10])
            return "gif", w, h
        if b[:2] == b"BM":
            if len(b) < 26:
                raise DecodeError("truncated BMP header")
            size = struct.unpack("<I", b[14:18])[0]
            if size == 12:
                w, h = struct.unpack("<HH", b[18:22])
            else:
                w, h = struct.unpack("<ii", b[18:26])
            return "bmp", abs(w), abs(h)
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            return ("webp", *_webp_size(b))
        if b[:4] in (b"II*\x00", b"MM\x00*"):
            return ("tiff", *_tiff_size(b))
        return _other_size(b)
    except struct.error:
        raise DecodeError("truncated image header") from None
    return None


_NETPBM = {b"P1": "pbm", b"P2": "pgm", b"P3": "ppm", b"P4": "pbm", b"P5": "pgm", b"P6": "ppm", b"P7": "pam",
           b"PF": "pfm", b"Pf": "pfm"}


def _other_size(b: bytes) -> tuple[str, int, int] | None:
    """Netpbm (PBM, PGM, PPM, PAM, PFM), Sun raster, Radiance HDR, JPEG 2000: the other formats OpenCV reads."""
    if b[:2] in _NETPBM and len(b) > 2 and b[2:3].isspace():
        return (_NETPBM[b[:2]], *_netpbm_size(b))
    if b[:4] == b"\x59\xa6\x6a\x95":  # Sun raster
        w, h = struct.unpack(">II", b[4:12])
        return "ras", w, h
    if b[:2] == b"#?":  # Radiance HDR: header lines, a blank line, then "-Y h +X w"
        return ("hdr", *_hdr_size(b))
    if b[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":  # JP2: the ihdr box holds height, width
        i = b.find(b"ihdr", 0, 4096)
        if i < 0:
            raise DecodeError("corrupt JPEG 2000 header (no ihdr box)")
        h, w = struct.unpack(">II", b[i + 4:i + 12])
        return "jp2", w, h
    if b[:4] == b"\xff\x4f\xff\x51":  # a raw JPEG 2000 codestream: the SIZ segment
        xs, ys, xo, yo = struct.unpack(">IIII", b[8:24])
        return "j2k", xs - xo, ys - yo
    return None


def _netpbm_size(b: bytes) -> tuple[int, int]:
    """Width and height of a Netpbm header (comments allowed); PAM names them WIDTH and HEIGHT."""
    head = b[:4096]
    if head[:2] == b"P7":
        fields = dict(line.split(None, 1) for line in head.splitlines()[1:] if len(line.split(None, 1)) == 2)
        try:
            return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])
        except (KeyError, ValueError):
            raise DecodeError("corrupt PAM header (no WIDTH/HEIGHT)") from None
    words = []
    for line in head[2:].splitlines():
        words += line.split(b"#", 1)[0].split()
        if len(words) >= 2:
            break
    try:
        return int(words[0]), int(words[1])
    except (IndexError, ValueError):
        raise DecodeError("truncated or corrupt Netpbm header") from None


def _hdr_size(b: bytes) -> tuple[int, int]:
    lines = b[:8192].split(b"\n")
    for k, line in enumerate(lines):
        if not line.strip() and k + 1 < len(lines):
            parts = lines[k + 1].split()
            if len(parts) == 4:
                try:
                    return int(parts[3]), int(parts[1])
                except ValueError:
                    break
            break
    raise DecodeError("corrupt Radiance HDR header (no resolution line)")


def _jpeg_size(b: bytes) -> tuple[int, int]:
    i = 2
    n = len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            i += 1
            continue
        marker = b[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        seg = struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return w, h
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + seg
    raise DecodeError("truncated or corrupt JPEG (no frame header)")


def _webp_size(b: bytes) -> tuple[int, int]:
    chunk = b[12:16]
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", b[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        v = struct.unpack("<I", b[21:25])[0]
        return (v & 0x3FFF) + 1, ((v >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(b[24:27], "little") + 1
        h = int.from_bytes(b[27:30], "little") + 1
        return w, h
    raise DecodeError("corrupt WebP header")


def _tiff_size(b: bytes) -> tuple[int, int]:
    end = "<" if b[:2] == b"II" else ">"
    off = struct.unpack(end + "I", b[4:8])[0]
    count = struct.unpack(end + "H", b[off:off + 2])[0]
    w = h = None
    for k in range(count):
        e = off + 2 + 12 * k
        tag, typ = struct.unpack(end + "HH", b[e:e + 4])
        val = struct.unpack(end + ("H" if typ == 3 else "I"), b[e + 8:e + (10 if typ == 3 else 12)])[0]
        if tag == 256:
            w = val
        elif tag == 257:
            h = val
    if w is None or h is None:
        raise DecodeError("corrupt TIFF header (no image size)")
    return w, h


# ----------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------


def _check_complete(fmt: str | None, data: bytes) -> None:
    """OpenCV happily returns half an image for a truncated JPEG; refuse it.

    Only the end of the image data counts, not the end of the file: bytes
    after a JPEG's end-of-image marker or after a PNG's IEND chunk (cameras
    and editors write such padding) are ignored, as decoders do.
    """
    if fmt == "jpeg" and not _jpeg_has_end(data):
        raise DecodeError("truncated JPEG (no end-of-image marker)")
    if fmt == "png" and not _png_has_end(data):
        raise DecodeError("truncated PNG (no IEND chunk)")


def _jpeg_has_end(b: bytes) -> bool:
    """Is there an end-of-image marker after the first start-of-scan?

    The marker segments before the scan are skipped by their lengths, so an
    end marker inside them (an EXIF thumbnail) does not count; inside the
    entropy-coded data an 0xFF byte is always stuffed (FF 00) or a restart
    marker, so FF D9 there is the real end.
    """
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            i += 1
            continue
        marker = b[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            return False  # an end marker before any scan
        seg = struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker == 0xDA:
            return b.find(b"\xff\xd9", i + 2 + seg) != -1
        i += 2 + seg
    return False


def _png_has_end(b: bytes) -> bool:
    """Do the PNG's chunks, followed by their lengths, reach an IEND chunk inside the data?"""
    i, n = 8, len(b)
    while i + 8 <= n:
        length = struct.unpack(">I", b[i:i + 4])[0]
        if b[i + 4:i + 8] == b"IEND":
            return True
        i += 12 + length
    return False


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """Any OpenCV image (gray, BGR, BGRA; 8/16-bit or float) as (H, W, 3) uint8 RGB."""
    cv2 = _cv2()
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        f = img.astype(np.float32)
        if f.size and np.nanmax(f) <= 1.0:
            f = f * 255.0
        img = np.clip(np.nan_to_num(f), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    c = img.shape[2]
    if c == 1:
        return cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2RGB)
    if c == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if c == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise DecodeError(f"unsupported number of channels: {c}")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB, or raise :class:`DecodeError`."""
    return decode_image_sized(data, max_pixels)[0]


_REDUCED = {2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def jpeg_reduction(w: int, h: int, size) -> int:
    """The largest of 8, 4, 2 (else 1) that keeps a ``w`` x ``h`` JPEG at least ``size`` = (H, W)."""
    H, W = int(size[0]), int(size[1])
    for f in (8, 4, 2):
        if w >= f * W and h >= f * H:
            return f
    return 1


def decode_image_sized(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to=None):
    """``(image, (width, height))``: RGB uint8 and the size the file declares.

    With ``reduce_to`` = (H, W), a JPEG at least twice that size both ways is
    decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (1.7x faster for
    a 1024x768 photo going to 224x224; pixels within a few levels of a full
    decode followed by an area resize), never below (H, W): the caller still
    resizes to (H, W).  ``(width, height)`` is always the full size.
    """
    if data is None or len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    head = header_size(data)
    fmt = None
    flags = None
    cv2 = _cv2()
    if head is not None:
        fmt, w, h = head
        if w <= 0 or h <= 0:
            raise DecodeError(f"{fmt.upper()} header claims an empty image ({w}x{h})")
        if w * h > max_pixels:
            raise DecodeError(
                f"{fmt.upper()} header claims {w}x{h} = {w * h:,} pixels, more than max_pixels={max_pixels:,}"
            )
        _check_complete(fmt, data)
        if fmt == "jpeg" and reduce_to is not None and (f := jpeg_reduction(w, h, reduce_to)) > 1:
            # (as with IMREAD_UNCHANGED below, the EXIF orientation is not applied)
            flags = getattr(cv2, _REDUCED[f]) | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED if flags is None else flags)
    except cv2.error as e:
        raise DecodeError(_cv_error(e, max_pixels)) from None
    if img is None or img.size == 0:
        if head is None:
            raise DecodeError("not an image (unknown format)")
        raise DecodeError(f"corrupt {fmt.upper()} data (OpenCV cannot decode it)")
    full = (head[1], head[2]) if flags is not None else (img.shape[1], img.shape[0])
    return to_rgb8(img), full


def _cv_error(e: Exception, max_pixels: int) -> str:
    """OpenCV's exception as a reason; its size guard (a raw "Assertion failed") as the pixel limit."""
    msg = " ".join(str(e).split())
    if "validateInputImageSize" in msg or "CV_IO_MAX_IMAGE_PIXELS" in msg:
        return (f"the image has more than max_pixels={max_pixels:,} pixels (refused by OpenCV's "
                "OPENCV_IO_MAX_IMAGE_PIXELS before decoding)")
    return f"OpenCV cannot decode it: {msg[-160:]}"


def decode_mask(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask image to (H, W) bool: any non-zero channel = object."""
    if data is None or len(data) == 0:
        raise DecodeError("empty mask file (0 bytes)")
    try:
        head = header_size(data)
    except DecodeError as e:
        raise DecodeError(f"mask: {e}") from None
    if head is not None and head[1] * head[2] > max_pixels:
        raise DecodeError(f"mask header claims {head[1]}x{head[2]} pixels, more than max_pixels")
    cv2 = _cv2()
    try:
        m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise DecodeError(f"mask: {_cv_error(e, max_pixels)}") from None
    if m is None:
        raise DecodeError("mask is not a decodable image")
    return (m != 0).any(axis=2) if m.ndim == 3 else m != 0


def resize_image(img: np.ndarray, size) -> np.ndarray:
    """Resize (stretch) RGB uint8 to ``size`` = (H, W): area when shrinking, bilinear when growing."""
    cv2 = _cv2()
    H, W = int(size[0]), int(size[1])
    if img.shape[:2] == (H, W):
        return img
    shrink = img.shape[0] * img.shape[1] > H * W
    return cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` = (H, W)."""
    cv2 = _cv2()
    H, W = int(size[0]), int(size[1])
    if mask.shape[:2] == (H, W):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) > 0


def box_to_mask(box, image_hw, size) -> np.ndarray:
    """A pixel box (x0, y0, x1, y1) on the original image as a bool mask at ``size``."""
    h, w = image_hw
    H, W = int(size[0]), int(size[1])
    x0, y0, x1, y1 = (float(v) for v in box)
    m = np.zeros((H, W), bool)
    # pixel centres of the resized grid, mapped back to original pixel coordinates
    xs = (np.arange(W) + 0.5) * (w / W)
    ys = (np.arange(H) + 0.5) * (h / H)
    m[np.ix_((ys >= y0) & (ys < y1), (xs >= x0) & (xs < x1))] = True
    return m
