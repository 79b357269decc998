"""``audit demo``: the tank/sky story, end to end, on this machine (small jobs: no Ray is started).

1. Get the tank/sky data and its two models from the user cache (built once
   by :mod:`audit.tanksky`: a shortcut model trained where every tank photo
   has a cloudy sky, and a control model trained on de-biased photos).
2. Run the job specs ``jobs/tank_sky.yaml`` and ``jobs/tank_sky_control.yaml``
   (shipped in the package) with the paths filled in, on one embedded Ray.
3. Scan both outputs (with confirmation by intervention), write the reports
   when :mod:`audit.review.report` is installed, and print the verdicts.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from audit import tanksky
from audit.data.resources import path
from audit.errors import AuditError
from audit.runner.job import run_job
from audit.scan import pipeline

MODELS = (
    ("shortcut", "tank_sky.yaml", "shortcut_model",
     "trained on photos where every tank has a cloudy sky and every empty landscape a blue one"),
    ("control", "tank_sky_control.yaml", "control_model",
     "the same network trained on photos whose sky does not depend on the tank"),
)


def _clear(out: Path) -> None:
    """Remove a previous demo output (and only that) so the job can start afresh."""
    if not out.exists():
        return
    job = out / "job.json"
    try:
        name = json.loads(job.read_text()).get("name", "") if job.is_file() else ""
    except ValueError:
        name = ""
    if not str(name).startswith("tank-sky") and any(out.iterdir()):
        raise AuditError(f"{out} exists and is not a previous demo output; choose another --out")
    shutil.rmtree(out)


def default_out() -> Path:
    """Where the demo writes by default: ``demo/`` in the user cache (never the working tree)."""
    return tanksky.cache_dir() / "demo"


def run_demo(out=None, *, masks: bool = True, intervene: bool = True, report: bool = True,
             cache=None, params=None, progress: bool = True, log=print, fix: bool = False) -> dict:
    """Run the demo into ``out`` (``out/shortcut`` and ``out/control``); returns the results.

    ``out`` None: :func:`default_out` (``~/.cache/shortcut-audit/demo``).

    ``masks=False`` audits without the tank masks (the scan then judges from
    the heatmaps alone).  ``cache``: where the data and models are kept
    (default: :func:`audit.tanksky.cache_dir`); ``params``: a
    :class:`audit.tanksky.Params` (dataset size, training), default the demo's.
    ``fix``: go on with :func:`audit.demofix.run_fix` (DFR, re-audit, compare; ``results["fix"]``).
    """
    t0 = time.time()
    out = Path(out) if out is not None else default_out()
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise AuditError(f"--out: {p} exists and is not a directory")
            break
    built = tanksky.ensure(params or tanksky.Params(), root=cache, log=log)
    results = {"out": str(out), "models": {}}
    # no Ray of its own: each job of 200 images runs in this process (audit.runner.inprocess)
    for key, spec_name, model_key, story in MODELS:
        dest = out / key
        _clear(dest)
        data = [f"dataset.path={built['test']}", f"dataset.masks={built['test_masks'] if masks else 'null'}"]
        results["dataset_overrides"] = data
        overrides = [f"model.path={built[model_key]}", *data, f"output={dest}"]
        summary = run_job(str(path("audit.jobs", spec_name)), overrides=overrides, progress=progress)
        classes, clusters = pipeline.scan(dest, intervene=intervene, quiet=True)
        page = None
        if report:
            try:
                from audit.review.report import write_report  # optional: the demo goes on without a report
            except ImportError:
                write_report = None
            if write_report is not None:
                page = str(write_report(dest))
        results["models"][key] = {"story": story, "summary": summary, "classes": classes,
                                  "clusters": clusters, "report": page, "out": str(dest)}
    if fix:  # after the verdicts
        results["seconds"] = round(time.time() - t0, 1)
        log(format_verdict(results))
        from audit.demofix import run_fix  # a cycle: demofix imports this module

        results["fix"] = run_fix(results, out, intervene=intervene, progress=progress, log=log)
    if not fix:
        results["seconds"] = round(time.time() - t0, 1)
        log(format_verdict(results))
    return results


def flagged(classes) -> bool:
    return bool((classes["verdict"] == "shortcut_suspected").any())


def format_verdict(results: dict) -> str:
    """The demo's closing words: per model, flagged or not, and the evidence."""
    import textwrap

    lines = ["", "tank/sky demo: did the tank detector learn the tank, or the weather?"]
    for key, r in results["models"].items():
        c = r["classes"]
        acc = r["summary"].get("accuracy")
        head = "SHORTCUT SUSPECTED" if flagged(c) else "no shortcut found"
        lines.append(f"\n{key} model ({r['story']})")
        lines.append(f"  accuracy on photos where sky and tank are independent: "
                     f"{'-' if acc is None else f'{100 * acc:.0f}%'}; verdict: {head}")
        for row in c.itertuples():
            cue = f", cue {row.cue}" if row.verdict == "shortcut_suspected" and row.cue else ""
            lines.append(f"  {row.class_name}: {row.verdict}{cue}")
            lines += textwrap.wrap(row.evidence, 100, initial_indent="    ", subsequent_indent="    ")
        lines.append(f"  output: {r['out']}" + (f"   report: {r['report']}" if r.get("report") else ""))
    lines.append(f"\ndone in {results['seconds']:.0f} s; rescan with `audit scan {results['out']}/shortcut`")
    return "\n".join(lines)
