"""The class scan: which classes did the model learn by a shortcut, and where is the cue?

:func:`scan` runs these steps on a job's output (each a function below):

1. :func:`audit.scan.read.read_view`: one view of the records (one target
   layer and one CAM method; by default the job's automatic layer and
   Grad-CAM++);
2. :func:`group_classes`: the records of each class;
3. :func:`load_class_grids`: all of the class's heatmaps on a small grid
   (:mod:`audit.scan.grids`, streamed from the records in batches);
4. :func:`describe_class`, for every class: its features
   (:mod:`audit.scan.features`) and attention (:mod:`audit.scan.verdict`),
   and :func:`describe_clusters`: SpRAy clusters of its maps
   (:mod:`audit.scan.cluster`), each described the same way, so that a
   strategy used by a minority of the class shows up;
5. :func:`audit.scan.causal.run_tests`: the causal tests of every class and
   of the clusters whose attention is suspect (:mod:`audit.scan.probes`:
   remove the object, replace the background, occlude each place of a bank);
6. :func:`judge`: the verdicts, from attention and causal evidence together
   (:func:`audit.scan.verdict.assess`); a suspect cluster makes its class
   suspect (:func:`class_verdict`);
7. :func:`audit.scan.table.summary_tables` and
   :func:`audit.scan.table.write_tables`: ``OUT/summary/classes.parquet``,
   ``clusters.parquet`` and ``interventions.parquet``, and the printed table,
   suspects first.

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

from audit.data.io import completeness
from audit.data.predictions import one_class_warning
from audit.scan import provenance
from audit.scan.causal import CausalTests, run_tests
from audit.scan.cluster import ClusterParams, cluster_maps, map_features, min_cluster_size
from audit.scan.config import DEFAULT, Config
from audit.scan.cost import class_names, cost_lines, stored_costs, with_costs
from audit.scan.features import gap_scores, group_features, spurious_gap
from audit.scan.grids import read_class_maps
from audit.scan.intervene import Intervener, SafeIntervener
from audit.scan.read import ScanView, read_view
from audit.scan.table import (
    ClassResult,
    ClusterResult,
    format_table,
    interventions_table,
    summary_tables,
    write_tables,
)
from audit.scan.values import pct
from audit.scan.verdict import Verdict, as_default, assess, default_class

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
    if spec is None or not (spec.model.path or spec.model.application) or not spec.dataset.path:
        return None

    return SafeIntervener(Intervener(view.out, fill=cfg.fill), quiet)


def describe_class(g: ClassGroup, view: ScanView, cfg: Config) -> ClassResult:
    """Features, attention verdict, spurious gap and clusters of one class (no causal tests yet)."""
    rows = g.rows
    f = group_features(rows, g.grids, view.regions, cfg, view.size)
    own = assess(f, cfg)
    grid_index = g.row_grid
    correct = rows["correct"].to_numpy(dtype=float, na_value=np.nan) if "correct" in rows \
        else np.full(len(rows), np.nan)
    gap = spurious_gap(gap_scores(rows, f, own.masked, own.cue_kind, own.cue, g.grids, grid_index), correct)
    df = view.df
    labelled = df[df["label"] == g.class_id] if "label" in df else df.iloc[0:0]
    return ClassResult(class_id=g.class_id, name=g.name, rows=rows, labelled=labelled, features=f, own=own,
                       final=own, n_maps=len(g.ids), gap=gap, clusters=describe_clusters(g, view, cfg, f),
                       map_ids=g.ids, grids=g.grids)


def describe_clusters(g: ClassGroup, view: ScanView, cfg: Config, f=None) -> list[ClusterResult]:
    """SpRAy clusters of all of a class's maps, each described like a class.

    A cluster needs ``max(min_cluster, min_cluster_share x maps of the
    class)`` maps for a verdict, else it is ``insufficient_data``.
    """
    if g.grids is None or len(g.grids) < cfg.min_images:
        return []
    params = cluster_params(cfg, len(g.grids))
    c_all = cluster_maps(map_features(g.grids), params, order=crc_order(g.ids))
    labels, k = c_all.labels, c_all.k
    if k == 1:
        labels, k = minority_split(g, f, cfg, params.min_size)
    ccfg = replace(cfg, min_images=params.min_size)
    if k == 1:  # the class itself
        return [ClusterResult(0, g.ids.tolist(), group_features(g.rows, g.grids, view.regions, ccfg, view.size),
                              None, rows=g.rows, cfg=ccfg)]
    out = []
    row_label = np.where(g.row_grid >= 0, labels[np.maximum(g.row_grid, 0)], -1)
    for c in range(k):
        members = g.ids[labels == c].tolist()
        sub = g.rows[row_label == c]
        cf = group_features(sub, g.grids[labels == c], view.regions, ccfg, view.size)
        out.append(ClusterResult(c, members, cf, assess(cf, ccfg), rows=sub, cfg=ccfg))
    return out


def minority_split(g: ClassGroup, f, cfg: Config, min_size: int) -> tuple[np.ndarray, int]:
    """Labels that split a one-cluster class into its maps peaking at an off-centre place and the rest.

    Spectral clustering of downsampled maps can leave a tight strategy of a
    minority of the class (a stamp on a quarter of the images) inside one
    cluster with the rest; the peaks still show it as a dense spot away from
    the centre.  The split is made when between ``cfg.minority_share`` and
    ``cfg.place_share_low`` of the peaks sit within the
    place radius of an off-centre modal place (above that the class as a
    whole has a fixed place) and they are at least ``min_size`` maps.  The
    group then gets causal tests like any suspect cluster: attention alone
    never flags it.

    Returns:
        (labels per map of ``g.grids``, number of groups): ``(zeros, 1)`` when no split is made.
    """
    none = (np.zeros(len(g.grids), np.int64), 1)
    place = getattr(f, "peak_place", None)
    if place is None or not (np.isfinite(place.x) and np.isfinite(place.y)):
        return none
    if np.hypot(place.x - 0.5, place.y - 0.5) < cfg.minority_off_centre:
        return none
    if not cfg.minority_share <= place.share < cfg.place_share_low:
        return none
    px = np.full(len(g.grids), np.nan)
    py = np.full(len(g.grids), np.nan)
    have = g.row_grid >= 0
    if "peak_x" not in g.rows or not have.any():
        return none
    px[g.row_grid[have]] = g.rows["peak_x"].to_numpy(dtype=float, na_value=np.nan)[have]
    py[g.row_grid[have]] = g.rows["peak_y"].to_numpy(dtype=float, na_value=np.nan)[have]
    near = (px - place.x) ** 2 + (py - place.y) ** 2 <= place.radius ** 2
    if near.sum() < min_size or (~near).sum() < min_size:
        return none
    return near.astype(np.int64), 2


def judge(results: list[ClassResult], causal: CausalTests, cfg: Config) -> None:
    """Final verdicts of every class and cluster from attention and causal evidence.

    Rounds: a class flagged in one round is no placebo of an identity-keeping edit in the next (a tinted
    class that greyscale flips says nothing of what greyscale does to a healthy one); the classes still
    unflagged are judged again until no new class is flagged, after sequential testing has grown their
    samples where a test straddles its threshold against the new placebos.
    """
    flagged: frozenset = frozenset()
    todo = list(results)
    while todo:
        for r in todo:
            _judge_class(r, causal, cfg, flagged)
        now = frozenset(r.class_id for r in results if r.final.suspected)
        todo = [r for r in results if r.class_id not in now] if now - flagged else []
        if todo:  # their tests may straddle their thresholds against the new placebos: more images
            causal.grow_again({r.class_id for r in todo}, now)
        flagged = now
    _default_classes(results, cfg)


def _judge_class(r: ClassResult, causal: CausalTests, cfg: Config, flagged: frozenset) -> None:
    """The verdicts of one class and its clusters, the ``flagged`` classes no identity placebo."""
    untested_flags = not causal.results  # when some groups were tested, attention alone never flags
    causal.flagged_before[r.class_id] = flagged
    others = causal.others(r.class_id)
    r.own = assess(r.features, cfg, causal.get(r.class_id), others, causal.density, attention_decides=untested_flags)
    for c in r.clusters:
        if len(r.clusters) == 1:
            c.verdict = r.own
        else:
            c.verdict = assess(c.features, c.cfg or cfg, causal.get(r.class_id, c.cluster), others,
                               causal.density, attention_decides=untested_flags)
    r.final = class_verdict(r.own, r.clusters, r.n_maps)


def _default_classes(results: list[ClassResult], cfg: Config) -> None:
    """Give every default class (:func:`audit.scan.verdict.default_class`) its one treatment."""
    flagged = [(r.name, r.final) for r in results if r.final.suspected]
    for r in results:
        others = [x for x in flagged if x[0] != r.name]
        of = default_class(r.final, r.class_id, others, cfg)
        if not of:
            continue
        if r.final is not r.own:  # a suspect cluster's verdict: each such cluster gets the treatment first
            for c in r.clusters:
                if c.verdict is not None and c.verdict.suspected and default_class(c.verdict, r.class_id, others, cfg):
                    c.verdict = as_default(c.verdict, of, c.features, cfg)
            r.final = class_verdict(r.own, r.clusters, r.n_maps)
        if r.final is r.own:
            r.own = r.final = as_default(r.own, of, r.features, cfg)


def class_verdict(own: Verdict, clusters: list[ClusterResult], n_maps: int) -> Verdict:
    """A suspect cluster makes a class suspect that is not suspected by itself."""
    if len(clusters) <= 1:
        return own
    worst = max((c for c in clusters if c.verdict is not None and c.verdict.suspected),
                key=lambda c: c.verdict.suspicion, default=None)
    if worst is None or own.suspected:
        return own
    share = len(worst.members) / max(1, n_maps)
    ev = worst.verdict.evidence
    return replace(worst.verdict, evidence=f"A cluster of {len(worst.members)} heatmaps ({pct(share)} of the "
                                           f"class): " + ev[0].lower() + ev[1:])


def scan_as_saved(out_dir, *, quiet: bool = False, changes: dict | None = None):
    """Scan again with the settings of the scan saved in ``out_dir`` (the defaults when there is none).

    What ``audit run`` does at its end, so a resumed job keeps the kind of scan its user chose.
    ``changes``: Config fields to change besides (``audit run --causal-budget``).
    """
    s = provenance.saved_settings(out_dir)
    saved_budget = provenance.saved_budget(out_dir)
    if saved_budget is not None:  # a budget raised by hand stays raised on the rescan
        changes = {"budget": saved_budget, **(changes or {})}
    if s is None:
        return scan(out_dir, quiet=quiet, cfg=DEFAULT.replace(**(changes or {})))
    return scan(out_dir, intervene=s.intervene, quiet=quiet, layer=s.layer, method=s.method,
                use_masks=s.use_masks, cfg=DEFAULT.replace(fill=s.fill, **(changes or {})))


def scan(out_dir, *, intervene: bool = True, quiet: bool = False, layer: str | None = None,
         method: str | None = None, use_masks: bool = True, cfg: Config = DEFAULT, force: bool = False):
    """Scan a job's records; write and return ``(classes_df, clusters_df)``.

    Args:
        out_dir: the job output (``OUT``).
        intervene: run the causal tests (loads the model and a sample of
            each class's images; needs ``OUT/job.json`` naming them).
        quiet: write the tables, print nothing.
        layer, method: the view the verdict uses (default: the automatic
            layer and Grad-CAM++, see :func:`audit.scan.read.choose_view`).
        use_masks: False ignores object masks (the statistics then come from
            the heatmaps alone).
        cfg: the thresholds (:class:`audit.scan.config.Config`).
        force: replace a saved scan made with other settings (else refused).

    Returns:
        ``(classes_df, clusters_df)``, pandas DataFrames with the columns of
        ``schemas/classes.schema.json`` and ``schemas/clusters.schema.json``;
        ``OUT/summary/interventions.parquet`` holds every causal test.

    Raises:
        AuditError: no such output, no records, no such layer/method, or
            ``summary/`` holds a scan made with other settings (see ``force``).
    """
    import time

    t0 = time.perf_counter()
    view = read_view(out_dir, layer, method, use_masks)
    made = provenance.ScanSettings(view.layer, view.method, intervene, use_masks, cfg.fill)
    note = provenance.check(view.out, made, force)
    if note and not quiet:
        print(f"audit: {note}")
    groups = group_classes(view)
    load_class_grids(view, groups, cfg)
    results = [describe_class(g, view, cfg) for g in groups]
    intervener = make_intervener(view, cfg, quiet) if intervene else None
    causal = run_tests(intervener, results, view, cfg, use_masks) if intervener is not None else CausalTests()
    judge(results, causal, cfg)
    classes_df, clusters_df = summary_tables(results, view.layer, view.method, cfg.grid, view.regions)
    tests_df = interventions_table(results, causal)
    classes_df = _costs(view.out, classes_df)
    write_tables(view.out, {"classes": classes_df, "clusters": clusters_df, "interventions": tests_df},
                 view.regions)
    provenance.write(view.out, made, time.perf_counter() - t0, budget=cfg.budget)
    if not quiet:
        print(format_table(classes_df, clusters_df, layer=view.layer, method=view.method, out=view.out,
                           errors=view.errors, causal=causal, incomplete=completeness(view.out),
                           model_warning=one_class_warning(view.out, view.record.classes if view.record else None)))
        for line in cost_lines(classes_df):
            print(line)
    return classes_df, clusters_df


def _costs(out, classes_df):
    """The cost columns from an earlier per-image pass whose cues are still named (:mod:`audit.scan.cost`)."""
    return with_costs(classes_df, stored_costs(out, class_names(classes_df)))
