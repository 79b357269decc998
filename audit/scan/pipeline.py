"""The class scan: which classes did the model learn by a shortcut, and where is the cue?

:func:`scan` reads a job's records (``OUT/records``), takes one view of them
(one target layer and one CAM method, by default the job's automatic layer
and Grad-CAM++), and for every class:

1. aggregates the per-map statistics (means, accuracy, the *spurious gap*);
2. clusters the class's heatmaps SpRAy-style (Lapuschkin et al. 2019:
   downsampled normalised maps, a k-nearest-neighbour affinity graph, the
   number of clusters from the eigengap of its normalised Laplacian, spectral
   clustering), so that a strategy used by a minority of the class still
   shows up as a cluster of its own;
3. scores how suspicious the attention of the class and of each cluster is
   (:func:`assess`), and confirms suspects by intervention
   (:mod:`audit.scan.intervene`);
4. writes ``OUT/summary/classes.parquet`` and ``OUT/summary/clusters.parquet``
   and prints a compact table, suspects first.

Rows are grouped by ``target``, the class whose score was explained: with
the default ``explain.target: predicted`` a class row describes how the model
decides *for* that class (the images it predicts as that class), which is
what a shortcut audit asks.  ``accuracy`` is the share of correct predictions
in that group (the precision of the class, with ``target: predicted``);
``n_label`` and ``recall`` describe the images *labelled* with the class.

The decision logic (:func:`group_features`, :func:`assess`,
:func:`confirmation`, :func:`eigengap_k`, :func:`cluster_maps`,
:func:`spurious_gap`) consists of pure functions of arrays and data frames;
docs/scan.md explains every rule and threshold.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.engine.stats import box_mask, normalize, resize_maps
from audit.errors import AuditError

VERDICTS = ("shortcut_suspected", "ok", "insufficient_data")
METHOD_PREFERENCE = ("gradcam++", "gradcam", "cam", "gradcam++exact")
BORDER_AREA = 1.0 - 0.8 * 0.8  # the outer 10% band on every side


@dataclass(frozen=True)
class Config:
    """Thresholds of the scan (docs/scan.md explains each)."""

    min_images: int = 20  # fewer explained maps in a class: insufficient_data
    min_cluster: int = 8  # a cluster smaller than this gets insufficient_data
    max_maps: int = 1000  # heatmaps per class kept for clustering (deterministic sample)
    max_k: int = 6  # most clusters per class
    min_eigengap: float = 0.1  # smaller largest eigengap: one cluster
    grid: int = 16  # mean maps are stored at grid x grid; clustering uses grid/2
    threshold: float = 0.5  # suspicion at or above: shortcut_suspected
    mask_min_n: int = 8  # masked maps needed to judge by masks
    mask_min_frac: float = 0.25  # ... and share of the group
    sample: int = 32  # images per intervention
    fill: str = "mean"  # occlusion fill for interventions


DEFAULT = Config()


def _clip01(v) -> float:
    v = float(v)
    return 0.0 if not math.isfinite(v) else min(1.0, max(0.0, v))


def _or_none(v):
    """``v`` if it is a finite number, else None (a null in the summary tables)."""
    return v if _finite(v) else None


def _flip_fields(flips: dict) -> dict:
    """The intervention columns of a class or cluster row."""
    return {
        "flip_rate_cue": _or_none(flips.get("flip_rate_cue")),
        "flip_rate_object": _or_none(flips.get("flip_rate_object")),
        "n_intervened": int(max(flips.get("n_cue", 0) or 0, flips.get("n_object", 0) or 0)) if flips else 0,
    }


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def _pct(v) -> str:
    return f"{100 * float(v):.0f}%"


# ----------------------------------------------------------------------------
# Heatmaps on a small grid
# ----------------------------------------------------------------------------


def grids_from_cams(cams, h: int, w: int, grid: int) -> np.ndarray:
    """Raw maps (list of row-major (h*w,) arrays) -> (n, grid, grid) energy distributions.

    Resized (bilinear) then ReLU'd, like :func:`audit.engine.stats.map_stats`, and
    normalised to sum 1.  A map without energy becomes all zeros.
    """
    n = len(cams)
    if n == 0:
        return np.zeros((0, grid, grid), np.float32)
    raw = np.stack([np.asarray(c, np.float32) for c in cams]).reshape(n, int(h), int(w))
    raw = np.where(np.isfinite(raw), raw, 0.0)
    g = np.maximum(resize_maps(raw, (grid, grid)), 0.0).astype(np.float64)
    tot = g.sum(axis=(1, 2), keepdims=True)
    return np.where(tot > 0, g / np.where(tot > 0, tot, 1.0), 0.0).astype(np.float32)


def pool2(grids: np.ndarray) -> np.ndarray:
    """Sum-pool (n, g, g) distributions by 2 -> (n, g/2, g/2)."""
    n, g, _ = grids.shape
    return grids.reshape(n, g // 2, 2, g // 2, 2).sum(axis=(2, 4))


def hot_cells(mean_map: np.ndarray, rel: float = 0.5) -> np.ndarray:
    """Cells of a mean map holding at least ``rel`` times its maximum."""
    top = float(mean_map.max()) if mean_map.size else 0.0
    return mean_map >= rel * top if top > 0 else np.zeros_like(mean_map, bool)


def _cells_box(cells: np.ndarray) -> list[float] | None:
    if not cells.any():
        return None
    g_h, g_w = cells.shape
    ys, xs = np.nonzero(cells)
    return [xs.min() / g_w, ys.min() / g_h, (xs.max() + 1) / g_w, (ys.max() + 1) / g_h]


# ----------------------------------------------------------------------------
# Features of a group of maps (a class or a cluster)
# ----------------------------------------------------------------------------


def group_features(rows, grids=None, regions=None, cfg: Config = DEFAULT, size=(224, 224)) -> dict:
    """Everything :func:`assess` needs about a group of records.

    ``rows``: pandas DataFrame of records (status, correct, statistics); only
    ``status == "ok"`` rows count for the attention, all non-error rows for
    the accuracy.  ``grids``: (m, g, g) energy distributions of (a sample of)
    the ok rows, or None.  ``regions``: ``{name: box}`` of the job.  ``size``:
    the model input (H, W), for the pixel area of each region.
    """
    regions = dict(regions or {})
    status = rows["status"].to_numpy() if "status" in rows else np.full(len(rows), "ok", object)
    ok = rows[status == "ok"]
    f: dict = {"n_total": int(len(rows)), "n": int(len(ok)), "n_flat": int((status == "flat").sum()),
               "n_error": int((status == "error").sum())}
    if "correct" in rows:
        c = rows.loc[status != "error", "correct"].dropna()
        f["accuracy"] = float(c.astype(float).mean()) if len(c) else math.nan
    else:
        f["accuracy"] = math.nan

    def col(name):
        return ok[name].to_numpy(dtype=float, na_value=np.nan) if name in ok else np.full(len(ok), np.nan)

    def mean(name):
        v = col(name)
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else math.nan

    means = {name: mean(name) for name in ("energy_object", "pointing_hit", "energy_border", "entropy",
                                           "peak_x", "peak_y", "centroid_x", "centroid_y",
                                           "concentration", "object_x", "object_y")}
    for r in regions:
        means[f"energy_{r}"] = mean(f"energy_{r}")
    f["means"] = means
    eo = col("energy_object")
    f["n_masked"] = int(np.isfinite(eo).sum())
    px, py = col("peak_x"), col("peak_y")
    good = np.isfinite(px) & np.isfinite(py)
    f["peak_spread"] = float(np.sqrt(px[good].var() + py[good].var())) if good.sum() >= 2 else math.nan
    ox, oy = col("object_x"), col("object_y")
    og = np.isfinite(ox) & np.isfinite(oy)
    f["object_spread"] = float(np.sqrt(ox[og].var() + oy[og].var())) if og.sum() >= 2 else math.nan
    both = good & og
    f["peak_object_dist"] = float(np.hypot(px[both] - ox[both], py[both] - oy[both]).mean()) if both.any() else math.nan
    # candidate cue places: each named region and the border band
    places = []
    for r, box in regions.items():
        area = float(box_mask(box, size).mean())
        places.append(("region", r, means[f"energy_{r}"], area, [float(v) for v in box]))
    places.append(("border", "border", means["energy_border"], BORDER_AREA, None))
    f["places"] = places
    if grids is not None and len(grids):
        mm = np.asarray(grids, np.float64).mean(axis=0)
        f["mean_map"] = normalize(mm)
        hot = hot_cells(mm)
        f["hot_box"] = _cells_box(hot)
        g = mm.shape[0]
        cy, cx = np.nonzero(hot)
        w = mm[hot]
        f["hot_xy"] = (float(((cx + 0.5) / g * w).sum() / w.sum()), float(((cy + 0.5) / g * w).sum() / w.sum())) \
            if w.sum() > 0 else (math.nan, math.nan)
        f["hot_area"] = float(hot.mean())
    else:
        f["mean_map"], f["hot_box"], f["hot_xy"], f["hot_area"] = None, None, (math.nan, math.nan), math.nan
    return f


# ----------------------------------------------------------------------------
# The verdict
# ----------------------------------------------------------------------------


def place_score(share: float, area: float) -> float:
    """How much a place dominates the attention: 0 at (or below) its area share, 1 when it holds nearly all.

    ``d = (share - area) / (1 - area)`` is the share of the energy *above
    uniform* (0 = as much as its area, 1 = all of it); the score ramps from
    d = 0.25 to d = 0.6.
    """
    if not (_finite(share) and _finite(area)) or area >= 1.0:
        return 0.0
    d = (share - area) / (1.0 - area)
    return _clip01((d - 0.25) / 0.35)


def fixed_place_score(peak_spread: float, xy) -> float:
    """Peaks that sit at one place (spread ramp 0.05 -> 0.02 of the image) away from the centre.

    Strict on purpose: clustering groups maps by location, so a cluster of a
    healthy class (objects in one part of the image) has a small spread too;
    a pasted cue (watermark, tag, logo) has almost none.
    """
    if not _finite(peak_spread) or not all(_finite(v) for v in xy):
        return 0.0
    off = math.hypot(xy[0] - 0.5, xy[1] - 0.5)
    return _clip01((0.05 - peak_spread) / 0.03) * _clip01((off - 0.15) / 0.15)


def diffuse_score(entropy: float, concentration: float) -> float:
    """Attention spread over the whole image; capped at 0.35: never a verdict by itself."""
    if not (_finite(entropy) and _finite(concentration)) or concentration > 0.25:
        return 0.0
    return 0.35 * _clip01((entropy - 0.9) / 0.07)


def off_object_score(energy_object: float, pointing: float) -> float:
    """Attention off the object: the peak misses it (weight 0.6) and little energy is on it (0.4)."""
    s_point = _clip01((0.6 - pointing) / 0.4) if _finite(pointing) else 0.0
    s_energy = _clip01((0.4 - energy_object) / 0.3) if _finite(energy_object) else 0.0
    return 0.6 * s_point + 0.4 * s_energy


def confirmation(flips: dict | None) -> float | None:
    """0..1 from the intervention: 1 = the shortcut is confirmed, 0 = refuted, None = not run.

    Confirmed by a cue flip rate well above noise (ramp 0.1 -> 0.4) or by an
    object whose removal barely matters (flip rate ramp 0.3 -> 0.05).
    """
    if not flips:
        return None
    parts = []
    fc, fo = flips.get("flip_rate_cue"), flips.get("flip_rate_object")
    if _finite(fc):
        parts.append(_clip01((fc - 0.1) / 0.3))
    if _finite(fo):
        parts.append(_clip01((0.3 - fo) / 0.25))
    return max(parts) if parts else None


def assess(f: dict, cfg: Config = DEFAULT, flips: dict | None = None) -> dict:
    """Suspicion (0..1), verdict, cue and a one-sentence evidence for one group.

    ``f`` from :func:`group_features`; ``flips`` from
    :func:`audit.scan.intervene.flip_rates` (or None when not run).
    """
    res = {"suspicion": math.nan, "attention_suspicion": math.nan, "verdict": "insufficient_data",
           "cue": "", "cue_kind": "", "cue_box": None, "masked": False, "flips": flips}
    if f["n"] < cfg.min_images:
        why = f"{f['n']} usable heatmap{'' if f['n'] == 1 else 's'}" + (f" ({f['n_flat']} flat)" if f.get("n_flat") else "")
        res["evidence"] = f"Only {why}; {cfg.min_images} are needed for a verdict."
        return res
    m = f["means"]
    # where the attention is: the strongest candidate place
    cands = [(place_score(share, area), kind, name, share, area, box)
             for kind, name, share, area, box in f["places"]]
    fixed = fixed_place_score(f["peak_spread"], (m["peak_x"], m["peak_y"]))
    cands.append((fixed, "fixed", "fixed place", math.nan, math.nan, f.get("hot_box")))
    # ties: a named region first (the user's hypothesis), then a fixed place, then the border
    rank = {"region": 0, "fixed": 1, "border": 2}
    cands.sort(key=lambda c: (-c[0], rank[c[1]]))
    best = cands[0]
    s_diffuse = diffuse_score(m["entropy"], m["concentration"])
    masked = f["n_masked"] >= cfg.mask_min_n and f["n_masked"] >= cfg.mask_min_frac * f["n"]
    res["masked"] = masked
    if masked:
        s_attn = off_object_score(m["energy_object"], m["pointing_hit"])
    else:
        s_attn = max(best[0], s_diffuse)
    if best[0] >= 0.3:
        kind, name = best[1], best[2]
        res["cue"] = f"region:{name}" if kind == "region" else name
        res["cue_kind"], res["cue_box"] = kind, best[5]
    elif (masked and s_attn >= cfg.threshold) or (not masked and s_diffuse > 0):
        res["cue"], res["cue_kind"], res["cue_box"] = "background", "hotspot", f.get("hot_box")
    elif masked:
        res["cue"], res["cue_kind"] = "object", "object"
    res["attention_suspicion"] = s_attn
    c = confirmation(flips)
    res["confirmation"] = c
    susp = s_attn if c is None else s_attn * (0.3 + 0.7 * c)
    res["suspicion"] = susp
    res["verdict"] = "shortcut_suspected" if susp >= cfg.threshold else "ok"
    res["evidence"] = evidence(f, res, best)
    return res


def _where(f, res, best) -> str:
    kind = res["cue_kind"]
    if kind == "region":
        return (f"{_pct(best[3])} of the attention lies in region '{best[2]}' "
                f"({_pct(best[4])} of the image)")
    if kind == "border":
        return f"{_pct(best[3])} of the attention lies in the outer 10% border ({_pct(BORDER_AREA)} of the image)"
    if kind == "fixed":
        x, y = f["means"]["peak_x"], f["means"]["peak_y"]
        return (f"the peaks stay at one place (x={x:.2f}, y={y:.2f}, spread {f['peak_spread']:.2f}) "
                "away from the image centre")
    if kind == "hotspot":
        m = f["means"]
        hx, hy = f.get("hot_xy", (math.nan, math.nan))
        at = f", strongest around x={hx:.2f}, y={hy:.2f}" if _finite(hx) else ""
        return f"the attention is spread over the background (entropy {m['entropy']:.2f}{at})"
    return ""


def evidence(f: dict, res: dict, best) -> str:
    """One human sentence: what the attention does and where, and what the intervention showed."""
    m = f["means"]
    parts = []
    if res["masked"]:
        on = (f"{_pct(m['energy_object'])} of the attention is on the object and the peak hits it in "
              f"{_pct(m['pointing_hit'])} of {f['n_masked']} masked images")
        parts.append(on)
        where = _where(f, res, best)
        if where and res["cue_kind"] != "object":
            parts.append(where)
        if _finite(f.get("object_spread")) and _finite(f.get("peak_object_dist")) and f["object_spread"] > 0.08 \
                and f["peak_object_dist"] > 0.25 and res["attention_suspicion"] >= 0.5:
            parts.append(f"the peaks stay {f['peak_object_dist']:.2f} of the image away from the "
                         "objects as they move")
    else:
        where = _where(f, res, best)
        if where:
            parts.append(where)
        else:
            parts.append(f"the attention moves with the image (peak spread {f['peak_spread']:.2f}) "
                         "and no region or the border dominates")
    flips = res.get("flips") or {}
    fl = []
    if _finite(flips.get("flip_rate_cue")):
        fl.append(f"occluding the cue changes {_pct(flips['flip_rate_cue'])} of {flips.get('n_cue')} predictions")
    if _finite(flips.get("flip_rate_object")):
        fl.append(f"occluding the object {_pct(flips['flip_rate_object'])} of {flips.get('n_object')}")
    if fl:
        parts.append(", ".join(fl))
    text = "; ".join(parts)
    if res["verdict"] == "ok" and res["attention_suspicion"] >= 0.5 and res.get("confirmation") is not None:
        text += " - the intervention does not confirm a shortcut"
    elif res["verdict"] == "ok" and 0 < res["attention_suspicion"] < 0.5 and res["cue_kind"] == "hotspot" \
            and not res["masked"]:
        text += " - diffuse attention alone is not a shortcut"
    return text[0].upper() + text[1:] + "."


# ----------------------------------------------------------------------------
# Spectral clustering (SpRAy)
# ----------------------------------------------------------------------------


def eigengap_k(eigvals, max_k: int, min_gap: float = DEFAULT.min_eigengap, zero: float = 1e-3) -> int:
    """Number of clusters from the smallest Laplacian eigenvalues.

    The eigengap heuristic: ``k = argmax_{1 <= k <= max_k} (lambda_k -
    lambda_{k-1})`` (0-based ascending eigenvalues), or 1 when that largest
    gap is below ``min_gap``; but never fewer than the number of (near-)zero
    eigenvalues (``< zero``), i.e. the (almost) disconnected parts of the
    affinity graph.  That matters when a minority strategy forms a tight
    group of its own while the rest of the class varies continuously (its
    spectrum rises slowly, so no single large gap stands out).
    """
    lam = np.sort(np.asarray(eigvals, np.float64))
    max_k = int(min(max_k, len(lam) - 1))
    if max_k < 2:
        return 1
    gaps = np.diff(lam[:max_k + 1])  # gaps[k-1] = lambda_k - lambda_{k-1}
    k = int(np.argmax(gaps)) + 1
    if gaps[k - 1] < min_gap:
        k = 1
    parts = int((lam[:max_k] < zero).sum())
    return max(k, parts)


def affinity(X: np.ndarray, n_neighbors: int | None = None):
    """Symmetric k-nearest-neighbour affinity with Gaussian weights (sparse CSR)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = n_neighbors or int(np.clip(round(math.sqrt(n)), 5, 15))
    k = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=k).fit(X)
    G = nn.kneighbors_graph(X, mode="distance")
    d = G.data
    sigma = float(np.median(d)) if len(d) and np.median(d) > 0 else 1.0
    G.data = np.exp(-((d / sigma) ** 2))
    A = G.maximum(G.T).tocsr()
    A.setdiag(0)
    A.eliminate_zeros()
    return A


def laplacian_eigvals(A, k: int) -> np.ndarray:
    """The ``k`` smallest eigenvalues of the normalised Laplacian of ``A``."""
    from scipy.sparse.csgraph import laplacian

    n = A.shape[0]
    L = laplacian(A, normed=True)
    k = min(k, n)
    if n <= 600:
        from scipy.linalg import eigh

        return eigh(L.toarray(), eigvals_only=True, subset_by_index=[0, k - 1])
    from scipy.sparse import identity
    from scipy.sparse.linalg import eigsh

    # largest eigenvalues of I - L (the normalised adjacency) = smallest of L
    vals = eigsh(identity(n) - L, k=k, which="LA", return_eigenvectors=False, tol=1e-6,
                 v0=np.ones(n) / math.sqrt(n))
    return np.sort(1.0 - vals)


def cluster_maps(X: np.ndarray, cfg: Config = DEFAULT, seed: int = 0):
    """SpRAy clustering of feature rows ``X`` (n, d): labels (n,) sorted by size, k, eigenvalues."""
    n = len(X)
    if n < 2 * cfg.min_cluster:
        return np.zeros(n, int), 1, np.zeros(0)
    A = affinity(X)
    lam = laplacian_eigvals(A, cfg.max_k + 1)
    k = eigengap_k(lam, min(cfg.max_k, n // cfg.min_cluster), cfg.min_eigengap)
    if k == 1:
        return np.zeros(n, int), 1, lam
    import warnings

    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():  # disconnected parts are expected: they are the clusters
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="cluster_qr",
                                    random_state=seed).fit_predict(A)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    remap = np.empty(k, int)
    remap[order] = np.arange(k)
    return remap[labels], k, lam


def map_features(grids: np.ndarray) -> np.ndarray:
    """Clustering features: Hellinger embedding (sqrt) of maps pooled to grid/2."""
    p = pool2(np.asarray(grids, np.float64))
    return np.sqrt(p.reshape(len(p), -1))


# ----------------------------------------------------------------------------
# Spurious gap
# ----------------------------------------------------------------------------


def spurious_gap(score, correct, min_quarter: int = 3) -> float:
    """Accuracy of the quarter with the highest ``score`` minus the quarter with the lowest.

    ``score`` is off-object or cue attention per image.  Negative: the more
    the attention sits on the cue, the more often the model is wrong (on data
    where the cue does not hold).  NaN with too few labelled images.
    """
    s = np.asarray(score, float)
    c = np.asarray(correct, float)
    ok = np.isfinite(s) & np.isfinite(c)
    s, c = s[ok], c[ok]
    q = len(s) // 4
    if q < min_quarter:
        return math.nan
    order = np.argsort(s, kind="stable")
    return float(c[order[-q:]].mean() - c[order[:q]].mean())


def gap_scores(rows, f: dict, res: dict, grids=None, grid_index=None) -> np.ndarray:
    """Per-row score for the spurious gap (NaN where not known)."""
    n = len(rows)
    if res.get("masked"):
        return 1.0 - rows["energy_object"].to_numpy(dtype=float, na_value=np.nan)
    kind = res.get("cue_kind")
    if kind == "region":
        return rows[f"energy_{res['cue'].split(':', 1)[1]}"].to_numpy(dtype=float, na_value=np.nan)
    if kind == "border":
        return rows["energy_border"].to_numpy(dtype=float, na_value=np.nan)
    out = np.full(n, np.nan)
    if grids is not None and grid_index is not None and f.get("mean_map") is not None:
        hot = hot_cells(f["mean_map"])
        share = (np.asarray(grids) * hot).sum(axis=(1, 2))
        for k, gi in enumerate(grid_index):
            if gi >= 0:
                out[k] = share[gi]
    return out


# ----------------------------------------------------------------------------
# Reading a job's output
# ----------------------------------------------------------------------------


def choose_view(pairs, auto_layers=None, layer=None, method=None) -> tuple[str, str]:
    """The (layer, method) the verdict uses.

    ``pairs``: the (layer, method) combinations present.  Default layer: the
    first of the job's resolved layers (the automatic choice under ``layers:
    auto``), else the layer with the most combinations; default method: the
    first of :data:`METHOD_PREFERENCE` present for it.
    """
    pairs = sorted({(str(a), str(b)) for a, b in pairs})
    if not pairs:
        raise AuditError("the records hold no heatmaps (every image failed?)")
    layers = sorted({a for a, _ in pairs})
    if layer is not None:
        if layer not in layers:
            raise AuditError(f"layer {layer!r} is not in the records; layers: {', '.join(layers)}")
    else:
        auto = [lyr for lyr in (auto_layers or []) if lyr in layers]
        layer = auto[0] if auto else max(layers, key=lambda lyr: sum(a == lyr for a, _ in pairs))
    methods = [b for a, b in pairs if a == layer]
    if method is not None:
        if method not in methods:
            raise AuditError(f"method {method!r} is not in the records for layer {layer}; "
                             f"methods: {', '.join(methods)}")
    else:
        method = next((m for m in METHOD_PREFERENCE if m in methods), methods[0])
    return layer, method


def _read_job(out: Path) -> dict:
    import json

    p = out / "job.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {}


def _sample_ids(ids, k: int) -> set:
    """A deterministic sample of at most ``k`` ids (smallest CRC32)."""
    ids = list(ids)
    if len(ids) <= k:
        return set(ids)
    return set(sorted(ids, key=lambda s: (zlib.crc32(str(s).encode()), str(s)))[:k])


@dataclass
class _Group:
    class_id: int
    name: str
    rows: object  # DataFrame
    grids: np.ndarray | None = None
    grid_ids: list = field(default_factory=list)


def _load_grids(dataset, flt, wanted: dict, grid: int) -> dict:
    """{(target, image_id): grid} for the wanted ids, streaming the cam column batch by batch.

    Rows are filtered in Arrow first (``is_in`` on the ids), so only the
    sampled maps are ever converted; memory stays bounded by one batch plus
    the (small) grids.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    all_ids = pa.array(sorted({i for ids in wanted.values() for i in ids}), pa.string())
    cols = ["target", "image_id", "cam", "cam_h", "cam_w"]
    for batch in dataset.to_batches(columns=cols, filter=flt & (pc.field("status") == "ok")):
        if batch.num_rows == 0:
            continue
        batch = batch.filter(pc.is_in(batch.column("image_id"), value_set=all_ids))
        if batch.num_rows == 0:
            continue
        tg = batch.column("target").to_numpy(zero_copy_only=False)
        iid = batch.column("image_id").to_pylist()
        hs = batch.column("cam_h").to_numpy(zero_copy_only=False)
        ws = batch.column("cam_w").to_numpy(zero_copy_only=False)
        cams = batch.column("cam")
        keep = [i for i in range(batch.num_rows)
                if np.isfinite(tg[i]) and iid[i] in wanted.get(int(tg[i]), ()) and cams[i].is_valid]
        by_shape: dict = {}
        for i in keep:
            by_shape.setdefault((int(hs[i]), int(ws[i])), []).append(i)
        for (h, w), idx in by_shape.items():
            sub = cams.take(pa.array(idx))
            flat = sub.flatten().to_numpy(zero_copy_only=False)
            if len(flat) != len(idx) * h * w:
                continue  # a malformed map (length does not match cam_h x cam_w): skipped
            g = grids_from_cams(flat.reshape(len(idx), h * w), h, w, grid)
            for j, i in enumerate(idx):
                out[(int(tg[i]), iid[i])] = g[j]
    return out


def _class_names(job: dict, df) -> dict:
    names = {}
    for k, v in enumerate(job.get("classes") or (job.get("spec") or {}).get("dataset", {}).get("classes") or []):
        names[k] = str(v)
    for idcol, ncol in (("pred", "pred_name"), ("label", "label_name")):
        if idcol in df and ncol in df:
            sub = df[[idcol, ncol]].dropna().drop_duplicates(idcol)
            for i, nm in zip(sub[idcol], sub[ncol]):
                names.setdefault(int(i), str(nm))
    return names


def _stat_means(f: dict) -> dict:
    return {k: (np.float32(v) if _finite(v) else None) for k, v in f["means"].items()}


def _cue_mask(f: dict, res: dict, size) -> np.ndarray | None:
    """The place to occlude for the intervention, at the model input size."""
    kind = res["cue_kind"]
    H, W = size
    if kind == "region" and res["cue_box"]:
        return box_mask(res["cue_box"], (H, W))
    if kind == "border":
        from audit.engine.stats import border_mask

        return border_mask((H, W))
    if f.get("mean_map") is not None:
        hot = hot_cells(f["mean_map"]).astype(np.float32)
        return resize_maps(hot[None], (H, W))[0] >= 0.5
    return None


class _SafeIntervener:
    """An intervention that cannot run (model or data moved) warns once and is skipped."""

    def __init__(self, inner, quiet):
        self.inner, self.quiet, self.failed = inner, quiet, None

    @property
    def size(self):
        return self.inner.size

    def __call__(self, *a, **k):
        if self.failed:
            return None
        try:
            return self.inner(*a, **k)
        except AuditError as e:
            self.failed = str(e)
            if not self.quiet:
                import sys

                print(f"audit: scan: intervention skipped ({e})", file=sys.stderr)
            return None


def _intervene(intervener, group_rows, f, res, cfg, use_masks):
    """Flip rates for a sample of a suspect group (None when not possible)."""
    if intervener is None:
        return None
    ok = group_rows[group_rows["status"] == "ok"]
    ids = sorted(_sample_ids(ok["image_id"].tolist(), cfg.sample))
    if not ids:
        return None
    try:
        size = intervener.size
    except AuditError:
        return intervener(ids, None)  # reports the reason once
    cue = _cue_mask(f, res, size)
    if cue is None:
        return None
    return intervener(ids, cue, use_masks=use_masks)


def scan(out_dir, *, intervene: bool = True, quiet: bool = False, layer: str | None = None,
         method: str | None = None, use_masks: bool = True, cfg: Config = DEFAULT):
    """Scan a job's records; write and return ``(classes_df, clusters_df)``.

    ``intervene``: confirm suspects by occlusion (loads the model and the
    sample images; needs ``OUT/job.json``).  ``layer``/``method``: the view the
    verdict uses (default: the automatic layer and Grad-CAM++, see
    :func:`choose_view`).  ``use_masks=False`` ignores object masks (the
    statistics then come from the heatmaps alone).  Prints the table unless
    ``quiet``.
    """
    import pyarrow.compute as pc

    from audit.data.query import records_dataset

    out = Path(out_dir)
    if not out.exists():
        raise AuditError(f"{out} does not exist")
    ds = records_dataset(out)
    job = _read_job(out)
    spec = job.get("spec") or {}
    regions = dict((spec.get("explain") or {}).get("regions") or {})
    names_in = set(ds.schema.names)
    regions = {r: b for r, b in regions.items() if f"energy_{r}" in names_in}
    for c in ds.schema.names:  # regions of a job without job.json
        if c.startswith("energy_") and c not in ("energy_object", "energy_border") and c[7:] not in regions:
            regions[c[7:]] = None

    pairs_t = ds.to_table(columns=["layer", "method"], filter=pc.field("layer").is_valid())
    pairs = set(zip(pairs_t.column("layer").to_pylist(), pairs_t.column("method").to_pylist()))
    layer, method = choose_view(pairs, job.get("layers"), layer, method)
    flt = (pc.field("layer") == layer) & (pc.field("method") == method)
    cols = [c for c in ds.schema.names if c not in ("cam",)]
    df = ds.to_table(columns=cols, filter=flt).to_pandas()
    errors = ds.count_rows(filter=pc.field("status") == "error") if "status" in names_in else 0
    if not use_masks:
        for c in ("energy_object", "pointing_hit", "object_x", "object_y"):
            if c in df:
                df[c] = np.nan
    names = _class_names(job, df)
    size = tuple(job.get("input_size") or (spec.get("model") or {}).get("input_size") or (224, 224))
    if regions and any(b is None for b in regions.values()):
        regions = {r: (b if b is not None else (0.0, 0.0, 1.0, 1.0)) for r, b in regions.items()}

    targets = sorted({int(t) for t in df["target"].dropna().unique()} | set(names))
    groups = {t: _Group(t, names.get(t, str(t)), df[df["target"] == t]) for t in targets}
    wanted = {t: _sample_ids(g.rows.loc[g.rows["status"] == "ok", "image_id"], cfg.max_maps)
              for t, g in groups.items()}
    grids = _load_grids(ds, flt, wanted, cfg.grid) if any(wanted.values()) else {}

    intervener = None
    if intervene and (spec.get("model") or {}) and spec.get("dataset"):
        from audit.scan.intervene import Intervener

        intervener = _SafeIntervener(Intervener(out, fill=cfg.fill), quiet)

    class_rows, cluster_rows = [], []
    for t, g in groups.items():
        rows = g.rows
        ids = [i for i in rows.loc[rows["status"] == "ok", "image_id"] if (t, i) in grids]
        G = np.stack([grids[(t, i)] for i in ids]) if ids else None
        pos = {i: k for k, i in enumerate(ids)}
        f = group_features(rows, G, regions, cfg, size)
        res = assess(f, cfg)
        if res["verdict"] == "shortcut_suspected" and intervene:
            res = assess(f, cfg, _intervene(intervener, rows, f, res, cfg, use_masks))
        grid_index = [pos.get(i, -1) for i in rows["image_id"]]
        gap = spurious_gap(gap_scores(rows, f, res, G, grid_index),
                           rows["correct"].to_numpy(dtype=float, na_value=np.nan) if "correct" in rows
                           else np.full(len(rows), np.nan))
        # clusters
        k = 0
        clusters = []
        if G is not None and len(G) >= cfg.min_images:
            labels, k, _ = cluster_maps(map_features(G), cfg)
            for c in range(k):
                members = [ids[j] for j in np.nonzero(labels == c)[0]]
                sub = rows[rows["image_id"].isin(set(members))]
                cf = group_features(sub, G[labels == c], regions, cfg, size)
                ccfg = Config(**{**cfg.__dict__, "min_images": cfg.min_cluster})
                cres = assess(cf, ccfg)
                if k == 1:
                    cres = res
                elif cres["verdict"] == "shortcut_suspected" and intervene:
                    cres = assess(cf, ccfg, _intervene(intervener, sub, cf, cres, cfg, use_masks))
                clusters.append((c, members, cf, cres))
        # a suspect cluster makes the class suspect
        own = res
        final = dict(res)
        worst = max((cl for cl in clusters if cl[3]["verdict"] == "shortcut_suspected"),
                    key=lambda cl: cl[3]["suspicion"], default=None)
        if k > 1 and worst is not None and (res["verdict"] != "shortcut_suspected"
                                            or worst[3]["suspicion"] > res["suspicion"]):
            c, members, cf, cres = worst
            share = len(members) / max(1, len(ids))
            final = dict(cres)
            final["evidence"] = (f"A cluster of {len(members)} heatmaps ({_pct(share)} of the class): "
                                 + cres["evidence"][0].lower() + cres["evidence"][1:])
        flips = final.get("flips") or {}
        n_susp = sum(cl[3]["verdict"] == "shortcut_suspected" for cl in clusters)
        lab = df[df["label"] == t] if "label" in df else df.iloc[0:0]
        labc = lab.loc[lab["status"] != "error", "correct"].dropna() if len(lab) else lab
        class_rows.append({
            "class_id": t, "class_name": g.name, "n": f["n_total"], "n_ok": f["n"], "n_flat": f["n_flat"],
            "n_masked": f["n_masked"],
            "accuracy": _or_none(f["accuracy"]),
            "n_label": len(lab), "recall": float(labc.astype(float).mean()) if len(labc) else None,
            "spurious_gap": _or_none(gap),
            "suspicion": _or_none(final["suspicion"]),
            "attention_suspicion": _or_none(own["attention_suspicion"]),
            "verdict": final["verdict"], "evidence": final["evidence"], "cue": final["cue"],
            "cue_box": final["cue_box"],
            **_flip_fields(flips),
            "n_clusters": k, "n_suspect_clusters": int(n_susp), "peak_spread": f["peak_spread"],
            "layer": layer, "method": method,
            "mean_map": None if f["mean_map"] is None else f["mean_map"].ravel().tolist(),
            "map_h": cfg.grid if f["mean_map"] is not None else None,
            "map_w": cfg.grid if f["mean_map"] is not None else None,
            **_stat_means(f),
        })
        for c, members, cf, cres in clusters:
            cluster_rows.append({
                "class_id": t, "class_name": g.name, "cluster": c, "n": cf["n"],
                "share": cf["n"] / max(1, len(ids)),
                "accuracy": _or_none(cf["accuracy"]),
                "suspicion": _or_none(cres["suspicion"]),
                "verdict": cres["verdict"], "evidence": cres["evidence"], "cue": cres["cue"],
                "cue_box": cres["cue_box"],
                **_flip_fields(cres.get("flips") or {}),
                "peak_spread": cf["peak_spread"], "layer": layer, "method": method,
                "mean_map": None if cf["mean_map"] is None else cf["mean_map"].ravel().tolist(),
                "map_h": cfg.grid, "map_w": cfg.grid,
                "example_ids": sorted(members, key=lambda s: zlib.crc32(str(s).encode()))[:12],
                **_stat_means(cf),
            })

    classes_df = _to_frame(class_rows, "classes", regions)
    clusters_df = _to_frame(cluster_rows, "clusters", regions)
    order = {"shortcut_suspected": 0, "ok": 1, "insufficient_data": 2}
    classes_df = classes_df.sort_values(
        ["verdict", "suspicion"], key=lambda s: s.map(order) if s.name == "verdict" else -s.fillna(-1),
        kind="stable").reset_index(drop=True)
    _write(out, classes_df, clusters_df, regions)
    if not quiet:
        print(format_table(classes_df, clusters_df, layer=layer, method=method, out=out, errors=errors))
    return classes_df, clusters_df


def _to_frame(rows, name, regions):
    import pandas as pd

    from audit.data.schema import arrow_schema

    schema = arrow_schema(name, {f"energy_{r}": "float32" for r in regions})
    if not rows:
        return schema.empty_table().to_pandas()
    df = pd.DataFrame(rows)
    return df[[f.name for f in schema]]


def _write(out: Path, classes_df, clusters_df, regions) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.data.io import atomic_write_bytes
    from audit.data.schema import SCHEMA_VERSION, arrow_schema

    d = out / "summary"
    d.mkdir(parents=True, exist_ok=True)
    for name, frame in (("classes", classes_df), ("clusters", clusters_df)):
        schema = arrow_schema(name, {f"energy_{r}": "float32" for r in regions})
        schema = schema.with_metadata({"schema_version": SCHEMA_VERSION, "table": name})
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(d / f"{name}.parquet", sink.getvalue().to_pybytes())


def format_table(classes_df, clusters_df, *, layer="", method="", out="", errors=0, width=None) -> str:
    """The compact suspects-first table printed by ``audit scan``."""
    import shutil
    import textwrap

    width = width or min(120, shutil.get_terminal_size((100, 20)).columns)
    lines = [f"scan of {out}: layer {layer}, {method}; {len(classes_df)} classes"
             + (f", {errors} unreadable images" if errors else "")]
    hdr = f"{'verdict':<19} {'class':<16} {'n':>6} {'acc':>5} {'susp':>5}  {'cue':<14} {'flip cue/obj':>12}"
    lines += [hdr, "-" * len(hdr)]

    def fmt(v, spec=".2f"):
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    shown = classes_df if len(classes_df) <= 40 else classes_df[classes_df["verdict"] == "shortcut_suspected"]
    for r in shown.itertuples():
        flips = f"{fmt(r.flip_rate_cue)}/{fmt(r.flip_rate_object)}"
        lines.append(f"{r.verdict:<19} {str(r.class_name)[:16]:<16} {r.n:>6} {fmt(r.accuracy):>5} "
                     f"{fmt(r.suspicion):>5}  {str(r.cue or '-')[:14]:<14} {flips:>12}")
        if r.verdict == "shortcut_suspected" or len(classes_df) <= 10:
            lines += textwrap.wrap(r.evidence, width, initial_indent="    ", subsequent_indent="    ")
        if len(clusters_df):
            cl = clusters_df[(clusters_df["class_id"] == r.class_id)]
            if len(cl) > 1:
                for c in cl.itertuples():
                    mark = "!" if c.verdict == "shortcut_suspected" else " "
                    lines.append(f"    {mark} cluster {c.cluster}: {c.n} maps ({_pct(c.share)}), {c.verdict}"
                                 + (f", cue {c.cue}" if c.cue else ""))
    if len(shown) < len(classes_df):
        lines.append(f"... and {len(classes_df) - len(shown)} classes not suspected (see summary/classes.parquet)")
    n_s = int((classes_df["verdict"] == "shortcut_suspected").sum())
    lines.append(f"{n_s} of {len(classes_df)} classes suspected of a shortcut; "
                 f"tables in {Path(out) / 'summary'}/classes.parquet and clusters.parquet")
    return "\n".join(lines)
