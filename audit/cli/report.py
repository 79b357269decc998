"""``audit report OUT``: the self-contained HTML report of a scan."""

from __future__ import annotations

import argparse

from audit.errors import AuditError

EXAMPLE = """example:
  audit report results/tank-sky
  audit report results/imagenet-audit --max-examples 24 --max-classes 50 --method gradcam++
  audit report /shared/readonly/audit --out ~/reports/audit

Writes OUT/report.html, or DIR/report.html with --out DIR (pictures inline: one
file to mail or attach to a ticket).
It samples: a million records still give a report of a few MB in seconds.
Run `audit scan OUT` first for verdicts and clusters.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write OUT/report.html: suspects, mean heatmaps, cluster galleries, doubtful examples, errors",
        description="Write a self-contained HTML report of a job output: the suspected classes with their "
                    "evidence, each class's mean heatmap, galleries of overlays per cluster, the doubtful "
                    "examples and the unreadable images.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="job output folder (has records/, job.json, summary/)")
    p.add_argument("--max-examples", type=int, default=12, help="overlays per gallery (default 12)")
    p.add_argument("--max-classes", type=int, default=24,
                   help="classes with pictures, suspects first (default 24; the table lists all)")
    p.add_argument("--layer", help="layer whose maps are shown (default: the scan's, else the job's first)")
    p.add_argument("--method", help="method whose maps are shown (default: the scan's, else the job's first)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", dest="dest", metavar="DIR",
                   help="write DIR/report.html instead of OUT/report.html (created; e.g. when OUT is read-only)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from audit.review.report import write_report

    if args.max_examples < 1 or args.max_classes < 0:
        raise AuditError("--max-examples must be at least 1 and --max-classes at least 0")
    t0 = time.perf_counter()
    path = write_report(args.out, max_examples=args.max_examples, max_classes=args.max_classes,
                        seed=args.seed, layer=args.layer, method=args.method, dest=args.dest)
    from audit.data import fs

    size = fs.size(str(path)) / 1e6  # OUT/report.html may be an object in a bucket
    print(f"wrote {path} ({size:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0
