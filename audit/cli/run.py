"""``audit run SPEC.yaml``: run an audit job on Ray, then scan its output."""

from __future__ import annotations

import argparse
import sys

from audit.cli.outcome import add_fail_on, add_per_image, after_scan
from audit.cli.scan import add_causal_budget, causal_budget
from audit.errors import AuditError

EXAMPLE = """examples:
  audit run jobs/example_folder.yaml                      # embedded local Ray
  audit run job.yaml --set dataset.shard_size=256 --set resources.actors=4
  audit run job.yaml --address auto                       # join the cluster this node belongs to
  audit run job.yaml --address ray://head:10001 --resume  # continue an interrupted job
  audit run job.yaml --fail-on shortcut --per-image none  # for CI: exit 3 when a class is suspected

The output directory must be empty unless --resume is given; --resume skips
the shards already committed there. See docs/jobs.md for the spec format.
"""


class _Resume(argparse.Action):
    """``--resume`` or ``--resume=replan``; ``--resume SPEC.yaml`` still means the spec."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value is True or value == "replan":
            namespace.resume = value
            return
        if getattr(namespace, "spec", None) is None:
            namespace.spec_after_resume = value
            namespace.resume = True
            return
        parser.error(f"--resume takes no value or =replan, not {value!r}")


def add_resume(p, help: str) -> None:
    """The ``--resume[=replan]`` option (``audit run``, ``audit submit``): ``args.resume`` is False, True or "replan"."""
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="replan", action=_Resume, help=help)


def spec_arg(args, parser) -> str:
    """The spec, also when it came after a bare ``--resume`` (``audit run --resume job.yaml``)."""
    spec = args.spec or getattr(args, "spec_after_resume", None)
    if spec is None:
        parser.error("the following arguments are required: spec")
    return spec


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run an audit job (Grad-CAM over a sharded dataset on Ray), then scan it",
        description="Run an audit job: explain every image of the dataset with Ray actors, "
                    "write OUT/records/part-*.parquet exactly once per shard, then scan for shortcuts.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", help="job spec (YAML)")
    p.add_argument("--address", help="Ray cluster: 'auto', HOST:PORT (its GCS) or ray://HOST:10001 "
                                     "(default: an embedded local Ray); on a token-mode cluster also set "
                                     "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
    add_resume(p, "continue the job in a non-empty output, skipping committed shards that still hold "
                  "what the dataset holds (refused at the first shard that changed); --resume=replan "
                  "keeps the shards before that one and redoes the rest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec value (YAML), e.g. --set resources.batch_size=32; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-scan", action="store_true", help="do not run the scan at the end")
    add_causal_budget(p)
    add_per_image(p, "flagged")
    add_fail_on(p)
    p.set_defaults(func=run, run_parser=p)


def format_summary(s: dict) -> str:
    lines = [f"job {s['name']} ({s['job_id']}): {s['status']}"]
    skipped = s["images_done"] - s["images_this_run"]
    lines.append(
        f"  images    {s['images_done']:,} of {s['images']:,} audited"
        + (f" ({s['images_this_run']:,} this run, {skipped:,} from committed shards)" if s["shards_skipped"] else "")
    )
    lines.append(f"  errors    {s['errors']:,} unreadable (status=error rows)    flat maps {s['flat_maps']:,}")
    if s.get("accuracy") is not None:
        lines.append(f"  accuracy  {100 * s['accuracy']:.1f}% on labelled images")
    if s.get("model_warning"):
        lines.append(f"  WARNING   {s['model_warning']}")
    lines.append(
        f"  shards    {s['shards']:,} ({s['shards_skipped']:,} skipped, {s['retries']} retried, "
        f"{len(s['shards_failed'])} failed)    actors {s['actors']} ({s['actor_deaths']} died)"
    )
    if s.get("devices"):
        lines.append(f"  devices   {s['devices']}")
    if s.get("startup_s") is not None:
        lines.append(f"  start-up  {s['startup_s']:.1f} s (spec, dataset plan, Ray and actors or the model load)")
    if s.get("images_per_s"):
        lines.append(f"  speed     {s['images_per_s']:.1f} images/s over {s['compute_s']:.1f} s of compute")
    lines.append(f"  output    {s['output']}  ({s['rows']:,} rows)")
    lines.append(f"  query     python -c \"import audit; print(audit.load('{s['output']}').head())\"")
    done = s.get("shards_done")
    if done is not None and done < s["shards"]:
        lines.append(f"  INCOMPLETE {done:,} of {s['shards']:,} shards committed: continue with --resume")
    if s["shards_failed"]:
        shown = ", ".join(map(str, s["shards_failed"][:10]))
        lines.append(f"  FAILED    shards {shown}{'...' if len(s['shards_failed']) > 10 else ''}: "
                     "see failed_shards in job.json; rerun with --resume")
    return "\n".join(lines)


def run(args) -> int:
    from audit.runner.job import run_job

    args.spec = spec_arg(args, args.run_parser)
    budget = causal_budget(args)  # a bad value is refused before the job starts
    if args.no_scan and args.fail_on:
        raise AuditError("--fail-on needs the scan's verdicts: drop --no-scan, or run `audit scan OUT --fail-on "
                         "shortcut` after the job")
    try:
        summary = run_job(args.spec, address=args.address, resume=args.resume, overrides=args.overrides,
                          progress=not args.no_progress)
    except KeyboardInterrupt:
        print("audit: interrupted; committed shards are kept, continue with: "
              f"audit run {args.spec} --resume", file=sys.stderr)
        return 130
    print(format_summary(summary))
    code = 0 if summary["status"] == "ok" else 1
    if args.no_scan:
        return code
    from audit.scan.pipeline import scan_as_saved

    try:
        # a resumed job keeps the kind of scan saved in OUT; --causal-budget changes only the budget
        classes, _ = scan_as_saved(summary["output"], changes=budget)
        found = after_scan(summary["output"], classes, args, address=args.address)
    except Exception as e:  # the records stay valid; `audit scan OUT` can redo it
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"audit: scan failed ({type(e).__name__}: {msg[:300]}); the job output is complete, "
              f"retry with: audit scan {summary['output']}", file=sys.stderr)
        return 1
    return code or found
