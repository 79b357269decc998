"""Benchmark of the CAM engine (run by hand; prints a table with ratios).

    .venv/bin/python bench/engine.py            # ResNet50 224x224 b32 + small CNN 64x64
    .venv/bin/python bench/engine.py --quick    # fewer rounds, for a smoke run

Compares, in one process and interleaved round by round (the machine is
shared and noisy, so only ratios measured side by side mean anything):

* a plain batched forward pass (``tf.function(model)``, fixed batch shape),
* the Explainer computing Grad-CAM and Grad-CAM++ for one layer and for three,
* the per-image recipe of the seed notes: ``model.predict``, a new
  ``Model([inputs], [output, conv.output])`` per image, and three nested
  GradientTapes for Grad-CAM++.

Targets (issue 2): >= 0.85x forward throughput with one layer, >= 0.75x with
three layers, >= 20x the per-image recipe.

Two more measurements (issue 10), on the small CNN:

* **short batches**: an Explainer with ``batch_size=32`` on 16 images vs on
  32 images.  A short chunk is padded to the next power of two (16), so the
  ratio should be about 0.5 (it was 1.0 when every chunk was padded to 32).
* **Score-CAM cost**: ``scorecam`` runs K + 1 forward passes per image and
  layer (K = the layer's channels, 64 for the small CNN's conv4), in chunks of
  ``batch_size`` masked inputs.  Printed: its time per image as a multiple of
  a batched forward pass per image, next to K + 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from audit.engine.explainer import Explainer  # noqa: E402


def small_cnn():
    keras.utils.set_random_seed(0)
    inp = keras.Input((64, 64, 3))
    h = inp
    for i, f in enumerate((16, 32, 64)):
        h = keras.layers.Conv2D(f, 3, padding="same", activation="relu", name=f"conv{i + 1}")(h)
        h = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv4")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h))


def seed_recipe(model, layer_name, x):
    """The seed notes' per-image Grad-CAM + nested-tape Grad-CAM++ (for timing only)."""
    for i in range(len(x)):
        xi = x[i : i + 1]
        preds = model.predict(xi, verbose=0)
        c = int(np.argmax(preds[0]))
        conv = model.get_layer(layer_name)
        cam = keras.Model(model.inputs, [conv.output, model.output])
        with tf.GradientTape() as t1:
            a, out = cam(xi)
            grads = t1.gradient(out[:, c], a)
        w = tf.reduce_mean(grads, axis=(0, 1, 2))
        np.maximum(tf.reduce_sum(w * a[0], axis=-1).numpy(), 0)
        with tf.GradientTape() as g1, tf.GradientTape() as g2, tf.GradientTape() as g3:
            a, out = cam(xi)
            s = out[:, c]
            d1 = g3.gradient(s, a)
            d2 = g2.gradient(d1, a)
            d3 = g1.gradient(d2, a)
        den = 2.0 * d2[0] + np.sum(a, axis=(0, 1, 2)) * d3[0]
        alpha = d2[0] / np.where(den != 0.0, den, 1e-10)
        np.sum(np.maximum(d1[0], 0.0) * alpha, axis=(0, 1))


def bench(name, model, layers3, batch, rounds, recipe_images, recipe_layer):
    shape = (batch, *model.input_shape[1:])
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    fwd = tf.function(lambda t: model(t, training=False), input_signature=[tf.TensorSpec(shape, tf.float32)])
    ex1 = Explainer(model, layers="auto", methods=("gradcam", "gradcam++"), batch_size=batch)
    ex3 = Explainer(model, layers=layers3, methods=("gradcam", "gradcam++"), batch_size=batch)
    runs = {
        "forward pass": lambda: fwd(x).numpy(),
        f"explainer, 1 layer ({ex1.layers[0]})": lambda: ex1(x),
        "explainer, 3 layers": lambda: ex3(x),
    }
    for f in runs.values():  # warm up: trace and compile
        f()
        f()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    base = ips["forward pass"]
    # per-round ratios (side by side) are steadier than ratios of medians
    ratio = {
        k: statistics.median(times["forward pass"][i] / times[k][i] for i in range(rounds)) for k in runs
    }
    rows = [(k, ips[k], ratio[k]) for k in runs]
    seed_recipe(model, recipe_layer, x[:1])  # warm up
    t0 = time.perf_counter()
    seed_recipe(model, recipe_layer, x[:recipe_images])
    recipe_ips = recipe_images / (time.perf_counter() - t0)
    rows.append((f"seed per-image recipe ({recipe_images} images)", recipe_ips, recipe_ips / base))
    print(f"\n{name}: batch {batch}, input {shape[1:]}, {rounds} rounds; 3 layers = {ex3.layers}")
    print(f"{'':<52}{'images/s':>10}{'x forward':>11}")
    for k, v, r in rows:
        print(f"{k:<52}{v:>10.1f}{r:>11.2f}")
    speedup = ips[f"explainer, 1 layer ({ex1.layers[0]})"] / recipe_ips
    print(f"{'explainer (1 layer) / seed recipe':<52}{'':>10}{speedup:>10.1f}x")
    return rows


def median_time(f, rounds):
    f()
    f()  # warm up: trace and compile
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_short_batches(model, layer, rounds):
    """16 images vs 32 images through one Explainer(batch_size=32), interleaved."""
    x = np.random.default_rng(0).random((32, *model.input_shape[1:])).astype(np.float32)
    ex = Explainer(model, layers=layer, methods=("gradcam", "gradcam++"), batch_size=32)
    ex(x)
    ex(x[:16])  # compile both shapes
    t16, t32 = [], []
    for _ in range(rounds):
        for n, bucket in ((16, t16), (32, t32)):
            t0 = time.perf_counter()
            ex(x[:n])
            bucket.append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(t16, t32))
    print(f"\nshort batches (batch_size 32, {rounds} rounds): 16 images {statistics.median(t16) * 1e3:.1f} ms, "
          f"32 images {statistics.median(t32) * 1e3:.1f} ms, ratio 16/32 = {ratio:.2f} (padded to 32: 1.00)")
    return ratio


def bench_scorecam(model, layer, rounds, n=4):
    """Score-CAM time per image as a multiple of a batched forward pass per image."""
    x = np.random.default_rng(0).random((32, *model.input_shape[1:])).astype(np.float32)
    fwd = tf.function(lambda t: model(t, training=False))
    ex = Explainer(model, layers=layer, methods=("scorecam",), batch_size=32)
    k = int(ex.forward(x[:1])[0][0].shape[-1])
    t_fwd = median_time(lambda: fwd(x).numpy(), rounds * 3) / len(x)
    t_sc = median_time(lambda: ex(x[:n]), rounds) / n
    print(f"\nscore-cam on {layer} (K = {k} channels, {n} images, {rounds} rounds): "
          f"{t_sc * 1e3:.1f} ms/image = {t_sc / t_fwd:.0f}x a forward pass per image (K + 1 = {k + 1})")
    return t_sc / t_fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    rounds = 3 if args.quick else 7
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    cnn = small_cnn()
    bench("small CNN", cnn, ["conv4", "conv3", "conv2"], 32, rounds * 3, 16, "conv4")
    bench_short_batches(cnn, "conv4", rounds * 3)
    bench_scorecam(cnn, "conv4", rounds)
    if not args.skip_resnet:
        resnet = keras.applications.ResNet50(weights=None)
        bench("ResNet50", resnet, ["conv5_block3_out", "conv5_block3_2_conv", "conv5_block2_out"], 32,
              rounds, 4, "conv5_block3_out")
        bench_short_batches(resnet, "conv5_block3_out", rounds)


if __name__ == "__main__":
    main()
