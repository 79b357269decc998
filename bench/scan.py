"""Benchmark of the scan at scale (run by hand; prints a table).

    .venv/bin/python bench/scan.py                        # 10^4 and 10^5 maps, a few minutes
    .venv/bin/python bench/scan.py --maps 10000 100000 1000000

For each size, a fake job output with planted strategies is generated
(``tests/helpers_records.py``: three classes, a fixed-corner cue with 4% of
its maps elsewhere, a healthy class, a class with a minority strategy on 10%
of its maps; every map a copy of one of 200 drawn maps per class with 5%
multiplicative noise per cell, the issue's "copied to 10^6 with noise"), then
``audit.scan.scan`` runs on it without intervention (no model), in a fresh
process, so that its peak resident memory (``ru_maxrss``) is the scan's own.
Generation is not timed.  The same distribution at 200 maps per class is
scanned first: the verdicts and cues at every size must equal those.

``--distinct`` draws every map anew instead: no copies to merge, so every
class reaches the 2000 prototypes (the clustering's worst case).

Then one class of ``--minority-class`` maps, all drawn anew (no copies), 2%
of them on a tight corner strategy: the scan must find those 2% as a
cluster of their own and flag the class.

Targets: 10^6 maps scanned in under 10 minutes on 2 CPU cores and in under
4 GB.  The table prints the cores and the load average around each run: on
a shared machine the wall time measures the machine too; the CPU time (user
+ system of the scan's process) is less sensitive to that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

TARGET_S = 600.0
TARGET_MB = 4096.0


def child(out: str) -> None:
    """Scan ``out`` in this (fresh) process; print time, CPU time, peak RSS and the verdicts as JSON."""
    t0, c0 = time.perf_counter(), time.process_time()
    from audit.scan import scan

    classes, clusters = scan(out, intervene=False, quiet=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    verdicts = {r.class_name: [r.verdict, r.cue, int(r.n_clusters)] for r in classes.itertuples()}
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": rss_mb, "verdicts": verdicts}))


def run_scan(out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=str(HERE.parent))
    load0 = os.getloadavg()[0]
    p = subprocess.run([sys.executable, __file__, "--child", str(out)], env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["load"] = (load0 + os.getloadavg()[0]) / 2
    return res


def minority_check(root: Path, n: int, threads: int) -> None:
    """One class of ``n`` distinct maps, 2% of them on a tight strategy: a cluster of its own?"""
    import helpers_records as hr

    out = hr.write_out(root / "minority", n, minority=0.02, classes=("minority",))
    r = run_scan(out, threads)
    shutil.rmtree(out, ignore_errors=True)
    verdict, cue, k = r["verdicts"]["minority"]
    ok = verdict == "shortcut_suspected" and k >= 2
    print(f"\none class of {n:,} distinct maps, 2% on a tight corner strategy: {verdict}, cue '{cue}', "
          f"{k} clusters ({'found' if ok else 'NOT found'}); scanned in {r['wall']:.1f} s, "
          f"peak {r['rss_mb']:.0f} MB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maps", type=int, nargs="+", default=[10_000, 100_000], help="total maps (3 classes)")
    ap.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads of the scan (the 2 cores)")
    ap.add_argument("--distinct", action="store_true",
                    help="draw every map anew instead of copying 200 per class (the prototypes' worst case)")
    ap.add_argument("--minority-class", type=int, default=100_000,
                    help="maps of the class with a 2%% strategy (0: skip)")
    ap.add_argument("--dir", help="where to write the fake outputs (default: a temporary directory)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child)
    import helpers_records as hr

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-scan-"))
    k = len(hr.CLASSES)
    print(f"machine: {os.cpu_count()} cores; scan with {a.threads} BLAS threads; "
          f"load average now {os.getloadavg()[0]:.1f}; maps {'drawn anew' if a.distinct else 'copied'}")
    try:
        ref = run_scan(hr.write_out(root / "ref", 200, copies_of=200, minority=0.1), a.threads)
        rows = []
        for n in a.maps:
            t = time.perf_counter()
            out = hr.write_out(root / f"n{n}", max(1, n // k), copies_of=None if a.distinct else 200,
                               minority=0.1)
            gen = time.perf_counter() - t
            r = run_scan(out, a.threads)
            shutil.rmtree(out, ignore_errors=True)
            rows.append((n, gen, r))
            print(f"  {n:>9,} maps: generated in {gen:.0f} s, scanned in {r['wall']:.1f} s", flush=True)
        print()
        hdr = f"{'maps':>10} {'scan s':>8} {'cpu s':>8} {'peak MB':>8} {'load':>5} {'s/target':>8} " \
              f"{'MB/target':>9} {'clusters':>8}  same verdicts and cues as at 600 maps"
        print(hdr)
        print("-" * len(hdr))
        names = sorted(ref["verdicts"])
        for n, _, r in rows:
            same = all(r["verdicts"][c][:2] == ref["verdicts"][c][:2] for c in names)
            ks = "/".join(str(r["verdicts"][c][2]) for c in names)
            print(f"{n:>10,} {r['wall']:>8.1f} {r['cpu']:>8.1f} {r['rss_mb']:>8.0f} {r['load']:>5.1f} "
                  f"{r['wall'] / TARGET_S:>8.2f} {r['rss_mb'] / TARGET_MB:>9.2f} {ks:>8}  {'yes' if same else 'NO'}")
            if not same:
                print(f"{'':>12}{r['verdicts']}\n{'':>12}vs {ref['verdicts']}")
        print(f"at 600 maps ([verdict, cue, clusters] of {', '.join(names)}): {ref['verdicts']}")
        if a.minority_class:
            minority_check(root, a.minority_class, a.threads)
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
