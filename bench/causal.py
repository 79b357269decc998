"""Cost of the scan's causal tests against the job's model time (run by hand; prints figures and the ratio).

    .venv/bin/python bench/causal.py                     # 10,000 images, 4 classes, 3 rounds: about 2 minutes
    .venv/bin/python bench/causal.py --images 2000       # quicker
    .venv/bin/python bench/causal.py --arch mobilenetv2 --size 96   # a real-size model (about 2 minutes a round)
    .venv/bin/python bench/causal.py --arch mobilenetv2 --size 96 --no-masks   # a job without masks

The job's model time is the Explainer (Grad-CAM and Grad-CAM++, one compiled
forward+backward pass per batch of 32, as ``audit run`` computes it) over
``--images`` 64 x 64 images on the zoo's network (Conv-BN-ReLU x 4, GAP,
Dense; random weights: the cost does not depend on training).  The causal
tests are what :func:`audit.scan.causal.run_tests` does for that job: the
sample plan within the budget (:func:`audit.scan.causal.plan_tests` rules:
``Config.budget`` forward passes per image, at least ``budget_floor``), the
64-image background pool with its objects inpainted, and for every class
:func:`audit.scan.probes.causal_tests` with masks (object, background, the
two background transforms, the identity-keeping edits and the place bank, screened, the placebo of
each place that may be a cue, and the transplant of the places that flipped a class into the pool's
other-class images, and the background transplant), edits and predictions included, in batches of
``--batch`` as the job's (the pool's first 16 images are predicted; the other unedited images' predictions
are the job's, as the scan reuses them once those agree); ``--no-masks``: the tests of a job without masks
(the grid cells, each image's own hot area, the background transplant around it); one class
carries a corner tag that decides it, so its flipping places go past the screening and are transplanted as
a shortcut's are.  Image decoding is left out of both sides.  Target: the tests add at most 10% at 10,000 images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def images_and_masks(n: int, seed: int = 0, size: int = 64):
    """Noisy backgrounds with a dark square object of random place and size (and its mask)."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(60, 200, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        s = int(rng.integers(8, 24))
        x, y = rng.integers(0, size - s, 2)
        masks[i, y:y + s, x:x + s] = True
        imgs[i][masks[i]] = 20
    return imgs, masks


@dataclass(frozen=True)
class Took:
    """Wall seconds and this process's CPU seconds (all its threads): on a machine shared with other
    work the CPU time is the steadier figure, the wall time the one a user waits."""

    wall: float
    cpu: float


def job_model_time(model, x: np.ndarray, batch: int = 32) -> Took:
    """Seconds of the Explainer over ``x`` (one warm-up batch first, as an actor traces once)."""
    from audit.engine.explainer import Explainer

    ex = Explainer(model, methods=("gradcam", "gradcam++"), batch_size=batch)
    ex(x[:batch].astype(np.float32))
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(x), batch):
        ex(x[s:s + batch].astype(np.float32))
    return Took(time.perf_counter() - t0, time.process_time() - c0)


@dataclass
class Cost:
    """Where the causal tests' time goes: forward passes by probe (``base``: the unedited images, ``pool``:
    the transplants' recipients), the CPU seconds spent predicting, and the images padded to a batch shape."""

    took: Took
    forwards: Counter
    classes: int
    predict_cpu: float = 0.0
    padded: int = 0

    @property
    def total(self) -> int:
        return sum(self.forwards.values())


def causal_time(model, x, masks, n_classes: int, cfg, probes=None, batch: int = 32, masked: bool = True) -> Cost:
    """Time and extra forward passes of the causal tests of a job of ``len(x)`` images (``probes``: the
    registry's probes to run, default all; ``batch``: images per model call, the job's batch; ``masked``
    False: the tests of a job without masks, each object standing for its image's hot area)."""
    from audit.engine.explainer import bucket_for
    from audit.engine.heads import Head
    from audit.scan.causal import base_predictions
    from audit.scan.intervene import CompiledPredict
    from audit.scan.probes import Sample, causal_tests, extra_forwards
    from audit.scan.probes.edits import remove_objects, spare_masks
    from audit.scan.probes.places import place_bank
    from audit.scan.probes.transplant import Recipients

    compiled = CompiledPredict(model, Head.of(model), batch)
    cost = Cost(Took(0, 0), Counter(), 0)

    def predict(imgs):  # as Intervener.predict (preprocess "none")
        c0 = time.process_time()
        out = compiled(imgs)
        cost.predict_cpu += time.process_time() - c0
        cost.padded += bucket_for(len(imgs) % batch, batch) - len(imgs) % batch if len(imgs) % batch else 0
        return out

    predict(x[:32])  # warm-up (the scan loads the model once)
    cost.predict_cpu, cost.padded = 0.0, 0
    size = x.shape[1:3]
    bank = place_bank(size, {}, (0.3, 0.3, 0.7, 0.7), cfg, cells=not masked)
    budget = max(cfg.budget_floor, int(cfg.budget * len(x)))
    per_class = extra_forwards(cfg.sample, len(bank), masked, cfg)
    sample = cfg.sample if per_class * n_classes <= budget else cfg.min_sample
    cost.classes = min(n_classes, budget // extra_forwards(sample, len(bank), masked, cfg))
    # a shortcut class: the object's pixels get a tag in a corner that flips every prediction
    tagged = _tagged_predict(predict, size)
    idx = [np.arange(c * sample, (c + 1) * sample) + 64 for c in range(cost.classes)]
    # what the job recorded (the records' pred): the scan takes the unedited images' predictions from
    # there once its own predictions of the pool's first images agree with them (audit.scan.causal.base_predictions)
    recorded = [(tagged if c == 0 else predict)(x[i]) for c, i in enumerate(idx)]
    pool = np.arange(64)
    in_job = dict(enumerate(predict(x[pool]).tolist()))  # the job's records of the pool's images
    cost.predict_cpu, cost.padded = 0.0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    backgrounds = remove_objects(x[pool], masks[pool]) if masked else None
    # the transplant's recipients: the pool's first cfg.job_check predicted, the rest the job's where they agree
    calls = []
    base, _ = base_predictions(lambda im: calls.append(len(im)) or predict(im), x[pool], list(pool), in_job,
                               cfg.job_check)
    cost.forwards["pool"] += sum(calls)
    keep = spare_masks(size, masks[pool])
    for c in range(cost.classes):
        fn, i = (tagged if c == 0 else predict), idx[c]
        given = (base + 1) % 4 if c == 0 else base
        recipients = (Recipients(x[pool], given, keep) if masked else Recipients(x[pool], given, hot=keep)).for_class(c, cfg)
        res = causal_tests(fn, Sample(x[i], bank, masks[i] if masked else None, backgrounds=backgrounds,
                                      background_classes=pool % n_classes, spare=spare_masks(size, masks[i]),
                                      recipients=recipients, target=c, base_pred=recorded[c]), cfg, probes)
        cost.forwards.update(res.forwards)
    cost.took = Took(time.perf_counter() - t0, time.process_time() - c0)
    return cost


def _tagged_predict(predict, size):
    """The model, except that a bright bottom-right corner decides class 0 (what a corner tag does):
    occluding the corner flips every prediction, so a shortcut class's places pass the screening."""
    h, w = size

    def fn(imgs):
        p = predict(imgs)
        tag = imgs[:, int(0.8 * h):, int(0.8 * w):].mean(axis=(1, 2, 3)) > 200
        return np.where(tag, 0, (p + 1) % 4)

    return fn


FAMILIES = (  # the breakdown's lines: (words, keys of CausalResult.forwards)
    ("unedited images (the sample's and the pool's)", ("base", "pool")),
    ("object and background (masks)", ("object", "own-hot-area", "background-neutral", "background-swap")),
    ("background texture, flat background, image colour", ("texture", "flat", "colour")),
    ("identity-keeping edits", ("object-greyscale", "background-greyscale", "image-greyscale", "object-hue",
                                "image-hue", "object-smooth", "background-smooth", "image-shift")),
    ("colour transplant", ("colour-transplant/follow-up",)),
    ("place occlusions", ("place",)),
    ("placebos", ("placebo",)),
    ("place transplants", ("place/follow-up",)),
    ("background transplant", ("background-transplant/follow-up",)),
)


def breakdown(cost: Cost, job: Took, images: int) -> str:
    """Where the causal tests' forward passes and CPU time go, against the job's time per image."""
    lines = [f"forward passes by test ({cost.total} in all):"]
    named = set()
    for words, keys in FAMILIES:
        n = sum(cost.forwards.get(k, 0) for k in keys)
        named.update(keys)
        lines.append(f"  {words:52s} {n:5d}  ({n / max(cost.total, 1):5.1%})")
    rest = sum(v for k, v in cost.forwards.items() if k not in named)
    if rest:
        lines.append(f"  {'other':52s} {rest:5d}")
    per_fw = 1000 * cost.predict_cpu / max(cost.total, 1)
    lines.append(f"CPU: predicting {cost.predict_cpu:.1f} s ({per_fw:.2f} ms a forward pass; the job "
                 f"{1000 * job.cpu / images:.2f} ms an image, forward and backward), edits and the rest "
                 f"{cost.took.cpu - cost.predict_cpu:.1f} s; {cost.padded} images of padding to batch shapes")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="images per model call, the job's and the tests' alike")
    p.add_argument("--seed", type=int, default=0, help="the network's random weights")
    p.add_argument("--arch", choices=("zoo", "mobilenetv2"), default="zoo",
                   help="zoo: the zoo's tiny network; mobilenetv2: keras.applications.MobileNetV2 (weights=None), "
                   "a model whose forward pass costs what a real audit's does")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--no-masks", action="store_true", help="the tests of a job without masks (the grid cells, "
                   "each image's own hot area, the background transplant around it)")
    args = p.parse_args(argv)
    import keras

    from audit.scan.config import DEFAULT
    from audit.scan.probes import PROBES
    from audit.zoo.train import build_model

    keras.utils.set_random_seed(args.seed)  # random weights decide which places flip: the same model every run
    model = build_model(args.classes, side=args.size) if args.arch == "zoo" else keras.applications.MobileNetV2(
        weights=None, input_shape=(args.size, args.size, 3), classes=args.classes)
    x, masks = images_and_masks(args.images, size=args.size)
    corner = int(0.81 * args.size)
    x[64:64 + DEFAULT.sample, corner:, corner:] = 255  # class 0's sample carries the tag
    # the edits added last (identity-keeping edits, placebo occlusions): their share of the cost
    older = [p for p in PROBES.values() if not (p.keeps_identity or getattr(p, "is_placebo", False))]
    ratios, older_ratios = [], []
    load = [os.getloadavg()[0]]
    for r in range(args.repeat):  # job and tests alternate: a change of machine load hits both
        job = job_model_time(model, x, args.batch)
        full = causal_time(model, x, masks, args.classes, DEFAULT, batch=args.batch, masked=not args.no_masks)
        old = causal_time(model, x, masks, args.classes, DEFAULT, older, args.batch, not args.no_masks)
        ratios.append((full.took.cpu / job.cpu, full.took.wall / job.wall))
        older_ratios.append((old.took.cpu / job.cpu, old.took.wall / job.wall))
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}: job model time (Explainer, gradcam + gradcam++) {job.cpu:6.1f} s CPU, {job.wall:6.1f} s "
              f"wall; causal tests {full.took.cpu:5.1f} s CPU, {full.took.wall:5.1f} s wall ({full.total} forward "
              f"passes, {full.total / args.images:.3f} per image): ratio {ratios[-1][0]:.3f} CPU, {ratios[-1][1]:.3f} "
              f"wall; without the identity edits and placebos {old.took.cpu:5.1f} s CPU ({old.total} forward passes): "
              f"ratio {older_ratios[-1][0]:.3f} CPU, {older_ratios[-1][1]:.3f} wall", flush=True)
    print(f"{args.arch} at {args.size} px{' without masks' if args.no_masks else ''}; images {args.images}, classes {args.classes} (tested {full.classes}), sample "
          f"{DEFAULT.sample}, batch {args.batch}, budget {max(DEFAULT.budget_floor, int(DEFAULT.budget * args.images))} "
          f"forward passes; load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs")
    print(breakdown(full, job, args.images))
    med = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
    print(f"ratio causal / job model time (median of {len(ratios)}): {med(ratios, 0):.3f} CPU, "
          f"{med(ratios, 1):.3f} wall (target <= 0.10); without the identity edits and placebos "
          f"{med(older_ratios, 0):.3f} CPU, {med(older_ratios, 1):.3f} wall ({full.total - old.total} forward "
          "passes less)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
