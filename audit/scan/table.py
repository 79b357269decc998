"""The scan's output: class and cluster rows, the Parquet tables, and the printed table."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.data import fs, io
from audit.data.schema import SCHEMA_VERSION, arrow_schema
from audit.errors import cannot_write
from audit.scan.features import GroupFeatures
from audit.scan.values import finite, or_none, pct
from audit.scan.verdict import Verdict, others_rate

VERDICT_ORDER = {"shortcut_suspected": 0, "ok": 1, "insufficient_data": 2}


@dataclass
class ClusterResult:
    """One heatmap cluster of a class and its verdict."""

    cluster: int
    members: list  # image ids
    features: GroupFeatures
    verdict: Verdict | None  # None until judged
    rows: object = None  # DataFrame: the cluster's records
    cfg: object = None  # the Config it is judged with (its minimum size)


@dataclass
class ClassResult:
    """One class: its features, its own verdict, the final one (a suspect cluster wins) and its clusters."""

    class_id: int
    name: str
    rows: object  # DataFrame: the class's records
    labelled: object  # DataFrame: the records labelled with the class
    features: GroupFeatures
    own: Verdict  # from the class's own statistics
    final: Verdict  # what the class row reports
    n_maps: int  # maps on the grid (clustered)
    gap: float = math.nan
    clusters: list = field(default_factory=list)  # [ClusterResult]
    map_ids: np.ndarray | None = None  # ids of the class's ok maps on the grid ...
    grids: np.ndarray | None = None  # ... and the maps (n, g, g), for the causal tests without masks


def _flip_fields(v: Verdict) -> dict:
    c = v.causal
    cue = v.cue_flip
    # the object column needs masks; without them the own-hot-area removal is in interventions.parquet only
    obj = c.object() if c is not None and c.masked else None
    bgs = [t for t in c.tests if t.spec.replaces_background and finite(t.flip_rate)] if c is not None else []
    bg = min(bgs, key=lambda t: t.flip_rate) if bgs else None
    return {"flip_rate_cue": or_none(cue.flip_rate if cue is not None else math.nan),
            "flip_rate_object": or_none(obj.flip_rate if obj is not None else math.nan),
            "flip_rate_background": or_none(v.background_rate()),
            **_bounds("flip_rate_cue", cue), **_bounds("flip_rate_object", obj), **_bounds("flip_rate_background", bg),
            "n_cue": int(cue.n) if cue is not None else 0,
            "cue_region": v.cue_region, "n_intervened": int(c.n) if c is not None else 0}


def _bounds(name: str, t) -> dict:
    """``{name_low, name_high}``: the 95% Wilson interval of a test's rate (None when unknown)."""
    lo, hi = (t.low, t.high) if t is not None else (math.nan, math.nan)
    return {f"{name}_low": or_none(lo), f"{name}_high": or_none(hi)}


def _stat_means(f: GroupFeatures) -> dict:
    return {k: (np.float32(v) if finite(v) else None) for k, v in f.means.items()}


def _mean_map_fields(f: GroupFeatures, grid: int, always: bool = False) -> dict:
    has = f.mean_map is not None
    return {"mean_map": f.mean_map.ravel().tolist() if has else None,
            "map_h": grid if has or always else None, "map_w": grid if has or always else None}


def _peak_fields(f: GroupFeatures) -> dict:
    pp = f.peak_place
    return {"peak_mode_x": or_none(pp.x), "peak_mode_y": or_none(pp.y), "peak_share": or_none(pp.share)}


def class_row(r: ClassResult, layer: str, method: str, grid: int) -> dict:
    """One row of ``summary/classes.parquet``."""
    f, final, lab = r.features, r.final, r.labelled
    labc = lab.loc[lab["status"] != "error", "correct"].dropna() if len(lab) else lab
    return {
        "class_id": r.class_id, "class_name": r.name, "n": f.n_total, "n_ok": f.n, "n_flat": f.n_flat,
        "n_masked": f.n_masked, "accuracy": or_none(f.accuracy),
        "n_label": len(lab), "recall": float(labc.astype(float).mean()) if len(labc) else None,
        "spurious_gap": or_none(r.gap), "suspicion": or_none(final.suspicion),
        "attention_suspicion": or_none(r.own.attention_suspicion),
        "verdict": final.verdict, "evidence": final.evidence, "cue": final.cue, "cue_box": final.cue_box,
        "default_of": ", ".join(final.default_of) or None,
        **_flip_fields(final),
        "n_clusters": len(r.clusters), "n_suspect_clusters": sum(c.verdict.suspected for c in r.clusters),
        **_peak_fields(f), "layer": layer, "method": method,
        **_mean_map_fields(f, grid), **_stat_means(f),
    }


def cluster_row(r: ClassResult, c: ClusterResult, layer: str, method: str, grid: int) -> dict:
    """One row of ``summary/clusters.parquet``."""
    cf, cv = c.features, c.verdict
    return {
        "class_id": r.class_id, "class_name": r.name, "cluster": c.cluster, "n": cf.n,
        "share": cf.n / max(1, r.n_maps), "accuracy": or_none(cf.accuracy),
        "suspicion": or_none(cv.suspicion), "verdict": cv.verdict, "evidence": cv.evidence, "cue": cv.cue,
        "cue_box": cv.cue_box, **_flip_fields(cv),
        **_peak_fields(cf), "layer": layer, "method": method,
        **_mean_map_fields(cf, grid, always=True),
        "example_ids": sorted(c.members, key=lambda s: zlib.crc32(str(s).encode()))[:12],
        **_stat_means(cf),
    }


def to_frame(rows: list, name: str, regions):
    """Rows -> a DataFrame with the columns of ``schemas/<name>.schema.json`` in order."""
    import pandas as pd

    schema = arrow_schema(name, {f"energy_{r}": "float32" for r in regions})
    if not rows:
        return schema.empty_table().to_pandas()
    df = pd.DataFrame(rows)
    return df.reindex(columns=[f.name for f in schema])  # columns filled later (the cost) start null


def summary_tables(results: list, layer: str, method: str, grid: int, regions) -> tuple:
    """(classes_df, clusters_df), classes suspects first."""
    class_rows = [class_row(r, layer, method, grid) for r in results]
    cluster_rows = [cluster_row(r, c, layer, method, grid) for r in results for c in r.clusters]
    classes_df = to_frame(class_rows, "classes", regions)
    clusters_df = to_frame(cluster_rows, "clusters", regions)
    classes_df = classes_df.sort_values(
        ["verdict", "suspicion"],
        key=lambda s: s.map(VERDICT_ORDER) if s.name == "verdict" else -s.fillna(-1),
        kind="stable").reset_index(drop=True)
    return classes_df, clusters_df


def write_tables(out: Path, frames: dict, regions) -> None:
    """Write ``{name: DataFrame}`` to ``OUT/summary/<name>.parquet`` with the declared schemas."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    remote = fs.is_uri(str(out))
    d = fs.join(str(out), "summary") if remote else Path(out) / "summary"
    for name, frame in frames.items():
        extra = {f"energy_{r}": "float32" for r in regions} if name in ("classes", "clusters") else {}
        schema = arrow_schema(name, extra).with_metadata({"schema_version": SCHEMA_VERSION, "table": name})
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        try:
            if not remote:
                d.mkdir(parents=True, exist_ok=True)
            io.atomic_write_bytes(fs.join(d, f"{name}.parquet") if remote else d / f"{name}.parquet", data)
        except OSError as e:  # a read-only or full OUT: one line (with the free space), not a traceback
            raise cannot_write(d / f"{name}.parquet", e, "the scan writes OUT/summary/: scan a writable "
                               "copy of OUT", need=len(data)) from None


def interventions_table(results: list, causal):
    """Every causal test as a row of ``summary/interventions.parquet``."""
    import pandas as pd

    names = {r.class_id: r.name for r in results}
    rows = []
    for (class_id, cluster), res in sorted(causal.results.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
        others = causal.others(class_id)
        for t in res.tests:
            rows.append({"class_id": class_id, "class_name": names.get(class_id, str(class_id)),
                         "cluster": cluster, "test": t.test, "place": t.place,
                         "box": None if t.box is None else [float(v) for v in t.box], "fill": t.fill,
                         "n": t.n, "flip_rate": or_none(t.flip_rate), "n_flipped": int(t.k),
                         "flip_rate_low": or_none(t.low), "flip_rate_high": or_none(t.high),
                         "flip_rate_others": or_none(others_rate(t, others)) if t.spec.is_place or t.spec.is_transform else None,
                         "area": or_none(t.area), "transplant_rate": or_none(t.transplant),
                         "transplant_n": t.transplant_n})
    schema = arrow_schema("interventions")
    if not rows:
        return schema.empty_table().to_pandas()
    df = pd.DataFrame(rows)
    df["cluster"] = df["cluster"].astype("Int32")
    return df[[f.name for f in schema]]


def _fmt(v, spec=".2f"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _cluster_lines(clusters_df, class_id) -> list[str]:
    cl = clusters_df[clusters_df["class_id"] == class_id] if len(clusters_df) else clusters_df
    if len(cl) <= 1:
        return []
    return [f"    {'!' if c.verdict == 'shortcut_suspected' else ' '} cluster {c.cluster}: {c.n} maps "
            f"({pct(c.share)}), {c.verdict}" + (f", cue {c.cue}" if c.cue else "") for c in cl.itertuples()]


def format_table(classes_df, clusters_df, *, layer="", method="", out="", errors=0, width=None,
                 causal=None, incomplete: str | None = None, model_warning: str | None = None) -> str:
    """The compact suspects-first table printed by ``audit scan``.

    ``incomplete``: why OUT holds only part of its job; ``model_warning``: a
    model that predicts one class for everything (both printed as WARNING lines).
    """
    import shutil
    import textwrap

    width = width or min(120, shutil.get_terminal_size((100, 20)).columns)
    lines = [f"scan of {out}: layer {layer}, {method}; {len(classes_df)} classes"
             + (f", {errors} unreadable images" if errors else "")]
    lines[:0] = [f"WARNING: {w}" for w in (incomplete, model_warning) if w]
    hdr = (f"{'verdict':<19} {'class':<16} {'n':>6} {'acc':>5} {'susp':>5}  {'cue':<20} "
           f"{'flip cue/obj/bg':>15}")
    lines += [hdr, "-" * len(hdr)]
    shown = classes_df if len(classes_df) <= 40 else classes_df[classes_df["verdict"] == "shortcut_suspected"]
    for r in shown.itertuples():
        flips = f"{_fmt(r.flip_rate_cue)}/{_fmt(r.flip_rate_object)}/{_fmt(r.flip_rate_background)}"
        lines.append(f"{r.verdict:<19} {str(r.class_name)[:16]:<16} {r.n:>6} {_fmt(r.accuracy):>5} "
                     f"{_fmt(r.suspicion):>5}  {str(r.cue or '-')[:20]:<20} {flips:>15}")
        if r.verdict == "shortcut_suspected" or len(classes_df) <= 10:
            lines += textwrap.wrap(r.evidence, width, initial_indent="    ", subsequent_indent="    ")
        lines += _cluster_lines(clusters_df, r.class_id)
    if len(shown) < len(classes_df):
        lines.append(f"... and {len(classes_df) - len(shown)} classes not suspected (see summary/classes.parquet)")
    if causal is not None and causal.results:
        lines.append(f"causal tests: {len(causal.results)} samples, {causal.forwards} extra forward passes"
                     + (f"; {causal.extended} grown to decide a rate near its threshold" if causal.extended else "")
                     + (f"; {causal.skipped} samples left out by the cost budget (--causal-budget)"
                        if causal.skipped else ""))

    n_s = int((classes_df["verdict"] == "shortcut_suspected").sum())
    where = fs.join(str(out), "summary") if fs.is_uri(str(out)) else Path(out) / "summary"  # s3:// kept whole
    partial = f" ({incomplete.split(' (', 1)[0]})" if incomplete else ""  # "incomplete output: 6 of 16 shards committed"
    lines.append(f"{n_s} of {len(classes_df)} classes suspected of a shortcut{partial}; "
                 f"tables in {where}/classes.parquet, clusters.parquet and interventions.parquet")
    return "\n".join(lines)
