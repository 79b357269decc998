"""Cost of the per-image cue pass against the job's model time (run by hand; prints figures and ratios).

    .venv/bin/python bench/perimage.py                   # 10,000 images, one cue, 2 rounds
    .venv/bin/python bench/perimage.py --images 2000     # quicker

The dataset is the zoo's ``six`` case (:mod:`audit.zoo.cases`): 64 x 64
renderings of six shapes, the same number of images per class, a square of
random pixels on the right edge of every ring image; the cue is that place
for the ring class.  The model is the zoo's network for six classes with
random weights (the cost does not depend on training), and each image's
prediction is taken to be its label: a model that is right on a balanced
six-class dataset, so one image in six is predicted as the cue's class (a
model whose errors fall into the cue's class adds those images).

The job's model time is the Explainer (Grad-CAM and Grad-CAM++, one compiled
forward+backward pass per batch of 32, as ``audit run`` computes it).  The
pass is what :class:`audit.scan.imagepass.CueWorker` computes per image for
one cue: ``cue_share`` from the job's raw maps, the presence detector's pixel
features, and the cue removed by the causal test's edit followed by one
compiled forward pass (:class:`audit.scan.imagepass.FixedPredict`, batches of
32), for the images predicted as the cue's class only
(:func:`audit.scan.perimage.candidates`).  ``before`` is the first version of
the pass, kept here for the comparison: the edit and forward pass on every
image, the features one image at a time, ``cue_share`` in float64 over every
image's mask.  Image decoding and Parquet I/O are
left out of every side.  Job, before and after alternate in each round, so a
change of machine load hits all three.  Target: the pass at most +35% of the
job's model time for one cue at 10,000 images.
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

CHUNK = 1024  # images per step of the pass: a shard, as a worker reads it in one go


def dataset(n: int):
    """(uint8 images, labels, the cue) of ``n`` images of the zoo's ``six`` case, balanced over its classes."""
    from audit.scan import perimage
    from audit.zoo.cases import CASES, render

    case = CASES["six"]
    k = len(case.classes)
    samples = [render(case, "heldout", i // k, i % k) for i in range(n)]
    cls = case.cues[0][0]
    cue = perimage.Cue(cls, case.classes[cls], "noise", "box", (0.8, 0.35, 1.0, 0.65))
    return np.stack([s.image for s in samples]), np.array([s.label for s in samples]), cue


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


def features_one_by_one(images, pixels, side: int = 16):
    """The first version's pixel features: three OpenCV resizes and a median per image."""
    import cv2

    imgs = np.asarray(images, np.float32) / 255.0
    c = imgs.shape[-1]
    out = np.zeros((len(imgs), side * side * c), np.float32)
    for i in range(len(imgs)):
        mf = pixels[i].astype(np.float32)
        on = cv2.resize(imgs[i] * mf[..., None], (side, side), interpolation=cv2.INTER_AREA).reshape(side, side, c)
        cover = cv2.resize(mf, (side, side), interpolation=cv2.INTER_AREA)
        rest = cv2.resize(imgs[i], (side, side), interpolation=cv2.INTER_AREA).reshape(side, side, c)[cover < 0.5]
        med = np.median(rest, axis=0) if len(rest) else np.zeros(c, np.float32)
        out[i] = (on - cover[..., None] * med).reshape(-1)
    return out


def share_float64(maps, pixels):
    """The first version's ``cue_share``: the resized maps in float64, a product with every image's mask."""
    from audit.engine.stats import resize_maps

    H, W = pixels.shape[-2:]
    e = np.maximum(resize_maps(np.asarray(maps, np.float32), (H, W)), 0).astype(np.float64)
    tot = e.sum(axis=(1, 2))
    inside = (e * np.broadcast_to(pixels, e.shape)).sum(axis=(1, 2))
    return np.where(tot > 0, inside / np.where(tot > 0, tot, 1.0), np.nan)


def pass_time(predict, x, maps, pred, cue, before: bool) -> tuple[float, int]:
    """(seconds, forward passes) of the pass for ``cue`` over ``x``; ``before``: the first version."""
    from audit.scan import perimage

    px = perimage.cue_pixels(cue, x.shape[1:3], n=1)[0]
    forwards = 0
    t0 = time.perf_counter()
    for s in range(0, len(x), CHUNK):
        imgs, p = x[s:s + CHUNK], pred[s:s + CHUNK]
        pxn = np.broadcast_to(px, imgs.shape[:3])
        (share_float64 if before else perimage.cue_share)(maps[s:s + CHUNK], pxn if before else px)
        (features_one_by_one if before else perimage.pixel_features)(imgs, pxn)
        idx = np.arange(len(imgs)) if before else np.nonzero(perimage.candidates(p, cue.class_id))[0]
        if len(idx):
            edited = perimage.remove_cue(imgs[idx], cue, pxn[idx])
            predict(edited.astype(np.float32) / 255)
            forwards += len(idx)
    return time.perf_counter() - t0, forwards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    from audit.engine.heads import Head
    from audit.scan.imagepass import FixedPredict
    from audit.zoo.train import build_model

    x, labels, cue = dataset(args.images)
    model = build_model(6)
    predict = FixedPredict(model, Head.of(model))
    predict(x[:64].astype(np.float32))  # warm-up: the worker loads the model once
    ratios = {"before": [], "after": []}
    for r in range(args.repeat):
        t_job, maps = job_model_time(model, x.astype(np.float32) / 255)
        line = f"round {r + 1}: job model time {t_job:6.1f} s ({args.images / t_job:.0f} images/s)"
        for name in ("before", "after"):
            t, fw = pass_time(predict, x, maps, labels, cue, name == "before")
            ratios[name].append(t / t_job)
            line += f"; {name} {t:5.1f} s, {fw:,} forward passes, ratio {t / t_job:.3f}"
        print(line, flush=True)
    print(f"images {args.images} (zoo case six: {len(np.unique(labels))} classes, {int((labels == cue.class_id).sum()):,} "
          f"predicted as the cue's class); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, v in ratios.items():
        print(f"ratio pass / job model time, {name}: median {float(np.median(v)):.3f} of {len(v)} "
              f"({', '.join(f'{x:.3f}' for x in v)}) (target <= 0.35)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
