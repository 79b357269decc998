"""Cost of the file stats in a shard identity (run by hand; prints a table with ratios).

    .venv/bin/python bench/identity.py               # about 10 s
    .venv/bin/python bench/identity.py --images 50000

A folder dataset of tiny files (the identity reads no image, so their bytes
do not matter) is planned once; then every shard's identity is computed as
``--resume`` does, with the size and mtime of each file (``content``, one
``os.stat`` per file) and without them (names only, as before), and the
ratio is printed.  The first pass warms the page cache and the listing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from audit.data.jobspec import DatasetSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.data import datasets, identity  # noqa: E402


def _make(root: Path, n: int, classes: int) -> None:
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(n // classes):
            (d / f"img_{i:06d}.png").write_bytes(b"x" * (64 + i % 7))


def _time(ds, plan, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for s in plan.shards:
            identity.shard_identity(ds, s, plan.classes)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "d"
        _make(root, a.images, a.classes)
        ds = DatasetSpec.from_partial({"format": "folder", "path": str(root), "shard_size": a.shard_size})
        plan = datasets.plan(ds)
        _time(ds, plan, 1)  # warm
        with_stat = _time(ds, plan, a.reps)
        real = identity.file_stat
        identity.file_stat = lambda path: ()  # names only: what the identity hashed before
        try:
            names_only = _time(ds, plan, a.reps)
        finally:
            identity.file_stat = real
    n = plan.total
    print(f"{n:,} images in {len(plan.shards)} shards of {a.shard_size} (best of {a.reps})")
    print(f"{'identity':<26}{'s':>8}{'images/s':>12}")
    print(f"{'names only (before)':<26}{names_only:>8.3f}{n / names_only:>12,.0f}")
    print(f"{'names + size/mtime (now)':<26}{with_stat:>8.3f}{n / with_stat:>12,.0f}")
    print(f"ratio now/before: {with_stat / names_only:.2f}x; the stats add "
          f"{1e6 * (with_stat - names_only) / n:.1f} us per image")


if __name__ == "__main__":
    main()
