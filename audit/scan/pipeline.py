"""The class scan: which classes did the model learn by a shortcut, and where is the cue?

:func:`scan` runs these steps on a job's output (each a function below):

1. :func:`audit.scan.read.read_view`: one view of the records (one target
   layer and one CAM method; by default the job's automatic layer and
   Grad-CAM++);
2. :func:`group_classes`: the records of each class;
3. :func:`load_class_grids`: all of the class's heatmaps on a small grid
   (:mod:`audit.scan.grids`, streamed from the records in batches);
4. :func:`judge_class`, for every class: its features
   (:mod:`audit.scan.features`), its verdict (:mod:`audit.scan.verdict`),
   confirmed by intervention (:mod:`audit.scan.intervene`); then
   :func:`judge_clusters`: SpRAy clusters of its maps
   (:mod:`audit.scan.cluster`), each judged the same way, so that a strategy
   used by a minority of the class shows up;
5. :func:`audit.scan.table.summary_tables` and
   :func:`audit.scan.table.write_tables`: ``OUT/summary/classes.parquet`` and
   ``OUT/summary/clusters.parquet``, and the printed table, suspects first.

Rows are grouped by ``target``, the class whose score was explained: with
the default ``explain.target: predicted`` a class row describes how the model
decides *for* that class (the images it predicts as that class), which is
what a shortcut audit asks.  ``accuracy`` is the share of correct predictions
in that group (the precision of the class, with ``target: predicted``);
``n_label`` and ``recall`` describe the images *labelled* with the class.
docs/scan.md explains every rule and threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from audit.errors import AuditError
from audit.scan.cluster import ClusterParams, cluster_maps, map_features, min_cluster_size
from audit.scan.config import DEFAULT, Config
from audit.scan.features import GroupFeatures, gap_scores, group_features, spurious_gap
from audit.scan.grids import read_class_maps
from audit.scan.intervene import FlipResult, cue_mask
from audit.scan.read import ScanView, read_view, sample_ids
from audit.scan.table import ClassResult, ClusterResult, format_table, summary_tables, write_tables
from audit.scan.values import pct
from audit.scan.verdict import Verdict, assess

__all__ = ["DEFAULT", "Config", "scan"]


@dataclass
class ClassGroup:
    """The records of one class and its maps on the grid."""

    class_id: int
    name: str
    rows: object  # DataFrame
    ids: np.ndarray  # ok image ids with a grid
    grids: np.ndarray | None = None  # (len(ids), g, g) float16
    row_grid: np.ndarray | None = None  # (len(rows),): each row's index in grids, -1 without one


def group_classes(view: ScanView) -> list[ClassGroup]:
    """One group per class: every explained target, and every class the job names."""
    df = view.df
    where = df.groupby("target").indices if len(df) else {}
    targets = sorted({int(t) for t in where} | set(view.names))
    empty = np.zeros(0, np.int64)
    return [ClassGroup(t, view.names.get(t, str(t)), df.iloc[where.get(t, empty)], np.zeros(0, object))
            for t in targets]


def load_class_grids(view: ScanView, groups: list[ClassGroup], cfg: Config) -> None:
    """Fill each group's ``ids``/``grids`` with all of its ok maps (streamed, no Python object per map)."""
    maps = read_class_maps(view.dataset, view.filter, cfg.grid)
    for g in groups:
        cm = maps.pop(g.class_id, None)
        if cm is not None and len(cm.image_ids):
            g.ids, g.grids = cm.image_ids, cm.grids
        g.row_grid = _positions(g.ids, g.rows["image_id"].to_numpy())


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of each of ``wanted`` in ``ids`` (the first, if repeated), -1 where absent."""
    import pandas as pd

    pos = pd.Series(np.arange(len(ids)), index=pd.Index(ids, dtype=object))
    pos = pos[~pos.index.duplicated()]
    return pos.reindex(pd.Index(wanted, dtype=object)).fillna(-1).to_numpy(dtype=np.int64)


def cluster_params(cfg: Config, n: int) -> ClusterParams:
    """The clustering's parameters for a class of ``n`` maps (the minimum size is absolute and relative)."""
    return ClusterParams(max_k=cfg.max_k, min_eigengap=cfg.min_eigengap,
                         min_size=min_cluster_size(n, cfg.min_cluster, cfg.min_cluster_share),
                         merge_radius=cfg.merge_radius, max_prototypes=cfg.max_prototypes)


def crc_order(ids) -> np.ndarray:
    """A fixed pseudo-random order of image ids (by CRC32), so no part of the records is favoured."""
    import zlib

    return np.argsort(np.fromiter((zlib.crc32(str(i).encode()) for i in ids), np.int64, len(ids)),
                      kind="stable")


def make_intervener(view: ScanView, cfg: Config, quiet: bool):
    """The job's model and data for interventions, or None when the job does not name them."""
    spec = view.spec
    if not ((spec.get("model") or {}) and spec.get("dataset")):
        return None
    from audit.scan.intervene import Intervener, SafeIntervener

    return SafeIntervener(Intervener(view.out, fill=cfg.fill), quiet)


def intervene_group(intervener, rows, f: GroupFeatures, res: Verdict, cfg: Config,
                    use_masks: bool) -> FlipResult | None:
    """Flip rates for a deterministic sample of a suspect group (None when not possible)."""
    if intervener is None:
        return None
    ok = rows[rows["status"] == "ok"]
    ids = sorted(sample_ids(ok["image_id"].tolist(), cfg.sample))
    if not ids:
        return None
    try:
        size = intervener.size
    except AuditError:
        return intervener(ids, None)  # reports the reason once
    cue = cue_mask(res.cue_kind, res.cue_box, f.mean_map, size)
    if cue is None:
        return None
    return intervener(ids, cue, use_masks=use_masks)


def judge_group(rows, grids, view: ScanView, cfg: Config, intervener, use_masks: bool):
    """Features and verdict of one group; a suspect is tested by intervention."""
    f = group_features(rows, grids, view.regions, cfg, view.size)
    res = assess(f, cfg)
    if res.suspected and intervener is not None:
        res = assess(f, cfg, intervene_group(intervener, rows, f, res, cfg, use_masks))
    return f, res


def judge_clusters(g: ClassGroup, own: Verdict, view: ScanView, cfg: Config, intervener,
                   use_masks: bool) -> list[ClusterResult]:
    """SpRAy clusters of all of a class's maps, each judged like a class.

    A cluster needs ``max(min_cluster, min_cluster_share x maps of the
    class)`` maps for a verdict, else it is ``insufficient_data``.
    """
    if g.grids is None or len(g.grids) < cfg.min_images:
        return []
    params = cluster_params(cfg, len(g.grids))
    c_all = cluster_maps(map_features(g.grids), params, order=crc_order(g.ids))
    labels, k = c_all.labels, c_all.k
    ccfg = replace(cfg, min_images=params.min_size)
    out = []
    row_label = np.where(g.row_grid >= 0, labels[np.maximum(g.row_grid, 0)], -1)
    for c in range(k):
        members = g.ids[labels == c].tolist()
        sub = g.rows[row_label == c]
        if k == 1:  # the class itself
            cf, cres = group_features(sub, g.grids, view.regions, ccfg, view.size), own
        else:
            cf, cres = judge_group(sub, g.grids[labels == c], view, ccfg, intervener, use_masks)
        out.append(ClusterResult(c, members, cf, cres))
    return out


def class_verdict(own: Verdict, clusters: list[ClusterResult], n_maps: int) -> Verdict:
    """A suspect cluster makes the class suspect (when it is more suspicious than the class itself)."""
    if len(clusters) <= 1:
        return own
    worst = max((c for c in clusters if c.verdict.suspected), key=lambda c: c.verdict.suspicion, default=None)
    if worst is None or (own.suspected and worst.verdict.suspicion <= own.suspicion):
        return own
    share = len(worst.members) / max(1, n_maps)
    ev = worst.verdict.evidence
    return replace(worst.verdict, evidence=f"A cluster of {len(worst.members)} heatmaps ({pct(share)} of the "
                                           f"class): " + ev[0].lower() + ev[1:])


def judge_class(g: ClassGroup, view: ScanView, cfg: Config, intervener, use_masks: bool) -> ClassResult:
    """Features, verdict, spurious gap and clusters of one class."""
    rows = g.rows
    f, own = judge_group(rows, g.grids, view, cfg, intervener, use_masks)
    grid_index = g.row_grid
    correct = rows["correct"].to_numpy(dtype=float, na_value=np.nan) if "correct" in rows \
        else np.full(len(rows), np.nan)
    gap = spurious_gap(gap_scores(rows, f, own.masked, own.cue_kind, own.cue, g.grids, grid_index), correct)
    clusters = judge_clusters(g, own, view, cfg, intervener, use_masks)
    df = view.df
    labelled = df[df["label"] == g.class_id] if "label" in df else df.iloc[0:0]
    return ClassResult(class_id=g.class_id, name=g.name, rows=rows, labelled=labelled, features=f, own=own,
                       final=class_verdict(own, clusters, len(g.ids)), n_maps=len(g.ids), gap=gap,
                       clusters=clusters)


def scan(out_dir, *, intervene: bool = True, quiet: bool = False, layer: str | None = None,
         method: str | None = None, use_masks: bool = True, cfg: Config = DEFAULT):
    """Scan a job's records; write and return ``(classes_df, clusters_df)``.

    Args:
        out_dir: the job output (``OUT``).
        intervene: confirm suspects by occlusion (loads the model and the
            sample images; needs ``OUT/job.json`` naming them).
        quiet: write the tables, print nothing.
        layer, method: the view the verdict uses (default: the automatic
            layer and Grad-CAM++, see :func:`audit.scan.read.choose_view`).
        use_masks: False ignores object masks (the statistics then come from
            the heatmaps alone).
        cfg: the thresholds (:class:`audit.scan.config.Config`).

    Returns:
        ``(classes_df, clusters_df)``, pandas DataFrames with the columns of
        ``schemas/classes.schema.json`` and ``schemas/clusters.schema.json``.

    Raises:
        AuditError: no such output, no records, or no such layer/method.
    """
    view = read_view(out_dir, layer, method, use_masks)
    groups = group_classes(view)
    load_class_grids(view, groups, cfg)
    intervener = make_intervener(view, cfg, quiet) if intervene else None
    results = [judge_class(g, view, cfg, intervener, use_masks) for g in groups]
    classes_df, clusters_df = summary_tables(results, view.layer, view.method, cfg.grid, view.regions)
    write_tables(view.out, {"classes": classes_df, "clusters": clusters_df}, view.regions)
    if not quiet:
        print(format_table(classes_df, clusters_df, layer=view.layer, method=view.method, out=view.out,
                           errors=view.errors))
    return classes_df, clusters_df
