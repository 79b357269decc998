"""Cost of the per-image cue pass against the job's model time (run by hand; prints figures and the ratio).

    .venv/bin/python bench/perimage.py                   # 10,000 images, one cue, 3 rounds
    .venv/bin/python bench/perimage.py --images 2000     # quicker

The job's model time is the Explainer (Grad-CAM and Grad-CAM++, one compiled
forward+backward pass per batch of 32, as ``audit run`` computes it) over
``--images`` 64 x 64 images on the zoo's network (random weights: the cost does
not depend on training), as bench/causal.py measures it.  The pass is what
:class:`audit.scan.imagepass.CueWorker` computes per image for one cue (a
corner): ``cue_share`` from the job's raw maps (resized to the input), the
cue removed by the causal test's edit (:func:`audit.scan.perimage.remove_cue`,
mean-colour occlusion), the presence detector's pixel features
(:func:`audit.scan.perimage.pixel_features`) and one compiled forward pass per
image (:class:`audit.scan.imagepass.FixedPredict`, batches of 32).  Image
decoding and Parquet I/O are left out of both sides (the pass reads the
images once more, as the job did).  Target: at most +35% of the job's model
time for one cue at 10,000 images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def job_model_time(model, x: np.ndarray, batch: int = 32):
    """(seconds, raw maps of the first layer/method) of the Explainer over ``x``."""
    from audit.engine.explainer import Explainer

    ex = Explainer(model, methods=("gradcam", "gradcam++"), batch_size=batch)
    ex(x[:batch].astype(np.float32))
    maps = []
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        res = ex(x[s:s + batch].astype(np.float32))
        maps.append(next(iter(res.maps.values())))
    return time.perf_counter() - t0, np.concatenate(maps)


def pass_time(model, x: np.ndarray, maps: np.ndarray, chunk: int = 256) -> float:
    """Seconds of the per-image pass for one corner cue over ``x`` (uint8 images)."""
    from audit.engine.heads import Head
    from audit.scan import perimage
    from audit.scan.imagepass import FixedPredict

    predict = FixedPredict(model, Head.of(model))
    predict(x[:64].astype(np.float32))  # warm-up: the worker loads the model once
    cue = perimage.Cue(0, "c0", "corner:bottom_right", "corner:bottom_right", (2 / 3, 2 / 3, 1, 1))
    px = perimage.cue_pixels(cue, x.shape[1:3], n=1)[0]
    t0 = time.perf_counter()
    for s in range(0, len(x), chunk):
        imgs = x[s:s + chunk]
        pxn = np.broadcast_to(px, imgs.shape[:3])
        perimage.cue_share(maps[s:s + chunk], px)
        perimage.pixel_features(imgs, pxn)
        edited = perimage.remove_cue(imgs, cue, pxn)
        predict(edited.astype(np.float32) / 255)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    from audit.zoo.train import build_model

    model = build_model(4)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, 64, 64, 3), dtype=np.uint8)
    ratios = []
    for r in range(args.repeat):  # job and pass alternate: a change of machine load hits both
        t_job, maps = job_model_time(model, x.astype(np.float32) / 255)
        t_pass = pass_time(model, x, maps)
        ratios.append(t_pass / t_job)
        print(f"round {r + 1}: job model time (Explainer, gradcam + gradcam++) {t_job:6.1f} s "
              f"({args.images / t_job:.0f} images/s); per-image pass, one cue {t_pass:5.1f} s "
              f"({args.images / t_pass:.0f} images/s); ratio {ratios[-1]:.3f}")
    print(f"images {args.images}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"ratio pass / job model time: median {float(np.median(ratios)):.3f} of {len(ratios)} (target <= 0.35)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
