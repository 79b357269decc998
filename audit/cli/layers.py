"""``audit layers MODEL``: candidate target layers and the automatic choice."""

from __future__ import annotations

import argparse

from audit.errors import AuditError

EXAMPLE = """example:
  audit layers models/tank_sky.keras
  audit layers --application ResNet50 --input-size 224 224
  audit layers vit.keras --token-grid 14 14

'*' marks the automatic choice; 'all paths': every input-to-output path passes
through the layer; 'tokens 1 + 7x7': one class token and a 7x7 grid of patch
tokens; 'not usable': why the layer cannot be a target layer (1x1 output, no grid).
"""


def register(sub) -> None:
    p = sub.add_parser(
        "layers",
        help="list candidate target layers and mark the automatic choice",
        description="List the layers of a model that can be target layers (4-D maps, or a vision transformer's patch tokens), with their output shapes, and mark the automatic choice and why.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help=".keras or .h5 model file")
    p.add_argument("--application", help="a keras.applications name instead of a file (random weights)")
    p.add_argument("--weights", help="local weights file for --application")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="input size: for --application (default: the application's own), or to show "
                        "the shapes of a model that accepts any image size")
    p.add_argument("--token-grid", nargs=2, type=int, metavar=("H", "W"),
                   help="grid of the patch tokens of a vision transformer (default: found per layer, "
                        "see docs/layers.md)")
    p.add_argument("--all", action="store_true", help="list every layer, not only the last 40")
    p.add_argument("--output", help="the classifier output of a model with several outputs (its name)")
    p.add_argument("--trust-code", action="store_true", help="allow Lambda layers (turns Keras safe_mode off)")
    p.set_defaults(func=run)


def check_input_size(size) -> None:
    if size is not None and min(size) < 1:
        raise AuditError(f"--input-size must be two integers >= 1 (H W), got {size[0]} {size[1]}")


def run(args) -> int:
    if not args.model and not args.application:
        raise AuditError("give a model file or --application NAME")
    check_input_size(args.input_size)
    check_token_grid(args.token_grid)
    from audit.data import fs
    from audit.engine.models import load_model

    if args.model and not args.application and not fs.is_uri(args.model):
        from audit.engine.modelfile import check_layers, check_model_path

        check_model_path(args.model)  # before TensorFlow is imported
        check_layers(args.model, None, args.trust_code)
    from audit.engine import graph

    model = load_model(args.model, application=args.application, weights=args.weights,
                       input_size=args.input_size, trust_code=args.trust_code)
    t = graph.trace(model, token_grid=args.token_grid, output=args.output)
    rows = graph.map_layers(t)
    try:
        chosen, why = graph.auto_layer(t)
    except AuditError as e:
        chosen, why = None, str(e)
    shown = rows if args.all else rows[-40:]
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} earlier layers (--all shows them)")
    for line in format_rows(graph.describe(t, shown), chosen):
        print(line)
    print(f"\nautomatic choice: {chosen.path} ({why})" if chosen else f"\nno automatic choice: {why}")
    return 0


def check_token_grid(grid) -> None:
    if grid is not None and min(grid) < 1:
        raise AuditError(f"--token-grid must be two integers >= 1 (h w), got {grid[0]} {grid[1]}")


def format_rows(rows, chosen) -> list[str]:
    """One line per layer: mark, path, kind, shape, map size (or token grid) and notes."""
    if not rows:
        return []
    width = max(len(r.call.path) for r in rows)
    kinds = max(len(r.call.kind) for r in rows)
    lines = []
    for r in rows:
        c = r.call
        mark = "*" if c is chosen else " "
        grid = f"tokens {c.grid}" if c.grid is not None else ""
        notes = [n for n in (grid, "all paths" if r.all_paths else "",
                             f"not usable: {r.reason.split(';')[0]}" if r.reason else "") if n]
        lines.append(f"{mark} {c.path:<{width}}  {c.kind:<{kinds}}  {str(c.shape[1:]):<16}  "
                     + "  ".join(notes))
    return [line.rstrip() for line in lines]
