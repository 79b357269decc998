"""``audit layers MODEL``: candidate target layers and the automatic choice."""

from __future__ import annotations

import argparse

EXAMPLE = """example:
  audit layers models/tank_sky.keras
  audit layers --application ResNet50 --input-size 224 224
"""


def register(sub) -> None:
    p = sub.add_parser(
        "layers",
        help="list candidate target layers and mark the automatic choice",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help=".keras or .h5 model file")
    p.add_argument("--application", help="a keras.applications name instead of a file (random weights)")
    p.add_argument("--weights", help="local weights file for --application")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="input size: for --application (default: the application's own), or to show "
                        "the shapes of a model that accepts any image size")
    p.add_argument("--all", action="store_true", help="list every spatial layer, not only the last 40")
    p.add_argument("--trust-code", action="store_true", help="allow Lambda layers (turns Keras safe_mode off)")
    p.set_defaults(func=run)


def check_input_size(size) -> None:
    from audit.errors import AuditError

    if size is not None and min(size) < 1:
        raise AuditError(f"--input-size must be two integers >= 1 (H W), got {size[0]} {size[1]}")


def run(args) -> int:
    from audit.engine import graph
    from audit.errors import AuditError

    if not args.model and not args.application:
        raise AuditError("give a model file or --application NAME")
    check_input_size(args.input_size)
    from audit.engine.models import load_model

    model = load_model(args.model, application=args.application, weights=args.weights,
                       input_size=args.input_size, trust_code=args.trust_code)
    t = graph.trace(model)
    chosen, why = graph.auto_layer(t)
    cands = graph.candidates(t)
    shown = cands if args.all else cands[-40:]
    width = max(len(c.path) for c in shown)
    kinds = max(len(c.kind) for c in shown)
    if len(shown) < len(cands):
        print(f"... {len(cands) - len(shown)} earlier layers (--all shows them)")
    for c in shown:
        mark = "*" if c is chosen else " "
        through = "" if not graph.through_every_path(t, c) else "  all paths"
        print(f"{mark} {c.path:<{width}}  {c.kind:<{kinds}}  {str(c.shape[1:]):<16}{through}")
    print(f"\nautomatic choice: {chosen.path} ({why})")
    return 0
