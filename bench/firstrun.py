"""A new user's first commands, timed against a TensorFlow import on the same machine in the same run.

Prints, for each, the seconds and the ratio to `python -c "import tensorflow"`
measured just before it (so the machine's load cancels out):

* the checks that need no model, which run before TensorFlow is imported
  (a PNG given as the model, a SavedModel folder, an unknown layer in an .h5
  model): target within half a TensorFlow import;
* `audit layers MODEL`: target within 2x;
* a 100-image job with `--no-scan`: in the driver (the default for a small
  local job) and on Ray (`AUDIT_IN_PROCESS=0`, as before): target within 2x;
* the breakdown of that job: imports, Ray start, actor start, model load,
  compile, compute (from job.json), and of the scan and the report after it.

    python bench/firstrun.py [--images 100] [--rounds 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def timed(args, env=None, cwd=None) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)
    return time.perf_counter() - t0, r


def tf_import() -> float:
    s, r = timed([sys.executable, "-c", "import tensorflow"])
    assert r.returncode == 0, r.stderr[-2000:]
    return s


def audit(*args, env=None, cwd=None, expect=0):
    s, r = timed([sys.executable, "-m", "audit", *map(str, args)], env=env, cwd=cwd)
    if r.returncode != expect:
        raise SystemExit(f"audit {' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return s, r


def workspace(root: Path, images: int) -> dict:
    """A model (.keras and .h5), a PNG, a SavedModel-like folder and a folder dataset of ``images``."""
    import keras
    from helpers_jobs import image, make_folder, make_model, write_png, write_spec

    make_model(root / "model.keras", size=32)
    keras.models.load_model(root / "model.keras").save(root / "model.h5")
    write_png(root / "photo.png", image(0, 0, size=32)[0])
    (root / "saved").mkdir()
    (root / "saved" / "saved_model.pb").write_bytes(b"\x08\x01")
    make_folder(root / "data", images // 2, masks=False, size=32)
    spec = write_spec(root / "job.yaml", model={"path": "model.keras", "preprocess": "scale_0_1"},
                      dataset={"format": "folder", "path": "data", "shard_size": 50},
                      resources={"actors": "auto", "batch_size": 32})
    return {"spec": spec}


def job_breakdown(out: Path, wall: float, imports: float) -> dict:
    """Where a job's seconds went, from its job.json (driver side) and the measured import time."""
    job = json.loads((out / "job.json").read_text())
    t, run = job["timings"], job["runs"][-1]
    actor = (run.get("actors") or [{}])[0]
    startup = t.get("startup_s") or 0.0
    ready = t.get("first_actor_ready_s") or 0.0
    check = t.get("model_check_s") or t.get("model_load_s") or 0.0
    ray = t.get("ray_start_s") or 0.0
    return {"wall (the command)": wall,
            "a TensorFlow import alone (measured before)": imports,
            "driver: TensorFlow import + model load and compile (its check, or its worker)": check,
            "driver: Ray start": ray,
            "driver: the rest before the run (Python imports, spec, plan, lock)": startup - ready - check - ray,
            "actor start, its TensorFlow import, model load and compile (Ray only)": ready,
            "  of which the actor's setup (TF import, model, compile)": actor.get("setup_s") if ready else 0.0,
            "compute (first worker ready to last commit)": job["summary"].get("compute_s") or 0.0,
            "after the run (job.json, exit)": wall - startup - (job["summary"].get("compute_s") or 0.0)}


def show(name: str, seconds: float, tf: float, target: float | None = None) -> None:
    ratio = seconds / tf
    verdict = "" if target is None else ("  within" if ratio <= target else "  OVER") + f" {target}x"
    print(f"  {name:<58} {seconds:7.2f} s  {ratio:5.2f}x TF import{verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--keep", help="work in this folder and keep it")
    a = p.parse_args()
    root = Path(a.keep or tempfile.mkdtemp(prefix="firstrun-"))
    root.mkdir(parents=True, exist_ok=True)
    workspace(root, a.images)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; workspace {root}")
    for rnd in range(a.rounds):
        tf = tf_import()
        print(f"round {rnd + 1}: python -c 'import tensorflow': {tf:.2f} s")
        show("audit layers photo.png (no model file)", audit("layers", "photo.png", cwd=root, expect=2)[0], tf, 0.5)
        show("audit layers saved (a SavedModel folder)", audit("layers", "saved", cwd=root, expect=2)[0], tf, 0.5)
        show("audit explain model.h5 photo.png --layers nope", audit(
            "explain", "model.h5", "photo.png", "--out", "x", "--layers", "nope", cwd=root, expect=2)[0], tf, 0.5)
        show("audit run with an unknown layer (.h5 model)", audit(
            "run", "job.yaml", "--set", "model.path=model.h5", "--set", "explain.layers=[nope]", "--set",
            "output=bad", cwd=root, expect=2)[0], tf, 0.5)
        show("audit layers model.keras", audit("layers", "model.keras", cwd=root)[0], tf, 2.0)
        for label, env in (("in the driver", {}), ("on Ray (AUDIT_IN_PROCESS=0)", {"AUDIT_IN_PROCESS": "0"})):
            out = root / f"out-{rnd}-{'ray' if env else 'driver'}"
            shutil.rmtree(out, ignore_errors=True)
            wall, _ = audit("run", "job.yaml", "--no-scan", "--no-progress", "--set", f"output={out}",
                            env=env, cwd=root)
            show(f"audit run --no-scan, {a.images} images, {label}", wall, tf, 2.0)
            for k, v in job_breakdown(out, wall, tf).items():
                if isinstance(v, float):
                    print(f"      {k:<66} {v:7.2f} s")
            scan_s, _ = audit("scan", out, "--quiet", cwd=root)
            report_s, _ = audit("report", out, cwd=root)
            print(f"      {'audit scan (causal tests included)':<66} {scan_s:7.2f} s")
            print(f"      {'audit report':<66} {report_s:7.2f} s")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
