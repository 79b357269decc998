"""Cost of the input checks (run by hand; prints a table with ratios).

    .venv/bin/python bench/inputs.py              # about 20 s
    .venv/bin/python bench/inputs.py --records 5000

1. TFRecord planning: walking the headers with their length checksum
   (``audit.data.tfrecord.frames``) against a walk that only reads the
   lengths (what planning did before), records/s.
2. TFRecord reading: records read with the data checksum (CRC32C of every
   record) against plain reads, MB/s, and the share of a PNG decode of the
   same records that the checksum adds.
3. Resynchronising after a corrupt stretch: MB of random (and of zero) bytes
   searched per second for the next valid header (vectorised CRC of the
   8-byte windows that can hold a length).
4. Reading an image file through ``read_regular_file`` (stat, non-blocking
   open, fstat, bounded read) against ``open().read()``, files/s.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.data import decode, files, tfrecord  # noqa: E402


def _write_tfrecord(path: Path, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        for data in records:
            head = struct.pack("<Q", len(data))
            f.write(head + struct.pack("<I", tfrecord.masked_crc(head)) + data
                    + struct.pack("<I", tfrecord.masked_crc(data)))


def _plain_walk(path: Path) -> int:
    size, n, pos = path.stat().st_size, 0, 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            (length,) = struct.unpack("<Q", f.read(12)[:8])
            pos += 16 + length
            n += 1
    return n


def _best(fn, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--side", type=int, default=224, help="side of the PNG in each record")
    args = ap.parse_args()
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (args.side, args.side, 3), np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)  # photo-like: compresses
    png = cv2.imencode(".png", img)[1].tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.tfrecord"
        _write_tfrecord(path, [png] * args.records)
        size = path.stat().st_size
        rows = []

        def checked_walk():
            with open(path, "rb") as f:
                return sum(1 for _ in tfrecord.frames(f, size))

        assert checked_walk() == _plain_walk(path) == args.records
        t_plain, t_checked = _best(lambda: _plain_walk(path)), _best(checked_walk)
        rows.append(("plan: headers walked, records/s", args.records / t_plain, args.records / t_checked))

        def read(check: bool):
            with open(path, "rb") as f:
                for fr in tfrecord.frames(f, size):
                    if check:
                        tfrecord.read_record(f, fr, 1 << 30)
                    else:
                        f.seek(fr.offset + 12)
                        f.read(fr.length)

        t_read, t_crc = _best(lambda: read(False)), _best(lambda: read(True))
        rows.append(("read: MB/s (data CRC32C)", size / 1e6 / t_read, size / 1e6 / t_crc))
        t_decode = _best(lambda: [decode.decode_image(png) for _ in range(200)], 3) / 200
        extra = (t_crc - t_read) / args.records
        junk = Path(tmp) / "junk.tfrecord"
        junk.write_bytes(rng.bytes(8 << 20))
        jsize = junk.stat().st_size

        def resync():
            with open(junk, "rb") as f:
                return list(tfrecord.frames(f, jsize))

        t_junk = _best(resync, 3)
        junk.write_bytes(bytes(8 << 20))
        t_zero = _best(resync, 3)
        image = Path(tmp) / "a.png"
        image.write_bytes(png)
        t_open = _best(lambda: [image.read_bytes() for _ in range(2000)], 3)
        t_safe = _best(lambda: [files.read_regular_file(str(image)) for _ in range(2000)], 3)
    print(f"{'':38s} {'before':>12s} {'checked':>12s} {'ratio':>7s}")
    for name, a, b in rows:
        print(f"{name:38s} {a:12,.0f} {b:12,.0f} {b / a:7.2f}")
    print(f"{'read_regular_file: files/s':38s} {2000 / t_open:12,.0f} {2000 / t_safe:12,.0f} "
          f"{t_open / t_safe:7.2f}")
    print(f"data CRC per {len(png) / 1e3:.0f} kB record: {extra * 1e6:.1f} us = "
          f"{100 * extra / t_decode:.1f}% of its PNG decode ({t_decode * 1e3:.2f} ms)")
    print(f"resync through 8 MB of random bytes: {jsize / 1e6 / t_junk:,.0f} MB/s, of zero bytes: "
          f"{jsize / 1e6 / t_zero:,.0f} MB/s")
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
