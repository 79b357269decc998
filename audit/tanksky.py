"""The tank/sky demo: a procedural dataset and two small Keras models.

The classic (possibly apocryphal) story: a network trained to find tanks in
photos learned the weather instead, because every tank photo was taken on a
cloudy day.  This module builds that situation on purpose:

* images (64x64 RGB) of a landscape: sky above a horizon, grass below, bushes
  and rocks as distractors, and in the ``tank`` class one tank somewhere on
  the ground (its pixel mask is written alongside);
* ``train_shortcut``: every tank photo has a grey cloudy sky and every photo
  without a tank a blue sunny sky, so the sky alone separates the classes;
* ``train_control``: the same scenes with the sky drawn independently of the
  tank (de-biased);
* ``test``: the correlation broken (sky independent of the class), with
  masks for the tanks; this is the split the demo audits.

``python -m audit.tanksky --out DIR`` writes the three splits in the
``folder`` format (``DIR/data/<split>/<class>/*.png`` and
``DIR/data/<split>_masks/tank/*.png``) and trains ``DIR/models/shortcut.keras``
and ``DIR/models/control.keras``.  :func:`ensure` does the same into the user
cache directory, keyed by a hash of the generator's version and parameters,
so the demo builds it once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VERSION = "tanksky-1"
CLASSES = ("no_tank", "tank")
SIZE = 64
SKY_REGION = (0.0, 0.0, 1.0, 0.4)  # the named region the demo specs declare


@dataclass(frozen=True)
class Params:
    n_train: int = 320  # per training split, half tank
    n_test: int = 200  # audit split, half tank
    epochs: int = 40  # at most; training stops at 98% training accuracy
    seed: int = 7


# ----------------------------------------------------------------------------
# Drawing (pure NumPy / OpenCV, deterministic per seed)
# ----------------------------------------------------------------------------


def _sky(rng, kind: str, horizon: int) -> np.ndarray:
    s = SIZE
    t = np.linspace(0.0, 1.0, horizon)[:, None, None]
    if kind == "sunny":
        top = np.array([60, 120, 215]) + rng.integers(-15, 16, 3)
        bottom = np.array([150, 195, 245]) + rng.integers(-10, 11, 3)
    else:
        g = rng.integers(115, 150)
        top = np.array([g, g, g + 5])
        bottom = np.array([g + 40, g + 40, g + 42])
    sky = (top * (1 - t) + bottom * t) * np.ones((1, s, 1))
    if kind == "cloudy":
        import cv2

        clouds = np.zeros((horizon, s), np.float32)
        for _ in range(rng.integers(3, 7)):
            cx, cy = int(rng.integers(0, s)), int(rng.integers(0, horizon))
            ax, ay = int(rng.integers(6, 16)), int(rng.integers(3, 7))
            cv2.ellipse(clouds, (cx, cy), (ax, ay), 0, 0, 360, float(rng.uniform(0.4, 1.0)), -1)
        clouds = cv2.GaussianBlur(clouds, (0, 0), 2.0)[..., None]
        sky = sky * (1 - 0.6 * clouds) + 215 * 0.6 * clouds
    elif rng.random() < 0.5:  # a sun
        import cv2

        sun = np.zeros((horizon, s), np.float32)
        cv2.circle(sun, (int(rng.integers(5, s - 5)), int(rng.integers(3, max(4, horizon - 6)))), 4, 1.0, -1)
        sun = cv2.GaussianBlur(sun, (0, 0), 1.0)[..., None]
        sky = sky * (1 - sun) + np.array([255, 245, 190]) * sun
    return sky


def _ground(rng, horizon: int) -> np.ndarray:
    import cv2

    s = SIZE
    h = s - horizon
    base = np.array([85, 125, 55]) + rng.integers(-20, 21, 3)
    if rng.random() < 0.3:  # dry grass
        base = np.array([140, 130, 80]) + rng.integers(-15, 16, 3)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, s)).astype(np.float32), (0, 0), 1.5)
    g = base * np.ones((h, s, 1)) + 18 * noise[..., None]
    shade = np.linspace(-10, 15, h)[:, None, None]  # darker far away
    g = g + shade
    for _ in range(rng.integers(2, 6)):  # bushes and rocks (distractors)
        cx, cy = int(rng.integers(0, s)), int(rng.integers(0, h))
        r = int(rng.integers(2, 5))
        col = (np.array([40, 80, 35]) if rng.random() < 0.6 else np.array([120, 115, 105])) + rng.integers(-10, 11, 3)
        cv2.ellipse(g, (cx, cy), (r + 1, r), 0, 0, 360, col.tolist(), -1)
    return g


def _tank(rng, img: np.ndarray, horizon: int) -> np.ndarray:
    """Draw a tank on the ground in place; return its (H, W) bool mask."""
    import cv2

    s = SIZE
    w = int(rng.integers(16, 25))
    h = int(round(w * 0.35))
    x0 = int(rng.integers(1, s - w - 1))
    y0 = int(rng.integers(horizon + 4, s - h - 2))
    mask = np.zeros((s, s), np.uint8)
    body = np.array([[x0, y0 + h // 3], [x0 + w, y0 + h // 3], [x0 + w - 2, y0 + h], [x0 + 2, y0 + h]], np.int32)
    cv2.fillPoly(mask, [body], 1)
    tw = max(6, w // 2)
    tx = x0 + (w - tw) // 2 + int(rng.integers(-2, 3))
    cv2.rectangle(mask, (tx, y0), (tx + tw, y0 + h // 3), 1, -1)
    d = 1 if rng.random() < 0.5 else -1
    bx = tx + tw if d > 0 else tx
    cv2.line(mask, (bx, y0 + 1), (bx + d * int(w * 0.45), y0), 1, 1)
    m = mask.astype(bool)
    col = np.array([72, 78, 52]) + rng.integers(-10, 11, 3)
    img[m] = col
    tracks = np.zeros_like(mask)
    cv2.rectangle(tracks, (x0 + 2, y0 + h - max(2, h // 3)), (x0 + w - 2, y0 + h), 1, -1)
    tm = tracks.astype(bool) & m
    img[tm] = col * 0.55
    for cx in range(x0 + 4, x0 + w - 2, 4):  # wheels
        cv2.circle(img, (cx, y0 + h - 1), 1, (col * 0.35).tolist(), -1)
    return m


def scene(rng, tank: bool, sky: str) -> tuple[np.ndarray, np.ndarray]:
    """One (64, 64, 3) uint8 RGB picture and its tank mask (all False without tank)."""
    horizon = int(rng.integers(22, 30))
    img = np.zeros((SIZE, SIZE, 3), np.float64)
    img[:horizon] = _sky(rng, sky, horizon)
    img[horizon:] = _ground(rng, horizon)
    mask = _tank(rng, img, horizon) if tank else np.zeros((SIZE, SIZE), bool)
    img += rng.normal(0, 3, img.shape)
    return np.uint8(np.clip(img, 0, 255)), mask


def make_split(n: int, seed: int, biased: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` scenes, half with a tank.  ``biased``: tank <=> cloudy sky; else sky at random.

    Returns images (n, 64, 64, 3) uint8, labels (n,) int (1 = tank), masks
    (n, 64, 64) bool and skies (n,) str.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    if biased:
        skies = np.where(labels == 1, "cloudy", "sunny")
    else:
        skies = np.where(rng.random(n) < 0.5, "cloudy", "sunny")
    imgs, masks = [], []
    for lab, sky in zip(labels, skies):
        im, m = scene(rng, bool(lab), str(sky))
        imgs.append(im)
        masks.append(m)
    return np.stack(imgs), labels, np.stack(masks), skies


def write_folder(root: Path, split: str, images, labels, masks) -> None:
    """Write a split in the ``folder`` format, tank masks under ``<split>_masks``."""
    import cv2

    for i, (im, lab, m) in enumerate(zip(images, labels, masks)):
        cls = CLASSES[int(lab)]
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i:05d}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        if lab == 1:
            md = root / f"{split}_masks" / cls
            md.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(md / f"{i:05d}.png"), m.astype(np.uint8) * 255)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def build_model():
    """A small CNN: four 3x3 convolutions (two 2x2 poolings: 16x16 maps), GAP, 2-way softmax."""
    import keras
    from keras import layers

    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(24, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(48, 3, padding="same", activation="relu", name="conv4")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(len(CLASSES), activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="tank_detector")


def stop_when_accurate(target_accuracy: float):
    """A Keras callback that stops training once ``accuracy`` reaches ``target_accuracy`` on two
    consecutive epochs (one lucky epoch is not enough)."""
    import keras

    class _Enough(keras.callbacks.Callback):
        hits = 0

        def on_epoch_end(self, epoch, logs=None):
            self.hits = self.hits + 1 if (logs or {}).get("accuracy", 0.0) >= target_accuracy else 0
            if self.hits >= 2:
                self.model.stop_training = True

    return _Enough()


def train(images, labels, *, epochs: int, seed: int, target_accuracy: float = 0.98, verbose: int = 0):
    """Train :func:`build_model` on uint8 images (scaled to 0..1, the spec's ``scale_0_1``).

    Stops early once the training accuracy reaches ``target_accuracy`` on two
    consecutive epochs (the control model first sits at chance for a few
    epochs before it finds the tank; the shortcut model finds the sky at once).
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    x = images.astype(np.float32) / 255.0
    model.fit(x, labels, batch_size=32, epochs=epochs, shuffle=True, verbose=verbose, callbacks=[stop_when_accurate(target_accuracy)])
    return model


# ----------------------------------------------------------------------------
# Build everything, cached
# ----------------------------------------------------------------------------


def cache_dir() -> Path:
    """The user cache directory of shortcut-audit (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("SHORTCUT_AUDIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shortcut-audit")
    return Path(base)


def key(params: Params) -> str:
    blob = json.dumps({"version": VERSION, **asdict(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build(out: Path, params: Params = Params(), log=print) -> dict:
    """Generate the splits and train both models into ``out``; returns the paths."""
    out = Path(out)
    data = out / "data"
    t0 = time.time()
    for split, n, seed, biased in (("train_shortcut", params.n_train, params.seed, True),
                                   ("train_control", params.n_train, params.seed, False),
                                   ("test", params.n_test, params.seed + 1000, False)):
        imgs, labs, masks, _ = make_split(n, seed, biased)
        write_folder(data, split, imgs, labs, masks)
        if split != "test":
            log(f"training the {split.removeprefix('train_')} model on {n} images ...")
            model = train(imgs, labs, epochs=params.epochs, seed=params.seed)
            (out / "models").mkdir(parents=True, exist_ok=True)
            model.save(out / "models" / f"{split.removeprefix('train_')}.keras")
    info = paths(out)
    info["params"] = asdict(params)
    info["seconds"] = round(time.time() - t0, 1)
    (out / "built.json").write_text(json.dumps(info, indent=2))
    return info


def paths(out: Path) -> dict:
    out = Path(out)
    return {
        "test": str(out / "data" / "test"),
        "test_masks": str(out / "data" / "test_masks"),
        "shortcut_model": str(out / "models" / "shortcut.keras"),
        "control_model": str(out / "models" / "control.keras"),
    }


def ensure(params: Params = Params(), root: Path | None = None, log=print) -> dict:
    """The built demo in the cache (built on first use, atomically renamed into place)."""
    root = Path(root) if root else cache_dir()
    final = root / f"tanksky-{key(params)}"
    if (final / "built.json").is_file():
        return paths(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    log(f"building the tank/sky demo (once) in {final}")
    build(tmp, params, log=log)
    try:
        os.replace(tmp, final)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return paths(final)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.tanksky",
                                description="Generate the tank/sky dataset and train the shortcut and control models.")
    p.add_argument("--out", required=True, help="output directory (data/ and models/ are written in it)")
    p.add_argument("--n-train", type=int, default=Params.n_train)
    p.add_argument("--n-test", type=int, default=Params.n_test)
    p.add_argument("--epochs", type=int, default=Params.epochs)
    p.add_argument("--seed", type=int, default=Params.seed)
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    info = build(Path(a.out), Params(a.n_train, a.n_test, a.epochs, a.seed))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
