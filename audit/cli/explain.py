"""``audit explain MODEL IMAGE... --out DIR``: the seeds' single-image figures."""

from __future__ import annotations

import argparse
import os
import sys

from audit.cli.layers import check_input_size, check_token_grid
from audit.errors import AuditError

USAGE = """audit explain MODEL IMAGE... --out DIR [options]
       audit explain --job OUT IMAGE_OR_ID... --out DIR [options]
       audit explain --application NAME IMAGE... --out DIR [options]"""

EXAMPLE = """example:
  audit explain --job results/tank-sky tank/0001.png --out explain/   # model, preprocessing, classes,
                                                       # layers and methods of that job; an image id or file
  audit explain models/tank_sky.keras data/tank_sky/tank/0001.png --preprocess scale_0_1 --out explain/
  audit explain --application ResNet50 --weights resnet50.weights.h5 dog.jpg --out explain/ \\
      --layers conv5_block3_3_conv conv5_block3_add conv5_block3_out --methods gradcam gradcam++ guided

Writes DIR/index.html with overlays per target layer x method, guided backpropagation,
guided Grad-CAM and deconvnet, feature-map grids, the first layer's filters and filter
patterns found by gradient ascent.  Default layers: the automatic one, the last convolution
before it and the last merge layer (`audit layers MODEL` lists the candidates).
"""


def _names(values):
    """Accept both `--layers a b` and `--layers a,b`."""
    if not values:
        return None
    out = []
    for v in values:
        out += [s for s in v.split(",") if s]
    return out or None


def register(sub) -> None:
    from audit.engine.backprop import all_methods
    from audit.review.explain import DEFAULT_METHODS

    p = sub.add_parser(
        "explain",
        usage=USAGE,
        help="single-image figures: CAM overlays per layer and method, guided backprop, feature maps, filters",
        description="Explain single images: CAM overlays per target layer and method, guided backpropagation, guided Grad-CAM, feature-map grids and filter patterns, written to DIR/index.html.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="MODEL IMAGE",
                   help="the model file (.keras/.h5) then one or more images (only images with --application "
                        "or --job; with --job also image ids of that job)")
    p.add_argument("--job", metavar="OUT",
                   help="a job's output: take its model, preprocessing, classes, layers and methods "
                        "(options given here override them); images may be its image ids")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--layers", nargs="+", help="target layers (default: automatic + last conv + last merge)")
    p.add_argument("--methods", nargs="+",
                   help=f"some of {', '.join(all_methods())} (default: {' '.join(DEFAULT_METHODS)}; "
                        "cam only where the head is GAP -> Dense; docs/methods.md describes each)")
    p.add_argument("--feature-layers", nargs="+",
                   help="layers for feature-map grids and filter patterns (default: first conv, middle, automatic)")
    p.add_argument("--filters", type=int, default=8, help="filter patterns per feature layer (0: none; default 8)")
    p.add_argument("--steps", type=int, default=40, help="gradient-ascent steps per pattern (default 40)")
    p.add_argument("--channels", type=int, default=32, help="channels per feature-map grid (default 32)")
    p.add_argument("--target", default="predicted", help="class to explain: predicted (default), index or name")
    p.add_argument("--classes", nargs="+", help="class names in output order (or one comma-separated list)")
    p.add_argument("--output", help="the classifier output of a model with several outputs (its name)")
    p.add_argument("--token-grid", nargs=2, type=int, metavar=("H", "W"),
                   help="grid of a vision transformer's patch tokens (default: found per layer; docs/layers.md)")
    p.add_argument("--preprocess", default=None,
                   help="none | scale_0_1 | scale_-1_1 | caffe | torch | a keras.applications module "
                        "(default: none; the application's own with --application)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="input size: for --application (default: the application's own), or for a "
                        "model that accepts any image size (required there)")
    p.add_argument("--application", help="a keras.applications name instead of a model file")
    p.add_argument("--weights", help="local weights file for --application (default: random weights)")
    p.add_argument("--trust-code", action="store_true", help="allow Lambda layers (turns Keras safe_mode off)")
    p.set_defaults(func=run)


def _application_preprocess(name: str) -> str:
    """The keras.applications module whose preprocess_input goes with application ``name``."""
    import keras

    fn = getattr(keras.applications, str(name), None)
    module = getattr(fn, "__module__", "").rsplit(".", 1)[-1]
    return module if hasattr(getattr(keras.applications, module, None), "preprocess_input") else "none"


def run(args) -> int:
    from audit.engine.models import check_preprocess, load_model
    from audit.review.explain import explain

    job, model_path, paths = _inputs(args)
    _check_images(paths)
    _check_options(args)
    preprocess = args.preprocess
    if preprocess is None:
        preprocess = _application_preprocess(args.application) if args.application else "none"
    check_preprocess(preprocess)
    model_path = _checked_model_path(args, model_path)
    model = load_model(model_path, application=args.application, weights=args.weights,
                       input_size=args.input_size, trust_code=args.trust_code)
    index = explain(
        model, paths, args.out, layers=_names(args.layers), methods=_names(args.methods),
        preprocess_mode=preprocess, feature_layers=_names(args.feature_layers), filters=args.filters,
        steps=args.steps, channels=args.channels, target=args.target, classes=_names(args.classes),
        output=args.output, token_grid=args.token_grid,
    )
    if job is None and not args.application:  # after the figures: a user mistake stays one line
        from audit.review.from_job import preprocess_warning

        warning = preprocess_warning(model, model_path, preprocess)
        if warning:
            print(warning, file=sys.stderr)
    print(f"wrote {index}")
    return 0


def _inputs(args):
    """The job (``--job``), the model path and the image paths the command line names."""
    paths = list(args.paths)
    job = None
    if args.job:
        from audit.review.from_job import job_inputs, resolve_images

        job = job_inputs(args.job)
        _take_from_job(args, job)
        paths = resolve_images(args.job, paths, args.out)
    model_path = job.model_path if job else None if args.application else paths.pop(0)
    if not paths:
        raise AuditError("give at least one IMAGE after the model")
    return job, model_path, paths


def _check_images(paths) -> None:
    """Every image exists and is a regular file: refused before the (slow) model load."""
    from pathlib import Path

    from audit.data import fs

    for p in paths:
        if fs.is_uri(p):
            if not fs.is_file(p):
                raise fs.not_found(p, "image")
        elif not Path(p).is_file():
            raise AuditError(f"image not found: {p}" if not os.path.lexists(p) else
                             f"image {p} is not a regular file (a folder, FIFO or device?)")


def _check_options(args) -> None:
    """Methods, counts, sizes and the output folder, each refused in one line."""
    from pathlib import Path

    from audit.engine.backprop import all_methods

    known = all_methods()
    bad = [m for m in _names(args.methods) or () if m not in known]
    if bad:
        raise AuditError(f"unknown method {bad[0]!r}; expected some of {', '.join(known)}")
    if args.filters < 0 or args.steps < 1 or args.channels < 1:
        raise AuditError("--filters must be at least 0, --steps and --channels at least 1")
    check_input_size(args.input_size)
    check_token_grid(args.token_grid)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise AuditError(f"--out {args.out} exists and is not a directory")


def _checked_model_path(args, model_path):
    """The model file checked before TensorFlow is imported; a bucket URI copied to a local file."""
    from audit.data import fs

    if model_path and not args.application and not fs.is_uri(model_path):
        from audit.engine.modelfile import check_layers, check_model_path

        check_model_path(model_path)  # before TensorFlow is imported
        check_layers(model_path, _names(args.layers), args.trust_code)
    if fs.is_uri(model_path):
        if not fs.is_file(model_path):
            raise fs.not_found(model_path, "model")
        model_path = fs.local_copy(model_path)  # Keras opens local files
    return model_path


def _take_from_job(args, job) -> None:
    """Fill the options the user left out from the job (``--job OUT``)."""
    args.application = args.application or job.application
    args.weights = args.weights or job.weights
    args.input_size = args.input_size or job.input_size
    args.trust_code = args.trust_code or job.trust_code
    args.output = args.output or job.output
    args.preprocess = args.preprocess or job.preprocess
    args.classes = args.classes or job.classes
    args.layers = args.layers or job.layers
    args.methods = args.methods or job.methods
    args.token_grid = args.token_grid or job.token_grid
