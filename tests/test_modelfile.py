"""What a model path is, told before TensorFlow is imported: no model file, SavedModel, weights only,
unknown layers of .keras and .h5 files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers_jobs import encode_png, image, make_model, write_png

from audit import AuditError
from audit.engine.modelfile import check_layers, check_model_path, model_layers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import keras

    tmp = tmp_path_factory.mktemp("modelfile")
    make_model(tmp / "m.keras")
    model = keras.models.load_model(tmp / "m.keras")
    model.save(tmp / "m.h5")
    model.save_weights(tmp / "w.weights.h5")
    write_png(tmp / "photo.png", image(0, 0)[0])
    (tmp / "photo.keras").write_bytes(encode_png(image(0, 0)[0]))
    (tmp / "saved").mkdir()
    (tmp / "saved" / "saved_model.pb").write_bytes(b"\x08\x01")
    return tmp


def test_layers_of_keras_and_h5_files_agree(files):
    keras_layers = [p for p, c in model_layers(files / "m.keras") if c != "InputLayer"]
    assert keras_layers == ["conv1", "conv2", keras_layers[2], "head"]
    assert [p for p, c in model_layers(files / "m.h5") if c != "InputLayer"] == keras_layers
    assert model_layers(files / "w.weights.h5") is None


@pytest.mark.parametrize("name, words", [
    ("photo.png", "must end in .keras, .h5 or .hdf5 (it is a PNG image)"),
    ("photo.keras", "is not a Keras model: a .keras model file is a zip file, this one is a PNG image"),
    ("saved", "TensorFlow SavedModel folder, not a model file"),
    ("w.weights.h5", "holds no model configuration: an .h5 file of weights only"),
    ("nope.keras", "model file not found"),
])
def test_what_is_no_model_is_one_line(files, name, words):
    with pytest.raises(AuditError, match=None) as e:
        check_model_path(files / name)
    assert words in str(e.value) and "\n" not in str(e.value)
    if name == "saved":
        assert "tf_keras.models.load_model(" in str(e.value) and ".save('model.h5')" in str(e.value)


def test_unknown_layer_in_h5_and_keras(files):
    for f in ("m.keras", "m.h5"):
        check_layers(files / f, ["conv1", "conv2"], trust_code=False)
        with pytest.raises(AuditError, match="unknown layer 'conv9'; the model's layers: .*conv1, conv2"):
            check_layers(files / f, ["conv9"], trust_code=False)


def test_cli_refuses_before_tensorflow(files):
    """`audit layers` / `audit explain` / `audit run` on no model: one line, and TensorFlow never imported."""
    code = ("import sys; from audit.cli import main; rc = main(sys.argv[1:]); "
            "print('TF' if 'tensorflow' in sys.modules else 'noTF', rc)")
    cases = [["layers", str(files / "photo.png")], ["layers", str(files / "saved")],
             ["explain", str(files / "m.h5"), str(files / "photo.png"), "--out", str(files / "x"),
              "--layers", "conv9"],
             ["explain", str(files / "m.keras"), str(files / "photo.png"), "--out", str(files / "x"),
              "--preprocess", "scale_0_2"]]
    for argv in cases:
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=files,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert r.stdout.split() == ["noTF", "2"], (argv, r.stdout, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("audit: error: "), lines
