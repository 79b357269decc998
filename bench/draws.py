"""Fresh-draw benchmark: does the scan find shortcuts nobody wrote, and only them?

    .venv/bin/python bench/draws.py --seeds 340-369       # the score that counts: fresh draws
    .venv/bin/python bench/draws.py --seeds 0-1           # draws thresholds may be chosen on (0-99, 200-339)
    .venv/bin/python bench/draws.py --seeds 340-369 --rescan    # the same records, the current scan
    .venv/bin/python bench/draws.py --seeds 340-369 --rescore   # score the last run's scans again

For every seed: draw a case (:func:`audit.zoo.space.draw_case`: cue family,
size, place, opacity, share, classes, distractors, network, head, side,
channels, masks), build it (paint the training split, train a tiny model,
check with the paired counterfactual which cues it learned; cached under the
zoo cache), audit the training split with ``audit.runner.job.run_job`` in
this process (``AUDIT_IN_PROCESS=1``: the records, manifest and job.json of
``audit run`` without a Ray actor; ``--ray``: on one local Ray instead),
scan it (``audit.scan.pipeline.scan``) and score the flagged classes
(:mod:`audit.zoo.tally`).  A draw that needs scikit-image's photographs is
skipped, and said so, where scikit-image is missing.

Prints one line per case, the table of precision and recall per cue family
with 95% Wilson intervals, false flags on negative controls, and the
evidence of every miss and false flag.  Outputs stay under ``--out``
(``results/draws/draw<seed>``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

FRESH = 100  # seeds from here on are never used to choose a threshold ...
DEVELOPMENT = range(200, 340)  # ... except these, read draw by draw on 2026-12-07 (docs/scan.md)
SCORED = "340-369"  # the fresh draws the current score is given on


def seed_range(text: str) -> list[int]:
    """``"100-129"`` or ``"3,5,8"`` (or both, comma-separated) -> the seeds."""
    out = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


OBJECT_MIN = 0.5  # a healthy class counts as healthy only when the model gives at least this share of
#                   its cue-free held-out images to it (--objects-learned, a second score)


def outcome(case, built, classes_df, objects: dict | None = None):
    """The :class:`audit.zoo.tally.CaseOutcome` of one scanned draw; with ``objects`` ({class: share of its
    cue-free held-out images the model gives it}) a class under :data:`OBJECT_MIN` counts neither way."""
    from audit.zoo.tally import CaseOutcome

    planted, partial = built.with_status("learned"), built.with_status("partial")
    families = {n: "none" for n in case.classes}
    families.update({c.class_name: c.family for c in built.checks})
    unknown = [n for n, a in (objects or {}).items() if a < OBJECT_MIN and n not in planted]
    partial = partial + [n for n in unknown if n not in partial]
    healthy = [n for n in case.classes if n not in planted and n not in partial]
    flagged = sorted(str(r.class_name) for r in classes_df.itertuples() if r.verdict == "shortcut_suspected")
    return CaseOutcome(case.name, planted, partial, healthy, flagged, families)


def audit_case(case, built, out: Path, mode: str = "run"):
    """Run the job and the scan; the scan's classes table.

    ``mode``: ``run`` (the job in this process), ``ray`` (the job on the local Ray) or ``rescan``
    (keep the job's records when they are there: only the scan again).
    """
    from audit.runner.job import run_job
    from audit.scan.pipeline import scan
    from audit.zoo.learned import job_spec

    if mode != "rescan" or not (out / "job.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        # in this process (audit.runner.inprocess) unless --ray started the local Ray
        os.environ["AUDIT_IN_PROCESS"] = "0" if mode == "ray" else "1"
        run_job(job_spec(case, built, out), progress=False)
    classes, _ = scan(out, quiet=True)
    return classes


def start_ray() -> None:
    """One private local Ray for every job of the run (``--ray``)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})


def details(o, case, built, classes_df) -> list[str]:
    """The evidence of every miss and false flag of one case."""
    wrong = o.missed + o.false_flags
    if not wrong:
        return []
    lines = [f"\n{case.describe()}", f"  model: {built.line()}"]
    for r in classes_df.itertuples():
        if str(r.class_name) in wrong:
            what = "MISSED" if str(r.class_name) in o.missed else "FALSE FLAG"
            lines.append(f"  {what} {r.class_name}: {r.verdict}, cue {getattr(r, 'cue', '') or '-'}: {r.evidence}")
    return lines


def run_one(seed: int, out_root: Path, mode: str = "run", objects_too: bool = False):
    """``(status, outcome, detail lines)`` of one seed.

    ``status``: ``counted``, ``skipped`` (cannot be painted here, or no scan to rescore), ``unfit`` (the
    model does not fit its training images: not counted, not audited) or ``error`` (the audit failed); the outcome is
    None unless counted.
    """
    import pandas as pd

    from audit.zoo.learned import ensure
    from audit.zoo.space import draw_case

    case = draw_case(seed)
    why = case.paintable()
    if why:
        print(f"{case.name:>9}: skipped ({why})", flush=True)
        return "skipped", None, []
    t0 = time.time()
    out = out_root / case.name
    built = ensure(case)
    if not built.fitted:  # nothing to score: the audit is not run
        print(f"{case.name:>9}: not counted: the model fits {built.train_accuracy:.0%} of its training images",
              flush=True)
        return "unfit", None, []
    if mode == "rescore" and not (out / "summary" / "classes.parquet").is_file():
        print(f"{case.name:>9}: skipped (no scan under {out})", flush=True)
        return "skipped", None, []
    if mode == "rescore":
        classes = pd.read_parquet(out / "summary" / "classes.parquet")
    else:
        try:
            classes = audit_case(case, built, out, mode)
        except Exception as e:  # one broken case is reported, the others still run
            print(f"{case.name:>9}: ERROR {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
            return "error", None, []
    o = outcome(case, built, classes)
    if objects_too:
        from audit.zoo.learned import objects_learned

        o.also = outcome(case, built, classes, objects_learned(case, built))
    verdict = "right" if not o.missed and not o.false_flags else "WRONG"
    line = (f"{case.name:>9}: {verdict:5} planted {','.join(o.planted) or '-'} partial {','.join(o.partial) or '-'} "
            f"flagged {','.join(o.flagged) or '-'}  ({time.time() - t0:.0f} s)")
    print(line, flush=True)
    return "counted", o, details(o, case, built, classes)


def main(argv=None) -> int:
    from audit.zoo.tally import format_tally, tally

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default=SCORED, help="seeds to draw, e.g. 340-369 or 0-1,7")
    p.add_argument("--out", default=str(ROOT / "results" / "draws"), help="where the job outputs go")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rescore", action="store_true", help="run nothing: score the scans already under --out")
    how.add_argument("--rescan", action="store_true", help="keep the jobs' records under --out, scan them again "
                     "(after a change to the scan)")
    how.add_argument("--ray", action="store_true", help="run each job on a local Ray (as `audit run` does) "
                     "instead of in this process")
    p.add_argument("--objects-learned", action="store_true", help="also score counting as healthy only the "
                   f"classes whose cue-free held-out images the model gives them (>= {OBJECT_MIN:.0%})")
    a = p.parse_args(argv)
    try:
        seeds = seed_range(a.seeds)
    except ValueError:
        p.error(f"--seeds: expected e.g. 100-129 or 0-1,7, not {a.seeds!r}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    mode = "rescore" if a.rescore else "rescan" if a.rescan else "ray" if a.ray else "run"
    if a.ray:
        start_ray()
    t0 = time.time()
    outcomes, notes, counts = [], [], Counter()
    for s in seeds:
        status, o, lines = run_one(s, Path(a.out), mode, a.objects_learned)
        counts[status] += 1
        if o is not None:
            outcomes.append(o)
            notes.extend(lines)
    fresh = "fresh draws" if min(seeds) >= FRESH and not set(seeds) & set(DEVELOPMENT) else \
        "includes development seeds (0-99, 200-339: thresholds may be chosen on them)"
    others = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k != "counted")
    print(f"\nseeds {a.seeds} ({fresh}): {len(outcomes)} cases counted{'; ' + others if others else ''}\n")
    print(format_tally(tally(outcomes)))
    if a.objects_learned:
        t = tally([o.also for o in outcomes])
        print(f"\ncounting as healthy only the classes whose cue-free held-out images the model gives them "
              f"(>= {OBJECT_MIN:.0%}): recall {t.recall.text()}, precision {t.precision.text()}")
    print("\n".join(notes))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"outcomes-{a.seeds}.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    print(f"\n{len(outcomes)} cases in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
