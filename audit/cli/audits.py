"""What the commands that read finished audits share (``audit compare``, ``audit export``).

Both read scanned job outputs and write a folder (or bucket URI) of their
own: one parser shape (help with an example, epilog kept as written), one
way to name a job output and a destination, and one parser of a
comma-separated list of items.  Whether a job output was scanned (or has
its per-image evidence) is checked by the library
(:func:`audit.scan.imagetable.require`), so the library and the command
line refuse it with the same line.
"""

from __future__ import annotations

import argparse


def add_command(sub, name: str, *, help: str, description: str, example: str, func):
    """A subcommand whose ``--help`` ends with ``example`` as written; ``func(args) -> int`` runs it.

    Args:
        sub: the ``add_subparsers`` object.
        name: the command.
        help: one line for ``audit --help``.
        description: the command's ``--help`` description.
        example: its epilog (examples, exit statuses), kept as written.
        func: the command's ``run(args)``.

    Returns:
        The subparser, to add the command's own arguments.
    """
    p = sub.add_parser(name, help=help, description=description, epilog=example,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def add_audit(p, dest: str, help: str) -> None:
    """A positional job output (a directory or bucket URI)."""
    p.add_argument(dest, help=help)


def add_destination(p, flag: str, help: str, *, required: bool = False) -> None:
    """Where the command writes (``--out DIR``, ``--to DIR``): a folder or bucket URI."""
    p.add_argument(flag, required=required, metavar="DIR", help=help)


def items(text: str) -> tuple:
    """A comma-separated list of items (``groups,masks``), blanks and spaces dropped."""
    return tuple(w.strip() for w in str(text).split(",") if w.strip())
