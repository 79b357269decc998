"""What ``audit run`` and ``audit scan`` do after the scan: the per-image pass and the exit status.

Exit statuses of every command: 0 done (nothing found, or no ``--fail-on``),
2 a user mistake (one line on stderr), 3 a shortcut found where ``--fail-on``
asked for failure.
"""

from __future__ import annotations

import argparse

EXIT_SHORTCUT = 3
PER_IMAGE = ("flagged", "none")


class _PerImage(argparse.Action):
    """Stores the value and that the user asked for it (``args.per_image_asked``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.per_image = value
        namespace.per_image_asked = value == "flagged"


def add_per_image(p, default: str | None) -> None:
    """``--per-image [flagged|none]``: the per-image cue pass after the scan (``flagged``: the cues of the
    suspected classes; a bare ``--per-image`` means ``flagged``)."""
    p.add_argument("--per-image", nargs="?", const="flagged", default=default, choices=PER_IMAGE,
                   action=_PerImage,
                   metavar="flagged|none",
                   help="per-image cue evidence for every image (summary/images.parquet) after the scan: "
                        "'flagged' (the bare flag) for the cues of the suspected classes, 'none' to skip it"
                        + (" (default: flagged, when the scan flags a class)" if default else " (default: none)"))


def add_fail_on(p) -> None:
    """``--fail-on shortcut``: exit 3 when the scan suspects a class (for CI)."""
    p.add_argument("--fail-on", choices=("shortcut",), default=None,
                   help="exit with status 3 when a class is suspected of a shortcut (for CI)")


def suspected(classes_df) -> bool:
    return classes_df is not None and bool((classes_df["verdict"] == "shortcut_suspected").any())


def after_scan(out, classes_df, args, *, address=None, quiet=False) -> int:
    """Run the per-image pass when asked and something was flagged; the exit status (0 or 3).

    Raises:
        AuditError: the pass cannot load the job's model or data.
    """
    if getattr(args, "per_image", None) == "flagged" and suspected(classes_df):
        from audit.scan.imagepass import run_pass

        run_pass(out, address=address, quiet=quiet)
    elif getattr(args, "per_image_asked", False) and not quiet:
        print("per-image pass: no class is suspected, nothing to do")
    if getattr(args, "fail_on", None) == "shortcut" and suspected(classes_df):
        return EXIT_SHORTCUT
    return 0
