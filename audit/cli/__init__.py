"""The ``audit`` command line: a thin shell over the library.

Each command group lives in its own module, which exposes
``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
A user mistake (:class:`audit.errors.AuditError`) is printed as one line,
``audit: error: ...``, with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from audit import __version__
from audit.errors import AuditError, os_error_line

COMMANDS = ("run", "submit", "scan", "report", "layers", "explain", "demo", "export", "compare")
# No command imports TensorFlow up front: each imports it only after what needs no model was
# checked (a typo, a missing folder, a PNG given as the model, an unknown layer of a .keras or .h5
# file cost no TF import); every import of it is quiet (audit.quiet.install).


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other user mistake."""

    def error(self, message):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f"{sub}: " if sub else ""
        self.exit(2, f"audit: error: {where}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="audit",
        description="Find image classifiers that learned a shortcut: distributed Grad-CAM audits on Ray.",
        epilog="Start with `audit demo`; `audit COMMAND --help` shows an example for each command.",
    )

    parser.add_argument("--version", action="version", version=f"shortcut-audit {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"audit.cli.{name}").register(sub)
    for p in sub.choices.values():
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


VERBOSE_HELP = "also show TensorFlow's, absl's, CUDA's and Ray's own log lines (hidden by default)"


def quiet_tensorflow(verbose: bool = False) -> None:
    """Keep TensorFlow's, absl's and Ray's start-up lines off stderr (before TF is imported).

    Args:
        verbose: show them instead (``--verbose``); sets ``AUDIT_VERBOSE=1`` for the
            processes this one starts (Ray actors, the scan's model).
    """
    from audit import quiet

    if verbose:
        os.environ["AUDIT_VERBOSE"] = "1"
    quiet.install()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_tensorflow(bool(getattr(args, "verbose", False)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AuditError as e:
        print(f"audit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named or a place the output goes (read-only, full, gone)
        print(f"audit: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("audit: interrupted", file=sys.stderr)
        return 130
