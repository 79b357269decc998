"""The worker as a plain class (no Ray): every reading format, target=label, classes, mixed precision."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import helpers_jobs as h
import numpy as np
import pytest

from audit.data import datasets
from audit.errors import AuditError
from audit.runner.spec import load_spec
from audit.runner.worker import AuditWorker


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wmodel")
    return h.make_model(tmp / "model.keras")


def _spec(tmp_path, model, dataset, **explain):
    return load_spec({
        "model": {"path": model, "preprocess": "scale_0_1"},
        "dataset": dataset,
        "explain": {"methods": ["gradcam", "cam"], **explain},
        "resources": {"batch_size": 4, "decode_threads": 2},
        "output": str(tmp_path / "out"),
    })


def _run(spec):
    p = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=p.classes)
    tables = [w.process_shard(s, commit=False)["table"] for s in p.shards]
    import pyarrow as pa

    return p, pa.concat_tables(tables).to_pandas(), w


@pytest.mark.parametrize("fmt", ["manifest", "parquet", "tfrecord"])
def test_every_format_through_the_worker(tmp_path, model, fmt):
    if fmt == "manifest":
        ds = {"format": "manifest", "path": h.make_manifest(tmp_path, n=6, boxes=True), "shard_size": 4}
        ids = [f"images/im{i:03d}.png" for i in range(6)]
        seeds = [2000 + i for i in range(6)]
    elif fmt == "parquet":
        ds = {"format": "parquet", "path": h.make_parquet(tmp_path / "pq", n=6, files=2), "shard_size": 4}
        ids = [f"rec-{i:04d}" for i in range(6)]
        seeds = [3000 + i for i in range(6)]
    else:
        ds = {"format": "tfrecord", "path": h.make_tfrecord(tmp_path / "d.tfrecord", n=6), "shard_size": 4}
        ids = [f"d.tfrecord#{i}" for i in range(6)]
        seeds = [4000 + i for i in range(6)]
    spec = _spec(tmp_path, model, ds, regions={"left": [0, 0, 0.5, 1]})
    p, df, w = _run(spec)
    assert df.image_id.tolist() == [i for i in ids for _ in range(2)]
    assert df.method.tolist() == ["gradcam", "cam"] * 6
    assert (df.status == "ok").all() and df.has_mask.all() and df.energy_object.notna().all()
    assert df.label.tolist() == [i % 2 for i in range(6) for _ in range(2)]
    # the maps are the Explainer's on the same pixels
    from audit.engine.models import preprocess

    x = preprocess(np.stack([h.image(s, i % 2)[0] for i, s in enumerate(seeds)]), "scale_0_1")
    res = w.explainer(x)
    got = np.stack(df[df.method == "gradcam"].cam.map(np.asarray)).reshape(6, 16, 16)
    np.testing.assert_allclose(got, res.maps[("conv2", "gradcam")], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(df[df.method == "cam"].score, res.score, rtol=1e-6)
    # energy_left by hand: share of the ReLU'd map (resized to 16x16 = same size) in the left half
    m = np.maximum(res.maps[("conv2", "gradcam")], 0)
    np.testing.assert_allclose(df[df.method == "gradcam"].energy_left, m[:, :, :8].sum((1, 2)) / m.sum((1, 2)),
                               rtol=1e-4)
    # energy_object by hand: share on the bright square (mask, or the manifest's box of the same square)
    obj = np.stack([h.image(s, i % 2)[1] > 0 for i, s in enumerate(seeds)])
    np.testing.assert_allclose(df[df.method == "gradcam"].energy_object,
                               (m * obj).sum((1, 2)) / m.sum((1, 2)), rtol=1e-4, atol=1e-6)


def test_target_label_without_label_is_an_error_row(tmp_path, model):
    path = h.make_manifest(tmp_path, n=3, names=False)
    text = Path(path).read_text().splitlines()
    text[2] = text[2].rsplit(",", 1)[0] + ","  # second image: empty label
    Path(path).write_text("\n".join(text) + "\n")
    spec = _spec(tmp_path, model, {"format": "manifest", "path": path}, target="label")
    _, df, _ = _run(spec)
    assert df.groupby("image_id").size().to_dict() == {"images/im000.png": 2, "images/im001.png": 1,
                                                       "images/im002.png": 2}
    bad = df[df.image_id == "images/im001.png"].iloc[0]
    assert bad.status == "error" and "no valid label" in bad.error
    ok = df[df.status == "ok"]
    assert (ok.target == ok.label).all()


def test_classes_must_fit_the_model(tmp_path, model):
    root, _ = h.make_folder(tmp_path / "data", 1, classes=("a", "b", "c"), masks=False)
    spec = _spec(tmp_path, model, {"format": "folder", "path": root})
    with pytest.raises(AuditError, match="3 classes .* but the model has 2 outputs"):
        _run(spec)


def test_unknown_layer_lists_the_valid_ones(tmp_path, model):
    root, _ = h.make_folder(tmp_path / "data", 1, masks=False)
    spec = _spec(tmp_path, model, {"format": "folder", "path": root}, layers=["conv9"])
    with pytest.raises(AuditError) as e:
        AuditWorker(spec, classes=["cat", "dog"]).setup()
    assert "conv9" in str(e.value) and "conv2" in str(e.value)


def test_mixed_precision_rebuild(model):
    import keras

    from audit.runner.worker import to_mixed_precision

    m32 = keras.models.load_model(model, compile=False)
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m16 = to_mixed_precision(m32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert m16.get_layer("conv2").compute_dtype == "float16"
    assert m16.get_layer("conv2").variable_dtype == "float32"
    np.testing.assert_allclose(np.asarray(m16(x), np.float32), np.asarray(m32(x)), atol=5e-3)


def test_degenerate_maps_become_flat_rows_with_null_statistics(tmp_path):
    """A model whose feature maps are all zero: every row is status=flat, statistics null."""
    import keras

    path = h.make_model(tmp_path / "dead.keras")
    m = keras.models.load_model(path)
    for layer in m.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    m.save(path)
    ds = {"format": "manifest", "path": h.make_manifest(tmp_path, n=4, boxes=True), "shard_size": 4}
    spec = _spec(tmp_path, str(path), ds, regions={"left": [0, 0, 0.5, 1]})
    plan = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=plan.classes)
    out = w.process_shard(plan.shards[0], commit=False)
    df = out["table"].to_pandas()
    assert len(df) == 8 and (df.status == "flat").all() and out["flat"] == 8
    stats = ["energy_object", "pointing_hit", "energy_border", "energy_left", "entropy", "peak_x",
             "centroid_x", "concentration"]
    assert df[stats].isna().all().all()
    assert df.error.isna().all() and df.pred.notna().all()


def test_progress_counts_images_inside_a_shard_and_producer_errors_surface(tmp_path, model):
    import threading

    root, _ = h.make_folder(tmp_path / "data", 6, masks=False)
    (Path(root) / "cat" / "zero.png").write_bytes(b"")  # first in the shard: an error row
    spec = _spec(tmp_path, model, {"format": "folder", "path": root, "shard_size": 100})
    p = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=p.classes)
    real = w.setup() and w.explainer
    gate, calls = threading.Event(), []

    class Held:  # the explainer, held before its second batch until the test looks
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, x, labels=None):
            calls.append(len(x))
            if len(calls) == 2:
                gate.wait(30)
            return real(x, labels=labels)

    w.explainer = Held()
    out = []
    t = threading.Thread(target=lambda: out.append(w.process_shard(p.shards[0], commit=False)))
    t.start()
    for _ in range(600):
        if len(calls) == 2:
            break
        threading.Event().wait(0.05)
    assert w.progress() == {0: 1 + 4}  # the error row and the first batch of 4
    gate.set()
    t.join(30)
    assert out[0]["images"] == 7 and out[0]["errors"] == 1 and calls == [4, 2]  # shard 0: cat/ (6 + 1)
    assert w.progress() == {}  # nothing in progress once the shard is done

    # an exception in the producer thread (here: decoding) reaches the caller
    def broken(*a, **k):
        raise MemoryError("decode pool exhausted")

    w.explainer = real
    w.pool.submit = broken
    with pytest.raises(MemoryError, match="decode pool exhausted"):
        w.process_shard(p.shards[0], commit=False)
    assert w.progress() == {}


def test_a_fenced_worker_commits_nothing_and_fence_waits_for_a_commit_in_progress(tmp_path, model, monkeypatch):
    import threading
    import time

    from audit.data import io

    manifest = h.make_manifest(tmp_path, n=6, boxes=True)
    spec = _spec(tmp_path, model, {"format": "manifest", "path": manifest, "shard_size": 3})
    io.prepare_output(spec.output, resume=False)
    p = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=p.classes)
    out = Path(spec.output)

    # a commit in progress when fence() is called: fence returns only after it landed
    entered, release, order = threading.Event(), threading.Event(), []
    real = io.write_shard

    def slow_write(*a, **k):
        entered.set()
        release.wait(10)
        entry = real(*a, **k)
        order.append("committed")
        return entry

    monkeypatch.setattr(io, "write_shard", slow_write)
    t = threading.Thread(target=w.process_shard, args=(p.shards[0],))
    t.start()
    assert entered.wait(60)
    f = threading.Thread(target=lambda: order.append(("fenced", w.fence())))
    f.start()
    time.sleep(0.2)
    assert order == []  # fence() is waiting behind the commit
    release.set()
    t.join(30)
    f.join(30)
    assert order[0] == "committed" and order[1][0] == "fenced"
    assert list(io.committed_shards(out)) == [0]

    # after the fence: the shard is computed but not committed, and the caller is told
    with pytest.raises(RuntimeError, match="shard 1 not committed: this worker was fenced"):
        w.process_shard(p.shards[1])
    assert list(io.committed_shards(out)) == [0]
    assert not (out / "records" / io.part_name(1)).with_suffix(".parquet").exists()


def test_paths_missing_on_the_actors_node_are_one_clear_error(tmp_path, model):
    import socket

    from audit.data import io

    manifest = h.make_manifest(tmp_path, n=2)
    spec = _spec(tmp_path, model, {"format": "manifest", "path": manifest, "shard_size": 2})
    io.prepare_output(spec.output, resume=False)
    AuditWorker(spec).check_paths()  # all there: no error

    # as on a node without the shared filesystem: output and dataset missing, the model there
    gone = tmp_path / "elsewhere"
    spec2 = replace(spec, dataset=replace(spec.dataset, path=str(gone / "m.csv")))
    with pytest.raises(AuditError) as e:
        AuditWorker(spec2, out_dir=str(gone / "out")).check_paths()
    msg = str(e.value)
    assert msg.startswith(f"on {socket.gethostname()}: not found: ")
    assert f"dataset.path {gone / 'm.csv'}; output {gone / 'out' / 'records'}." in msg and "model.path" not in msg
    assert "filesystem every node sees at the same path" in msg and "\n" not in msg


def test_a_model_that_takes_any_size_is_audited_at_model_input_size(tmp_path):
    import keras

    keras.utils.set_random_seed(3)

    def net(shape):
        inp = keras.Input(shape)
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x))

    anysize = net((None, None, 3))
    anysize.save(tmp_path / "any.keras")
    fixed = net((h.SIZE, h.SIZE, 3))
    fixed.set_weights(anysize.get_weights())
    fixed.save(tmp_path / "fixed.keras")

    ds = {"format": "manifest", "path": h.make_manifest(tmp_path, n=4), "shard_size": 4}
    spec = _spec(tmp_path, str(tmp_path / "any.keras"), ds, layers=["conv"])
    with pytest.raises(AuditError, match="accepts any image size; set model.input_size"):
        _run(spec)
    spec = load_spec({**spec.to_dict(), "model": {**spec.model.to_dict(), "input_size": [h.SIZE, h.SIZE]}})
    _, got, _ = _run(spec)
    _, ref, _ = _run(_spec(tmp_path, str(tmp_path / "fixed.keras"), ds, layers=["conv"]))
    assert (got.status == "ok").all() and got.image_id.tolist() == ref.image_id.tolist()
    np.testing.assert_allclose(np.stack(got.cam), np.stack(ref.cam), rtol=1e-5, atol=1e-7)
