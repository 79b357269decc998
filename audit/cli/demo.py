"""``audit demo``: the tank/sky shortcut, found end to end on this machine."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  audit demo                        # writes ~/.cache/shortcut-audit/demo/{shortcut,control}
  audit demo --out /tmp/demo --no-masks
  audit demo --fix                  # then DFR on the export's groups, re-audit, compare

The first run generates the tank/sky photos and trains the two small models
(about 20 s) into the user cache (~/.cache/shortcut-audit, or
$SHORTCUT_AUDIT_CACHE); later runs reuse them.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the tank/sky demo: a detector that learned the weather, and its control",
        description="Build the tank/sky data and models (cached), audit both models (in this process: small jobs start no Ray), "
                    "scan, write the reports and print the verdicts.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None,
                   help="output directory (default: demo/ in the user cache, ~/.cache/shortcut-audit/demo, "
                        "or $SHORTCUT_AUDIT_CACHE/demo)")
    p.add_argument("--no-masks", action="store_true", help="audit without the tank masks")
    p.add_argument("--no-intervene", action="store_true", help="skip the confirmation by occlusion")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--fix", action="store_true",
                   help="go on: re-train the shortcut model's last layer on group-balanced photos from the export "
                        "(DFR), re-audit it and compare (OUT/fixed, OUT/fix/compare.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from audit.demo import flagged, run_demo

    r = run_demo(args.out, masks=not args.no_masks, intervene=not args.no_intervene,
                 report=not args.no_report, progress=not args.no_progress, fix=args.fix)
    ok = flagged(r["models"]["shortcut"]["classes"]) and not flagged(r["models"]["control"]["classes"])
    return 0 if ok else 1
