"""GPU check of audit jobs (run by hand on a machine with NVIDIA GPUs).

    .venv/bin/python bench/gpu.py                          # ResNet50 at 224x224, 2048 images
    .venv/bin/python bench/gpu.py --model small --images 512   # a quick look
    .venv/bin/python bench/gpu.py --allow-cpu --model small --images 128   # the script itself, on a CPU

Prints a table of checks and figures; exits 1 when a check fails, 2 when
TensorFlow sees no GPU (unless ``--allow-cpu``).

1. TensorFlow sees the GPUs, and Ray counts them.
2. A job with ``resources`` left to ``auto`` (embedded Ray): one actor per GPU,
   each seeing exactly one GPU (distinct ``CUDA_VISIBLE_DEVICES``) with memory
   growth on. Read from ``job.json["runs"][-1]["actors"]``.
3. The job's steady images/s per GPU against the engine alone on one GPU
   (the Explainer on images already in memory, in a fresh process).
4. Mixed precision: the engine's images/s in ``mixed_float16`` against
   float32, and how far the maps move: the same images explained for the
   same class in both, each map divided by its maximum, then the median
   Pearson r and the 99th percentile of the absolute difference.
5. The same job with ``resources.mixed_precision: true``: its actors report
   mixed precision.

The model has random weights (``keras.applications`` with ``weights=None``):
nothing is downloaded. Figures from one run; the machine is not otherwise
controlled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CLASSES = 2


def make_model(path: Path, kind: str, size: int) -> None:
    import keras

    keras.utils.set_random_seed(0)
    if kind == "resnet50":
        model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=CLASSES)
    else:
        inp = keras.Input((size, size, 3))
        x = inp
        for i, width in enumerate((32, 64, 128)):
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{i}")(x)
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inp, keras.layers.Dense(CLASSES, activation="softmax")(x))
    model.save(path)


ENGINE_CODE = r"""
import json, sys, time
import numpy as np
from audit.runner.worker import _configure_tensorflow, to_mixed_precision
model_path, precision, batch, n, probe_path, out_path = sys.argv[1:7]
batch, n = int(batch), int(n)
info = _configure_tensorflow(None, gpu=True, mixed_precision=precision == "fp16")
import keras
from audit.engine.explainer import Explainer
model = keras.models.load_model(model_path, compile=False)
if info["mixed_precision"]:
    model = to_mixed_precision(model)
ex = Explainer(model, layers="auto", methods=("gradcam", "gradcam++"), target="label", batch_size=batch)
x = np.random.default_rng(1).random((n, *ex.input_shape), dtype=np.float32)
labels = np.zeros(n, np.int32)
ex(x[:batch], labels[:batch])  # trace and warm up
ex(x[:batch], labels[:batch])
t0 = time.perf_counter()
ex(x, labels)
rate = n / (time.perf_counter() - t0)
probe = np.load(probe_path)
res = ex(probe, np.zeros(len(probe), np.int32))  # every map explains class 0: comparable across precisions
np.savez(out_path, **{f"{layer}|{m}": v for (layer, m), v in res.maps.items()})
print(json.dumps({"rate": rate, "gpus": info["gpus"], "mixed_precision": info["mixed_precision"],
                  "policy": str(keras.mixed_precision.global_policy().name)}))
"""


def engine(model_path, precision, batch, n, probe, out):
    r = subprocess.run([sys.executable, "-c", ENGINE_CODE, str(model_path), precision, str(batch), str(n),
                        str(probe), str(out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"engine ({precision}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def map_agreement(a_path, b_path):
    """Median Pearson r and 99th percentile |difference| of max-normalised maps, over all keys."""
    a, b = np.load(a_path), np.load(b_path)
    rs, diffs = [], []
    for key in a.files:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        for mx, my in zip(x, y, strict=True):
            if mx.max() <= 0 or my.max() <= 0:
                continue
            mx, my = mx / mx.max(), my / my.max()
            if mx.std() > 0 and my.std() > 0:
                rs.append(np.corrcoef(mx.ravel(), my.ravel())[0, 1])
            diffs.append(np.abs(mx - my).ravel())
    if not rs:
        return float("nan"), float("nan")
    return float(np.median(rs)), float(np.percentile(np.concatenate(diffs), 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("resnet50", "small"), default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shard", type=int, default=256)
    ap.add_argument("--allow-cpu", action="store_true", help="run the checks without a GPU (to test the script)")
    args = ap.parse_args()

    from audit.quiet import import_tensorflow

    tf = import_tensorflow()
    n_gpu = len(tf.config.list_physical_devices("GPU"))
    if not n_gpu and not args.allow_cpu:
        print("TensorFlow sees no GPU: this check needs one (or --allow-cpu to test the script).")
        return 2

    import job as jobbench  # bench/job.py: the same images and steady-state timing


    rows, failed = [], []

    def check(name, ok, figure):
        rows.append((name, "ok" if ok else "FAIL", figure))
        if not ok:
            failed.append(name)

    with tempfile.TemporaryDirectory(prefix="audit-gpu-") as d:
        tmp = Path(d)
        make_model(tmp / "model.keras", args.model, args.size)
        imgs = jobbench.make_images(tmp / "data", args.images, args.size)
        probe = np.stack(imgs[:64]).astype(np.float32) / 255.0
        np.save(tmp / "probe.npy", probe)

        import logging

        import ray

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
        ray_gpus = ray.cluster_resources().get("GPU", 0)
        check("TensorFlow and Ray see the GPUs", n_gpu > 0 and ray_gpus == n_gpu,
              f"TensorFlow {n_gpu}, Ray {ray_gpus:g}")

        results = {}
        for mixed in (False, True):
            spec = jobbench.spec_for(tmp, tmp / f"out_{int(mixed)}", args.shard, args.batch,
                                     mixed_precision=mixed)
            steady, _, end_to_end, s = jobbench.timed_job(spec, n_actors=max(1, n_gpu))
            facts = json.loads((tmp / f"out_{int(mixed)}" / "job.json").read_text())["runs"][-1]["actors"]
            results[mixed] = (steady, end_to_end, s, facts)
        ray.shutdown()

        steady, end_to_end, s, facts = results[False]
        devices = [f.get("visible_devices") for f in facts]
        check("one actor per GPU", len(facts) == max(1, n_gpu), f"{len(facts)} actors: {s['devices']}")
        check("each actor sees one GPU, its own", all(f["gpus"] == (1 if n_gpu else 0) for f in facts)
              and len(set(devices)) == len(devices), f"CUDA_VISIBLE_DEVICES {devices}")
        check("memory growth on in every actor", all(all(f["memory_growth"]) for f in facts),
              str([f["memory_growth"] for f in facts]))
        mixed_facts = results[True][3]
        check("mixed_precision: true reaches the actors", all(f["mixed_precision"] for f in mixed_facts) or not n_gpu,
              results[True][2]["devices"])

        e32 = engine(tmp / "model.keras", "fp32", args.batch, min(args.images, 1024), tmp / "probe.npy",
                     tmp / "maps32.npz")
        e16 = engine(tmp / "model.keras", "fp16", args.batch, min(args.images, 1024), tmp / "probe.npy",
                     tmp / "maps16.npz")
        r, p99 = map_agreement(tmp / "maps32.npz", tmp / "maps16.npz")
        check("fp16 maps agree with fp32 (median r >= 0.98)", (r >= 0.98) or not e16["mixed_precision"],
              f"median r {r:.4f}, 99th pct |diff| {p99:.4f}" + ("" if e16["mixed_precision"] else " (no GPU: both fp32)"))

    per_gpu = steady / max(1, n_gpu)
    print(f"\n{args.model} at {args.size}x{args.size}, {args.images} JPEG images, batch {args.batch}, "
          f"Grad-CAM + Grad-CAM++ on the last conv layer; {n_gpu} GPU(s)\n")
    width = max(len(r[0]) for r in rows)
    for name, status, fig in rows:
        print(f"  {name:<{width}}  {status:<4}  {fig}")
    print()
    print(f"  engine alone, 1 {'GPU' if n_gpu else 'process'}, float32      {e32['rate']:9.1f} images/s")
    print(f"  engine alone, mixed_float16           {e16['rate']:9.1f} images/s   "
          f"({e16['rate'] / e32['rate']:.2f}x float32; policy {e16['policy']})")
    print(f"  job, steady state, per GPU            {per_gpu:9.1f} images/s   "
          f"({per_gpu / e32['rate']:.2f}x the engine alone)")
    print(f"  job, end to end (start-up included)   {end_to_end:9.1f} images/s")
    mixed_steady = results[True][0] / max(1, n_gpu)
    print(f"  job with mixed precision, per GPU     {mixed_steady:9.1f} images/s   "
          f"({mixed_steady / per_gpu:.2f}x the float32 job)")
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
