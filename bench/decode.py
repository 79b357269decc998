"""Benchmark of image decoding for the model input (run by hand; prints ms/image and ratios).

    .venv/bin/python bench/decode.py

For photo-sized JPEGs going to common model inputs: the full decode followed by
an area resize (what a naive loader does) vs :func:`audit.data.decode.decode_image_sized`
with ``reduce_to`` (libjpeg DCT scaling to 1/2, 1/4 or 1/8, then the same
resize), interleaved in one run, and how far apart the pixels end up.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from audit.data import decode


def photo(h, w, seed=0):
    """A photo-like JPEG: smooth gradients, texture and sensor noise (quality 90)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, 127 + 60 * np.sin(x / 23.0) * np.cos(y / 17.0)], -1)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 2) + rng.normal(0, 6, (h, w, 3))
    ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def per_image_ms(fn, data, repeat):
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(data)
    return 1000 * (time.perf_counter() - t0) / repeat


def main():
    cv2.setNumThreads(1)
    cases = [((375, 500), (224, 224)), ((768, 1024), (224, 224)), ((1080, 1920), (224, 224)),
             ((3024, 4032), (224, 224)), ((3024, 4032), (512, 512))]
    print(f"{'JPEG':>11} -> {'input':>7}  {'scale':>5}  {'full decode':>11}  {'reduced':>8}  {'speed-up':>8}"
          f"  {'mean |diff|':>11}  {'max':>4}")
    for (h, w), size in cases:
        data = photo(h, w)
        repeat = max(3, int(200_000_000 / (h * w * 60)))

        def full(d, size=size):
            return decode.resize_image(decode.decode_image(d), size)

        def reduced(d, size=size):
            return decode.resize_image(decode.decode_image_sized(d, reduce_to=size)[0], size)

        a = b = 0.0
        for _ in range(3):  # interleaved rounds: the machine's load hits both alike
            a += per_image_ms(full, data, repeat)
            b += per_image_ms(reduced, data, repeat)
        diff = np.abs(full(data).astype(int) - reduced(data).astype(int))
        f = decode.jpeg_reduction(w, h, size)
        print(f"{w:>5}x{h:<5} -> {size[1]}x{size[0]:<3}  {'1/' + str(f):>5}  {a / 3:9.2f} ms  {b / 3:6.2f} ms"
              f"  {a / b:7.2f}x  {diff.mean():11.2f}  {diff.max():4d}")


if __name__ == "__main__":
    main()
