"""Every keras.applications architecture gets a spatial automatic layer, as docs/layers.md says.

Each model is built with ``weights=None`` (nothing downloads) and its top, at
the small input size of the docs table, in a fresh Keras session (so that the
numbered names of unnamed layers are those of the table).  The table in
docs/layers.md is the expected value: the test fails when the rule picks
another layer, when a required architecture is missing from the table, or when
the Grad-CAM maps at the chosen layer are not finite or all zero.
"""

import os
import re
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from audit.engine import graph
from audit.engine.explainer import Explainer

DOC = Path(__file__).resolve().parents[1] / "docs" / "layers.md"

# the architectures issue 10 asks for, and VGG16 / ResNet50 / InceptionV3
REQUIRED = (
    "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0",
    "EfficientNetV2B0", "ConvNeXtTiny", "NASNetMobile", "Xception", "InceptionResNetV2",
    "DenseNet121", "ResNet50V2", "RegNetX002", "VGG16", "ResNet50", "InceptionV3",
)
# over ~10 s each on 2 cores (build + trace + compile): skipped by -m "not slow"
SLOW = {"NASNetMobile", "InceptionResNetV2", "DenseNet121", "EfficientNetB0", "EfficientNetV2B0"}
# explained through the public, compiled call (a plain stack, depthwise convolutions, inverted
# residuals); the others run the Explainer's step eagerly (see _gradcam)
COMPILED = {"VGG16", "MobileNet", "MobileNetV2"}


def doc_table() -> dict[str, tuple[int, str, str]]:
    """architecture -> (input size, automatic layer, map 'hxw') from docs/layers.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.fullmatch(r"\| (\w+) \| (\d+) \| (\S+) \| (\d+x\d+) \|", line.strip())
        if m:
            rows[m[1]] = (int(m[2]), m[3], m[4])
    return rows


TABLE = doc_table()


def test_doc_table_has_every_required_architecture():
    missing = [a for a in REQUIRED if a not in TABLE and hasattr(keras.applications, a)]
    assert not missing, f"docs/layers.md has no row for {missing}"
    assert len(TABLE) >= 15


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in REQUIRED],
)
def test_automatic_layer_is_spatial_and_as_documented(arch):
    if not hasattr(keras.applications, arch):
        pytest.skip(f"{arch} is not in keras.applications {keras.__version__}")
    size, expected, hw = TABLE[arch]
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3), classes=3)
    call, why = graph.auto_layer(graph.trace(model))
    h, w = call.shape[1:3]
    assert (call.path, f"{h}x{w}") == (expected, hw)
    assert "every" in why  # the reason given names the rule (every path passes through it)
    assert len(call.shape) == 4 and h * w > 1

    x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    # one Explainer for both calls below: its compiled step reads the model's variables, so the
    # second call sees the negated kernel without tracing the model again (10-20 s on 2 cores)
    explain = Explainer(model, layers="auto", methods=("gradcam",), target=0, batch_size=len(x))
    assert list(explain.layers) == [expected]
    maps = _gradcam(explain, x, eager=arch not in COMPILED)
    assert maps.shape == (2, h, w)
    assert np.isfinite(maps).all()
    if not (maps > 0).any():
        # A random head can give class 0 a negative map in every cell (NASNetMobile: every
        # logit is negative).  The map is linear in the last kernel (the Dense head, or
        # MobileNetV3's 1x1 `logits` conv), so with that kernel negated it is the negated
        # map: zero both ways means no gradient reached the layer.
        last = [c.layer for c in graph.trace(model).calls if getattr(c.layer, "kernel", None) is not None][-1]
        last.kernel.assign(-last.kernel)
        maps = _gradcam(explain, x, eager=arch not in COMPILED)
        assert np.isfinite(maps).all()
    assert (maps > 0).any(), f"{arch}: every Grad-CAM map at {expected} is zero"


def _gradcam(explain, x, eager: bool) -> np.ndarray:
    """The Grad-CAM maps of class 0 at the Explainer's one layer.

    ``eager``: the Explainer's own step (the function its compiled call traces) run op by op: the
    same maps without the trace, which costs 3-30 s of CPU per architecture (NASNetMobile's: 11 s
    traced, 2 s eager).  The compiled call itself is tested on small models (tests/test_methods.py)
    and here on the architectures of ``COMPILED``.
    """
    if not eager:
        return explain(x).maps[(explain.layers[0], "gradcam")]
    import tensorflow as tf

    *_, maps = explain._step(tf.constant(x), tf.zeros(len(x), tf.int32))  # target 0, as explain(x) asks
    assert len(maps) == 1  # one layer x one method
    return maps[0].numpy()
