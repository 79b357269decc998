"""Build a drawn case (folder dataset with masks, a tiny model) and check which cues the model learned.

A planted cue counts only when the model uses it.  :func:`cue_moves` is the
paired counterfactual: held-out images of the *other* classes, painted once
without any cue and once with class k's cue (the same background, object
and place otherwise, :func:`audit.zoo.paint.paint` with ``force=k``); the
share of those not predicted k before that are predicted k after is the
cue's pull.  At least :data:`LEARNED_MIN`: the cue was learned, the class
must be flagged; at most :data:`IGNORED_MAX`: the model ignored it, the class
is a negative control that must not be flagged; in between, or on fewer than
:data:`MIN_PAIRS` pairs, the check says ``partial`` and the class counts
neither way.  A model that fits less than :data:`FIT_MIN` of its own
training images (in inference mode) learned neither the task nor, by any
measure here, its cue: such a case is not counted at all (the benchmark
lists it with whatever the scan said).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from audit.zoo.paint import Painted, paint, split_of
from audit.zoo.space import VERSION, DrawnCase
from audit.zoo.train import _limit_threads, _loss, build_model, cache_root

LEARNED_MIN = 0.5
IGNORED_MAX = 0.1
FIT_MIN = 0.9  # a model that fits less of its own training images (inference mode) is not counted
MIN_PAIRS = 10  # fewer pairs (the model already calls most other images the class) decide nothing


@dataclass
class CueCheck:
    """The paired counterfactual of one planted cue."""

    class_id: int
    class_name: str
    family: str
    moved: int  # other classes' images predicted as the class once its cue is added ...
    n: int  # ... of this many (not predicted as the class without it)

    @property
    def rate(self) -> float:
        return self.moved / self.n if self.n else float("nan")

    @property
    def status(self) -> str:
        """``learned``, ``ignored`` or ``partial`` (see the module's docstring)."""
        if self.n < MIN_PAIRS:
            return "partial"
        return "learned" if self.rate >= LEARNED_MIN else "ignored" if self.rate <= IGNORED_MAX else "partial"


@dataclass
class BuiltDraw:
    """Where a built draw lives, how its model did and which cues it learned."""

    root: str
    data: str  # data/train/<class>/*.png
    masks: str  # data/train_masks/<class>/*.png
    model: str
    train_accuracy: float = float("nan")
    heldout_accuracy: float = float("nan")  # held-out images with their cues, as in training
    checks: list[CueCheck] = field(default_factory=list)
    seconds: float = 0.0
    epochs: int = 0

    def with_status(self, status: str) -> list[str]:
        """Names of the cued classes whose check says ``status``."""
        return [c.class_name for c in self.checks if c.status == status]

    @property
    def fitted(self) -> bool:
        """The model fits its training images (:data:`FIT_MIN`): what it learned can be said."""
        return self.train_accuracy >= FIT_MIN

    @property
    def negative_control(self) -> bool:
        """No cue was learned, not even partly: no class may be flagged."""
        return not self.with_status("learned") and not self.with_status("partial")

    def line(self) -> str:
        checks = "; ".join(f"{c.class_name} ({c.family}) {c.moved}/{c.n} moved: {c.status}" for c in self.checks)
        return (f"trained to {self.train_accuracy:.0%} in {self.epochs} epochs ({self.seconds:.0f} s), held-out "
                f"{self.heldout_accuracy:.0%}; {checks or 'no cue'}")


def predict(model, images: list[Painted], head: str, batch: int = 128) -> np.ndarray:
    """Class ids (one sigmoid unit: class 1 when p >= 0.5)."""
    x = np.stack([p.image for p in images]).astype(np.float32) / 255.0
    p = model.predict(x, batch_size=batch, verbose=0)
    return (p[:, 0] >= 0.5).astype(int) if head == "sigmoid" else p.argmax(axis=1)


def cue_moves(case: DrawnCase, model) -> list[CueCheck]:
    """The paired counterfactual of every planted cue on the held-out split (see the module docstring)."""
    out = []
    for k, cue in case.cues:
        pairs = [(j, i) for j in range(len(case.classes)) if j != k for i in range(case.n_heldout)]
        plain = [paint(case, "heldout", i, j, cues=False, force=k, show=False) for j, i in pairs]
        forced = [paint(case, "heldout", i, j, cues=False, force=k) for j, i in pairs]
        before, after = predict(model, plain, case.head), predict(model, forced, case.head)
        eligible = before != k
        out.append(CueCheck(k, case.classes[k], cue.family, int((after[eligible] == k).sum()), int(eligible.sum())))
    return out


def object_accuracy(case: DrawnCase, model) -> list[float]:
    """Per class, the share of its held-out images, painted without any cue of their own (distractors
    stay), that the model gives to the class: whether it learned the class's object at all."""
    images = split_of(case, "heldout", case.n_heldout, cues=False)
    pred, labels = predict(model, images, case.head), np.array([p.label for p in images])
    return [float((pred[labels == k] == k).mean()) for k in range(len(case.classes))]


def objects_learned(case: DrawnCase, built: BuiltDraw) -> dict[str, float]:
    """{class name: :func:`object_accuracy`} of a built draw, computed once and kept beside it."""
    path = Path(built.root) / "objects.json"
    if path.is_file():
        return json.loads(path.read_text())
    import keras

    _limit_threads()
    model = keras.saving.load_model(built.model, compile=False)
    out = dict(zip(case.classes, object_accuracy(case, model)))
    path.write_text(json.dumps(out, indent=1))
    return out


BATCH = 16  # small batches: a draw has a few hundred images, and steps (not epochs) fit it
CHECK_STEPS = 40  # gradient steps between two checks of the fit
PATIENCE = 2  # checks without a gain of FIT_GAIN before the learning rate halves
FIT_GAIN = 0.01


def train(case: DrawnCase, images: list[Painted], target_accuracy: float = 0.97):
    """A tiny :func:`audit.zoo.train.build_model` network fitted to ``images``; (model, accuracy, epochs).

    Fits a few epochs (about :data:`CHECK_STEPS` gradient steps) at a time until the accuracy on the
    training images *in inference mode* (BatchNorm's moving statistics, as the audit will run it)
    reaches ``target_accuracy``, or ``case.max_steps`` steps have run; the learning rate halves after
    :data:`PATIENCE` checks without progress.  A budget of steps rather than epochs: two classes of 80
    images made 80 steps in 16 epochs, and such models fitted half their images.
    """
    import keras

    _limit_threads()
    keras.utils.set_random_seed(case.seed + 1)
    model = build_model(len(case.classes), case.binary, name=f"zoo_{case.name}", head=case.head,
                        arch=case.body(), side=case.side, channels=case.channels, width=case.width)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=_loss(case.head))
    x = np.stack([p.image for p in images]).astype(np.float32) / 255.0
    y = np.array([p.label for p in images])
    per_epoch = -(-len(x) // BATCH)
    chunk = max(1, round(CHECK_STEPS / per_epoch))
    epochs, acc, best, stall = 0, 0.0, 0.0, 0
    while epochs * per_epoch < case.max_steps and acc < target_accuracy:
        model.fit(x, y, batch_size=BATCH, epochs=chunk, shuffle=True, verbose=0)
        epochs += chunk
        acc = float((predict(model, images, case.head) == y).mean())
        best, stall = (acc, 0) if acc >= best + FIT_GAIN else (best, stall + 1)
        if stall >= PATIENCE:
            model.optimizer.learning_rate.assign(float(model.optimizer.learning_rate) / 2)
            stall = 0
    return model, acc, epochs


def write_folder(root: Path, case: DrawnCase, images: list[Painted]) -> None:
    """``root/train/<class>/NNNNN.png`` and the object masks under ``root/train_masks``."""
    import cv2

    counters: dict[int, int] = {}
    for p in images:
        i = counters.get(p.label, 0)
        counters[p.label] = i + 1
        img = p.image[..., 0] if p.image.shape[-1] == 1 else cv2.cvtColor(p.image, cv2.COLOR_RGB2BGR)
        for sub, arr in (("train", img), ("train_masks", p.mask.astype(np.uint8) * 255)):
            d = root / sub / case.classes[p.label]
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{i:05d}.png"), arr)


def build(out: Path, case: DrawnCase) -> BuiltDraw:
    """Paint, write and train one draw into ``out``; check its cues."""
    out = Path(out)
    t0 = time.time()
    images = split_of(case, "train", case.n_per_class)
    write_folder(out / "data", case, images)
    model, acc, epochs = train(case, images)
    model.save(out / "model.keras")
    held = split_of(case, "heldout", case.n_heldout)
    held_acc = float((predict(model, held, case.head) == np.array([p.label for p in held])).mean())
    built = BuiltDraw(str(out), str(out / "data" / "train"), str(out / "data" / "train_masks"),
                      str(out / "model.keras"), acc, held_acc, cue_moves(case, model))
    built.seconds, built.epochs = round(time.time() - t0, 1), epochs
    (out / "built.json").write_text(json.dumps(asdict(built), indent=2))
    return built


def key(case: DrawnCase) -> str:
    """A hash of the generator's version and the draw."""
    blob = json.dumps({"version": VERSION, **asdict(case), "body": case.body()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load(final: Path) -> BuiltDraw:
    raw = json.loads((final / "built.json").read_text())
    raw["checks"] = [CueCheck(**c) for c in raw["checks"]]
    built = BuiltDraw(**raw)
    old = built.root
    for f in ("root", "data", "masks", "model"):
        setattr(built, f, getattr(built, f).replace(old, str(final), 1))
    return built


def ensure(case: DrawnCase, root: Path | None = None) -> BuiltDraw:
    """The built draw from the cache (``<zoo cache>/drawn``), built on first use and renamed into place."""
    root = Path(root) if root else cache_root() / "drawn"
    final = root / f"{case.name}-{key(case)}"
    if not (final / "built.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp, case)
        try:
            os.replace(tmp, final)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


def job_spec(case: DrawnCase, built: BuiltDraw, out) -> dict:
    """The job spec (a dict) that audits the draw's training split, with its masks when the draw says so."""
    return {
        "name": f"zoo-{case.name}",
        "model": {"path": built.model, "preprocess": "scale_0_1", "input_size": [case.side, case.side]},
        "dataset": {"format": "folder", "path": built.data, "classes": list(case.classes),
                    "masks": built.masks if case.masks else None, "shard_size": 256},
        "explain": {"methods": ["gradcam", "gradcam++"], "layers": "auto", "target": "predicted"},
        "resources": {"actors": 1, "batch_size": 64},
        "output": str(out),
    }
