"""Fast feedback: spec and .keras config checked before TensorFlow is imported; model
errors found by the driver before any actor starts (bench figures: docs/jobs.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import helpers_jobs as h
import pytest

from audit.data.jobspec import JobSpec
from audit.errors import AuditError
from audit.runner.precheck import check_model_file, keras_layers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import keras

    tmp = tmp_path_factory.mktemp("pre")
    plain = h.make_model(tmp / "model.keras")
    inp = keras.Input((16, 16, 3))
    base = keras.Model(inp, keras.layers.Conv2D(4, 3, name="inner_conv")(inp), name="base")
    x = keras.Input((16, 16, 3))
    y = keras.layers.GlobalAveragePooling2D()(base(x))
    nested = tmp / "nested.keras"
    keras.Model(x, keras.layers.Dense(2, activation="softmax", name="head")(y)).save(nested)
    x = keras.Input((16, 16, 3))
    y = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    y = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3, name="c")(y))
    lam = tmp / "lambda.keras"
    keras.Model(x, y).save(lam)
    return {"plain": plain, "nested": str(nested), "lambda": str(lam), "dir": tmp}


def _spec(path, layers="auto", trust=False):
    return JobSpec.from_partial({"model": {"path": path, "trust_code": trust}, "explain": {"layers": layers}})


def test_layers_from_the_keras_config(models):
    layers = keras_layers(models["plain"])  # auto names (input_layer_N) depend on what the process built before
    assert [c for _, c in layers] == ["InputLayer", "Conv2D", "Conv2D", "GlobalAveragePooling2D", "Dense"]
    assert [p for p, _ in layers][1:3] + [layers[-1][0]] == ["conv1", "conv2", "head"]
    paths = [p for p, _ in keras_layers(models["nested"])]
    assert "base" in paths and "base/inner_conv" in paths
    assert keras_layers(models["dir"] / "missing.h5") is None  # not a .keras zip: left to the model check


def test_check_model_file_cases(models):
    check_model_file(_spec(models["plain"], ["conv1", "conv2"]))
    check_model_file(_spec(models["nested"], ["base/inner_conv"]))
    check_model_file(_spec(models["nested"], ["inner_conv"]))  # a bare name, as the engine accepts
    with pytest.raises(AuditError) as e:
        check_model_file(_spec(models["plain"], ["conv1", "conv3"]))
    assert str(e.value) == "unknown layer 'conv3'; the model's layers: conv1, conv2"
    with pytest.raises(AuditError, match="contains a Lambda layer .* set model.trust_code: true"):
        check_model_file(_spec(models["lambda"]))
    check_model_file(_spec(models["lambda"], trust=True))


def _cli(args, cwd):
    code = ("import sys\nfrom audit.cli import main\nrc = main(sys.argv[1:])\n"
            "print('RC', rc, 'TF', 'tensorflow' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_spec_typo_and_bad_layer_need_no_tensorflow(models):
    tmp = models["dir"]
    h.make_folder(tmp / "data", 2, masks=False)
    h.write_spec(tmp / "typo.yaml", dataset={"format": "folder", "path": "data", "shardsize": 8})
    h.write_spec(tmp / "job.yaml")
    r = _cli(["run", "typo.yaml"], tmp)
    assert "RC 2 TF False" in r.stdout, r.stderr[-2000:]
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(
        "audit: error: spec error: unknown key 'dataset.shardsize'; did you mean 'shard_size'? expected one of: ")
    r = _cli(["run", "job.yaml", "--set", "explain.layers=[conv9]"], tmp)
    assert "RC 2 TF False" in r.stdout, r.stderr[-2000:]
    assert r.stderr.strip() == "audit: error: unknown layer 'conv9'; the model's layers: conv1, conv2"
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("override, words", [
    ("explain.target=7", "target class 7 is out of range"),
    ("dataset.classes=[a, b, c]", "the dataset has 3 classes"),
])
def test_model_errors_are_found_before_ray_starts(models, tmp_path, override, words):
    import ray

    from audit.runner.job import run_job

    if ray.is_initialized():
        pytest.skip("needs a process without Ray")
    h.make_folder(tmp_path / "data", 2, masks=False, classes=("a", "b"))
    spec = h.write_spec(tmp_path / "job.yaml", model={"path": models["plain"], "preprocess": "scale_0_1"})
    with pytest.raises(AuditError, match=words):
        run_job(spec, overrides=[override], progress=False)
    assert not ray.is_initialized()  # found by the driver: no Ray, no actor
    assert not (tmp_path / "out").exists()
