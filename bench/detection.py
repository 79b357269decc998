"""Detection benchmark: does the scan find the planted shortcuts of the zoo, and only them?

    .venv/bin/python bench/detection.py                      # every case, with and without masks
    .venv/bin/python bench/detection.py --quick              # watermark, frame, clean
    .venv/bin/python bench/detection.py --new                # the 12 cases unlike the first 19
    .venv/bin/python bench/detection.py --cases texture,minority --masks no
    .venv/bin/python bench/detection.py --rescore            # score the outputs of the last run again
    .venv/bin/python bench/detection.py --seed 1 --masks no  # every case drawn and trained with seed 1

For every case of :data:`audit.zoo.cases.CASES`: build it (generate the
training split with object masks and train a small CNN; cached, a minute or
so per case on 2 cores, printing the held-out accuracy with and without the
cues, which shows the model learned them), write a job spec, audit the
training split with ``audit run`` (the CLI, embedded local Ray, one actor)
with masks and without, and score the scan (:mod:`audit.zoo.judge`). Prints a
Markdown table (case, masks, planted vs flagged classes, the cue named,
right/wrong) and the total, then the scan's evidence for every wrong run.
The outputs are kept under ``--out`` (``results/detection/<case>-<masks>``).

``--seed N`` rebuilds every case with ``Case.seed = N`` (new images, new
trained weights; the zoo cache key includes the seed, so seeds do not share
models) and by default writes under ``results/detection/seed<N>``: it shows
whether the verdicts hold beyond the seed the thresholds were tuned on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Run:
    """One audited run of a case."""

    case: str
    masks: bool
    planted: dict
    score: object | None  # audit.zoo.judge.Score, None when the run failed
    seconds: float
    error: str = ""
    learned: str = ""


def write_spec(path: Path, case, built, masks: bool, out: Path) -> Path:
    import yaml

    from audit.zoo.train import job_spec

    path.write_text(yaml.safe_dump(job_spec(case, built, masks, out), sort_keys=False))
    return path


def audit_run(spec: Path, log: Path) -> tuple[int, str]:
    """``audit run SPEC`` in a subprocess (this checkout first on the path); returns (rc, output tail)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "audit", "run", str(spec), "--no-progress"],
                             stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = log.read_text()
    return rc, text[-2000:]


def run_case(case, masks: bool, out_root: Path, log=print, rescore: bool = False) -> Run:
    import pandas as pd

    from audit.zoo.judge import score
    from audit.zoo.train import ensure

    built = ensure(case, log=log)
    tag = f"{case.name}-{'masks' if masks else 'nomasks'}"
    out = out_root / tag
    t0 = time.time()
    if rescore:
        rc, tail = 0, "not run (--rescore)"
    else:
        shutil.rmtree(out, ignore_errors=True)
        out_root.mkdir(parents=True, exist_ok=True)
        spec = write_spec(out_root / f"{tag}.yaml", case, built, masks, out)
        rc, tail = audit_run(spec, out_root / f"{tag}.log")
        if not (out / "summary" / "classes.parquet").is_file():  # e.g. Ray's start timed out on a loaded machine
            log(f"  {tag}: no scan ({' '.join(tail.split())[-120:]}); once more")
            shutil.rmtree(out, ignore_errors=True)
            rc, tail = audit_run(spec, out_root / f"{tag}.log")
    secs = time.time() - t0
    classes = out / "summary" / "classes.parquet"
    if not classes.is_file():
        err = " ".join(tail.split())[-300:]
        return Run(case.name, masks, case.planted, None, secs, f"rc {rc}: {err}", built.learned())
    return Run(case.name, masks, case.planted, score(case, pd.read_parquet(classes)), secs,
               "" if rc == 0 else f"rc {rc}", built.learned())


def _cues(run: Run) -> str:
    s = run.score
    parts = []
    for name in s.flagged:
        f = s.classes[name]
        box = "" if not f.cue_box else " [" + ",".join(f"{v:.2f}" for v in f.cue_box) + "]"
        parts.append(f"{name}: {f.cue or '-'}{box}")
    return "; ".join(parts) or "-"


def table(runs: list[Run]) -> str:
    lines = ["| case | masks | planted (expected cue) | flagged | cue named | result |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        planted = ", ".join(f"{c} ({p})" for c, p in r.planted.items()) or "none"
        if r.score is None:
            lines.append(f"| {r.case} | {'yes' if r.masks else 'no'} | {planted} | - | - | ERROR |")
            continue
        flagged = ", ".join(r.score.flagged) or "none"
        lines.append(f"| {r.case} | {'yes' if r.masks else 'no'} | {planted} | {flagged} | {_cues(r)} | "
                     f"{'right' if r.score.right else 'WRONG'} |")
    n_right = sum(r.score is not None and r.score.right for r in runs)
    lines.append("")
    lines.append(f"right: {n_right} of {len(runs)}")
    return "\n".join(lines)


def wrong_details(runs: list[Run]) -> str:
    out = []
    for r in runs:
        if r.score is not None and r.score.right:
            continue
        out.append(f"\n{r.case} ({'with' if r.masks else 'without'} masks): {r.learned}")
        if r.score is None:
            out.append(f"  failed: {r.error}")
            continue
        for name in r.score.wrong_classes():
            f = r.score.classes.get(name)
            if f is not None:
                out.append(f"  {name}: {f.verdict}, cue {f.cue or '-'}: {f.evidence}")
    return "\n".join(out)


def seeded(cases: dict, seed: int | None) -> dict:
    """The cases with ``seed`` in place of their own (unchanged when ``seed`` is None)."""
    return dict(cases) if seed is None else {n: replace(c, seed=seed) for n, c in cases.items()}


def default_out(seed: int | None) -> Path:
    """``results/detection``, or ``results/detection/seed<N>`` for a seeded sweep."""
    root = ROOT / "results" / "detection"
    return root if seed is None else root / f"seed{seed}"


def main(argv=None) -> int:
    from audit.zoo.cases import CASES, NEW, QUICK

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help=f"comma-separated case names (default all: {','.join(CASES)})")
    p.add_argument("--quick", action="store_true", help=f"only {','.join(QUICK)}")
    p.add_argument("--new", action="store_true", help=f"only the cases unlike the first ones: {','.join(NEW)}")
    p.add_argument("--masks", choices=("both", "yes", "no"), default="both")
    p.add_argument("--out", help="where the job outputs go (default results/detection, "
                   "results/detection/seed<N> with --seed)")
    p.add_argument("--seed", type=int, help="draw and train every case with this seed instead of its own "
                   "(Case.seed, 0 for the zoo)")
    p.add_argument("--rescore", action="store_true",
                   help="run nothing: score the outputs already under --out (e.g. after `audit scan` on them)")
    a = p.parse_args(argv)
    names = a.cases.split(",") if a.cases else list(QUICK if a.quick else NEW if a.new else CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if a.seed is not None and a.seed < 0:
        p.error(f"--seed must be 0 or more, not {a.seed}")
    cases = seeded(CASES, a.seed)
    out = Path(a.out) if a.out else default_out(a.seed)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    modes = {"both": (True, False), "yes": (True,), "no": (False,)}[a.masks]
    t0 = time.time()
    runs = []
    for n in names:
        for m in modes:
            r = run_case(cases[n], m, out, rescore=a.rescore)
            runs.append(r)
            verdict = "ERROR" if r.score is None else ("right" if r.score.right else "WRONG")
            print(f"{n:>14} masks={'yes' if m else 'no ':3} {verdict:5}  ({r.seconds:.0f} s)", flush=True)
    print()
    print(table(runs))
    print(wrong_details(runs))
    print(f"\n{len(runs)} runs in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
