"""``audit demo --fix``: the demo goes on after the audit and tries to fix the shortcut model.

1. The per-image pass on the shortcut model's audit (:func:`audit.scan.imagepass.run_pass`)
   and the export of its group labels (``fix/export/metadata.csv``).
2. DFR (:mod:`audit.scan.dfr`): the last layer re-fitted on a group-balanced
   set of the export's split 0 (label x cue group), penultimate features,
   logistic regression; saved as ``fix/dfr.keras``.
3. The same job with that model (``fixed/``), scanned, and
   :func:`audit.scan.compare.compare` of the two audits (``fix/compare.parquet``,
   ``fix/compare.html``).
4. What happened, whatever it is: ``no_tank``'s verdict before and after, and
   the worst-group accuracy before and after over the same groups (the
   export's label x place), on all audited photos and on the held-out split 2
   that DFR never saw.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import audit
from audit.data.datasets import load_images
from audit.data.jobspec import load_job_model, read_job_record
from audit.data.resources import path
from audit.demo import _clear
from audit.review.compare import write
from audit.runner.job import run_job
from audit.scan import pipeline
from audit.scan.compare import compare
from audit.scan.cost import wilson
from audit.scan.dfr import retrain
from audit.scan.export import export
from audit.scan.imagepass import run_pass


@dataclass
class Worst:
    """Worst-group accuracy over fixed groups: the rate, its 95% Wilson interval, its count and group."""

    acc: float
    low: float
    high: float
    n: int
    group: str


def worst_group(y, place, correct, names=None) -> Worst:
    """The lowest accuracy over the groups ``(y, place)`` (groups of at least one image)."""
    y, place, correct = np.asarray(y), np.asarray(place), np.asarray(correct, bool)
    best = Worst(math.nan, math.nan, math.nan, 0, "")
    for a in np.unique(y):
        for p in np.unique(place):
            g = (y == a) & (place == p)
            if not g.any():
                continue
            acc, lo, hi = wilson(int(correct[g].sum()), int(g.sum()))
            if best.n == 0 or acc < best.acc:
                best = Worst(acc, lo, hi, int(g.sum()), f"{(names or {}).get(int(a), a)}, cue group {int(p)}")
    return best


def _correct(out) -> dict:
    """{image_id: correct} from a job's records (one view)."""
    df = audit.load(out, columns=["image_id", "correct", "status"])
    df = df[df["status"] != "error"].drop_duplicates("image_id")
    return dict(zip(df["image_id"], df["correct"].fillna(False).astype(bool)))


def fit_dfr(short_out: str, meta, fix_dir: Path, log=print):
    """Re-train the shortcut model's last layer on split 0 of the export, group-balanced; the new model's path."""
    record = read_job_record(short_out)
    spec = record.spec
    train = meta[(meta["split"] == 0) & (meta["y"] >= 0)]
    size = record.size or (64, 64)
    images, _, _ = load_images(spec, train["img_filename"].tolist(), size)
    model = load_job_model(spec.model)
    res = retrain(model, images, train["y"].to_numpy(), train["place"].to_numpy(),
                  preprocess=spec.model.preprocess)
    path = fix_dir / "dfr.keras"
    res.model.save(path)
    log(f"DFR: last layer re-fitted on {sum(res.groups.values())} photos of split 0, "
        f"{min(res.groups.values())} per group (label x cue group: {res.groups}); training accuracy "
        f"{100 * res.train_accuracy:.0f}%")
    return str(path)


def run_fix(results: dict, out: Path, *, intervene: bool, progress: bool, log=print) -> dict:
    """Steps 1-4 above after :func:`audit.demo.run_demo`'s audits; returns what happened."""
    import pandas as pd

    t0 = time.time()
    short = results["models"]["shortcut"]["out"]
    out = Path(out)
    fix_dir, fixed = out / "fix", out / "fixed"
    fix_dir.mkdir(parents=True, exist_ok=True)
    run_pass(short, quiet=True, local=True)
    export(short, fix_dir / "export", ("groups",), force=True, quiet=True)
    meta = pd.read_csv(fix_dir / "export" / "metadata.csv")
    model = fit_dfr(short, meta, fix_dir, log)

    _clear(fixed)
    run_job(str(path("audit.jobs", "tank_sky.yaml")),
            overrides=[f"model.path={model}", *results["dataset_overrides"], f"output={fixed}"],
            progress=progress)
    classes, _ = pipeline.scan(fixed, intervene=intervene, quiet=True)
    c = compare(short, str(fixed))
    write(c, fix_dir)
    before, after = _correct(short), _correct(str(fixed))
    ids = meta["img_filename"].tolist()
    names = dict(enumerate(results.get("classes") or ["no_tank", "tank"]))
    held = meta["split"].to_numpy() == 2
    y, place = meta["y"].to_numpy(), meta["place"].to_numpy()
    cb = np.array([before.get(i, False) for i in ids])
    ca = np.array([after.get(i, False) for i in ids])
    fix = {"compare": c, "classes": classes, "out": str(fixed), "fix_dir": str(fix_dir),
           "worst_before": worst_group(y, place, cb, names), "worst_after": worst_group(y, place, ca, names),
           "held_before": worst_group(y[held], place[held], cb[held], names),
           "held_after": worst_group(y[held], place[held], ca[held], names),
           "accuracy_before": float(cb.mean()), "accuracy_after": float(ca.mean()),
           "seconds": round(time.time() - t0, 1)}
    log(format_fix(fix))
    return fix


def _w(w: Worst) -> str:
    if not w.n:
        return "-"
    return f"{100 * w.acc:.0f}% ({w.group}, n={w.n}, 95% {100 * w.low:.0f}-{100 * w.high:.0f}%)"


def format_fix(fix: dict) -> str:
    """The closing words of the fix: the verdict of no_tank and the worst group, before and after."""
    c = fix["compare"].classes.set_index("class_name")
    lines = ["", "the fix: DFR (last layer re-trained on group-balanced photos from the export), re-audited"]
    for name in c.index:
        r = c.loc[name]
        lines.append(f"  {name}: {r['verdict_a']} -> {r['verdict_b']} ({r['change']})"
                     + (f"; cue {r['cue_a'] or '-'} -> {r['cue_b'] or '-'}" if (r['cue_a'] or r['cue_b']) else ""))
    lines.append(f"  accuracy {100 * fix['accuracy_before']:.0f}% -> {100 * fix['accuracy_after']:.0f}% "
                 "(all audited photos; DFR saw 60% of them, split 0)")
    lines.append(f"  worst-group accuracy, all photos: {_w(fix['worst_before'])} -> {_w(fix['worst_after'])}")
    lines.append(f"  worst-group accuracy, held-out split 2: {_w(fix['held_before'])} -> {_w(fix['held_after'])}")
    lines.append(f"  comparison: {fix['fix_dir']}/compare.html and compare.parquet ({fix['seconds']:.0f} s)")
    return "\n".join(lines)
