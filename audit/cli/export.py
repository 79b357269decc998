"""``audit export OUT --to DIR``: group labels, cue masks and a counterfactual dataset for re-training."""

from __future__ import annotations

from audit.cli.audits import add_audit, add_command, add_destination, items

EXAMPLE = """examples:
  audit export results/my-job --to exports/my-job                      # all three
  audit export results/my-job --to exports/my-job --what groups        # metadata.csv only
  audit export results/my-job --to s3://bucket/exports/my-job --force  # a bucket; replace an earlier export

Needs the per-image evidence (`audit scan OUT --per-image`, or the end of
`audit run` when a class was flagged). Writes DIR/metadata.csv
(img_filename, y, split, place, cue, confidence: the layout Group DRO, JTT
and DFR read), DIR/masks/<image file name>.png (the cue pixels at each
image's resolution) and DIR/counterfactual/manifest.csv with its images (the
cue removed; other classes' images with the cue pasted in). docs/fixing.md
shows how each method reads them.
"""


def register(sub) -> None:
    p = add_command(
        sub, "export",
        help="write group labels, cue masks and a counterfactual dataset for re-training",
        description="Export the per-image cue evidence of an audit for fixing the model: group labels "
                    "(metadata.csv), cue masks, and a dataset with the cue removed or pasted in.",
        example=EXAMPLE, func=run,
    )
    add_audit(p, "out", "job output directory (or bucket URI) whose per-image pass ran")
    add_destination(p, "--to", "export folder or bucket URI", required=True)
    p.add_argument("--what", default="groups,masks,counterfactual", metavar="ITEMS",
                   help="comma-separated: groups, masks, counterfactual (default: all three)")
    p.add_argument("--paste", type=int, default=64, metavar="N",
                   help="other classes' images per cue that get it pasted in (default: 64)")
    p.add_argument("--force", action="store_true", help="replace what an earlier export left in DIR")


def run(args) -> int:
    from audit.scan.export import export

    export(args.out, args.to, items(args.what), force=args.force, paste_n=max(0, args.paste))
    return 0
