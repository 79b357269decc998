"""How long `audit run` takes to report a mistake (run by hand; prints seconds per case).

    PYTHONPATH=$PWD .venv/bin/python bench/feedback.py [--repeat 3]

Builds a tiny model and folder dataset in a temporary directory and times
`python -m audit run` (a fresh process each time, as a user runs it) on:

* a spec typo (`dataset.shardsize`): checked before TensorFlow is imported;
* an unknown layer (`explain.layers=[nope]`): found in the .keras file's
  config.json, before TensorFlow is imported;
* a bad target (`explain.target=7`) and a class count that does not fit the
  model: need the model, found by the driver before Ray or any actor starts
  (the TensorFlow import dominates).

Each case must exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CASES = [
    ("spec typo", "typo.yaml", []),
    ("unknown layer", "job.yaml", ["--set", "explain.layers=[nope]"]),
    ("bad target", "job.yaml", ["--set", "explain.target=7"]),
    ("class count", "job.yaml", ["--set", "dataset.classes=[cat, dog, cow]"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import helpers_jobs as h

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        h.make_model(tmp / "model.keras")
        h.make_folder(tmp / "data", 4, masks=False)
        h.write_spec(tmp / "job.yaml")
        h.write_spec(tmp / "typo.yaml", dataset={"format": "folder", "path": "data", "shardsize": 8})
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        print(f"{'case':<14} {'median s':>9} {'min s':>7}  message")
        for name, spec, extra in CASES:
            times, line = [], ""
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "audit", "run", spec, "--no-progress", *extra],
                                   cwd=tmp, env=env, capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                lines = r.stderr.strip().splitlines()
                assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-1000:])
                line = lines[0]
            print(f"{name:<14} {statistics.median(times):9.2f} {min(times):7.2f}  {line[:90]}")


if __name__ == "__main__":
    main()
