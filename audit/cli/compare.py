"""``audit compare A B``: two audits side by side; ``--fail-on new|any`` for CI."""

from __future__ import annotations

from audit.cli.audits import add_audit, add_command, add_destination

EXAMPLE = """examples:
  audit compare results/before results/after                       # printed, per class
  audit compare results/before results/after --out cmp/            # cmp/compare.html and cmp/compare.parquet
  audit compare results/main results/pr-123 --fail-on new          # exit 3 when a class gained a shortcut

Both must be scanned job outputs (summary/classes.parquet); with per-image
evidence on both sides, the images whose cue dependence changed are counted.
Exit status: 0 done, 2 a user mistake, 3 what --fail-on names was found.
"""


def register(sub) -> None:
    p = add_command(
        sub, "compare",
        help="compare two audits (before/after a fix, two checkpoints, two datasets)",
        description="Compare two scanned audits class by class: verdict changes, flip rates, attention and "
                    "cost with their intervals, and the images whose cue dependence changed.",
        example=EXAMPLE, func=run,
    )
    add_audit(p, "a", "the first audit's output (before)")
    add_audit(p, "b", "the second audit's output (after)")
    add_destination(p, "--out", "write DIR/compare.html and DIR/compare.parquet")
    p.add_argument("--fail-on", choices=("new", "any"), default=None,
                   help="exit 3 when a class gained a shortcut in B (new) or B has any suspected class (any)")


def run(args) -> int:
    from audit.scan.compare import compare, exit_status, format_comparison

    c = compare(args.a, args.b)
    print(format_comparison(c))
    if args.out:
        from audit.review.compare import write

        paths = write(c, args.out)
        print(f"written: {', '.join(paths[:2])}")
    return exit_status(c, args.fail_on)
