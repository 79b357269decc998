"""`audit explain --job OUT`: the job's model, preprocessing, classes, layers and methods; image ids;
and the warning for 0-255 pixels fed to a model that does not rescale them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers_jobs import image, write_png


def _model(path, rescale: bool):
    """Trained-on-0..1 stand-in: a softmax over (mean brightness, 0.5), sharp, so 0-255 input saturates."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inp) if rescale else inp
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    model.save(path)
    return model


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A job output with job.json and records naming two images (no Ray: what explain reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("xjob")
    model = _model(tmp / "model.keras", rescale=False)
    ids = ["square/a.png", "disc/b.png"]
    for k, i in enumerate(ids):
        write_png(tmp / "data" / i, image(k, k)[0])
    out = tmp / "out"
    (out / "records").mkdir(parents=True)
    spec = {"model": {"path": str(tmp / "model.keras"), "preprocess": "scale_0_1"},
            "explain": {"methods": ["gradcam"], "layers": "auto"}}
    (out / "job.json").write_text(json.dumps({"spec": spec, "classes": ["square", "disc"], "layers": ["conv1"]}))
    pq.write_table(pa.table({"image_id": ids, "path": [str(tmp / "data" / i) for i in ids],
                             "path_bytes": [None, None], "status": ["ok", "ok"]}), out / "records" / "part-0.parquet")
    return {"tmp": tmp, "out": out, "model": model, "ids": ids}


def _page(folder):
    html = (folder / "index.html").read_text()
    m = re.search(r"predicted (\S+) \(([0-9.]+)\), explained class", html)
    assert m, html[:2000]
    return html, m.group(1), float(m.group(2))


def test_explain_takes_model_preprocessing_classes_layers_methods_from_the_job(job, capsys):
    from audit.cli import main
    from audit.engine.models import model_input

    dest = job["tmp"] / "fig"
    assert main(["explain", "--job", str(job["out"]), "disc/b.png", "--out", str(dest), "--filters", "0"]) == 0
    assert capsys.readouterr().err == ""
    html, pred, score = _page(dest)
    img = image(1, 1)[0][None]
    p = job["model"].predict(model_input(img, 3, "scale_0_1"), verbose=0)[0].astype(np.float64)
    assert pred == ["square", "disc"][int(p.argmax())]  # a class name, not a number
    assert score == pytest.approx(p.max(), abs=1e-3)  # the job's preprocessing, not 0-255 pixels
    assert "conv1" in html and "conv2" not in html.split("<body", 1)[-1].split("feature", 1)[0]
    assert "gradcam++" not in html


def test_image_ids_and_files_both_work_and_a_wrong_id_is_one_line(job):
    from audit import AuditError
    from audit.review.from_job import resolve_images

    f = str(job["tmp"] / "data" / "square" / "a.png")
    assert resolve_images(job["out"], ["square/a.png", f], job["tmp"] / "x") == [f, f]
    with pytest.raises(AuditError, match="'nope.png' is neither an image file nor an image id.*square/a.png"):
        resolve_images(job["out"], ["nope.png"], job["tmp"] / "x")


def test_warning_for_raw_pixels_without_rescaling(job, tmp_path, capsys):
    from audit.cli import main
    from audit.review.from_job import rescales_inputs

    img = str(job["tmp"] / "data" / "square" / "a.png")
    assert main(["explain", str(job["tmp"] / "model.keras"), img, "--out", str(tmp_path / "a"), "--filters", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("audit: warning: ") and "--preprocess scale_0_1" in err[0], err
    scaled = _model(tmp_path / "scaled.keras", rescale=True)
    assert rescales_inputs(scaled) and not rescales_inputs(job["model"])
    assert main(["explain", str(tmp_path / "scaled.keras"), img, "--out", str(tmp_path / "b"), "--filters", "0"]) == 0
    assert main(["explain", str(job["tmp"] / "model.keras"), img, "--out", str(tmp_path / "c"), "--filters", "0",
                 "--preprocess", "scale_0_1"]) == 0
    assert capsys.readouterr().err == ""


def test_usage_line_names_model_then_images():
    from audit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["explain"]
    usage = sub.format_usage()
    assert "MODEL IMAGE [MODEL IMAGE ...]" not in usage
    assert "audit explain MODEL IMAGE... --out DIR" in usage and "--job OUT IMAGE_OR_ID..." in usage
