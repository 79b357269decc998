"""The HTML report of a scan: ``audit report OUT`` writes ``OUT/report.html``.

One self-contained page (every picture inline as a ``data:`` URI) that a
reviewer reads in a minute: the job header, the class table sorted by
suspicion, then per class (suspects first) the mean heatmap over the mean
image and the mean map of each cluster, a gallery of overlays for each
suspect cluster, the most doubtful examples and the error rows.

It samples.  Only light columns (ids, labels, scores, statistics) of the
primary (layer, method) are read for every image; raw maps (``cam``) are
read only for the few hundred sampled images, file by file.  So an output
of a million rows still gives a report of a few MB in seconds.  Every
column the page uses is optional except ``image_id``: missing summaries
or statistics leave their section out, with a note.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.data import fs, query, resources
from audit.data.io import completeness
from audit.data.jobspec import JobRecord, read_job_record
from audit.errors import AuditError, cannot_write
from audit.review import viz
from audit.scan import provenance
from audit.scan.cost import cost_sentence

SUSPECT = "shortcut_suspected"
_LIGHT = ("image_id", "path", "label", "label_name", "pred", "pred_name", "target", "score", "correct", "status",
          "error", "energy_object", "energy_border", "has_mask", "pointing_hit", "concentration")
THUMB = 128  # gallery thumbnails, pixels
# optional columns of the class table: (column, title, format)
_TABLE_COLUMNS = (
    ("n", "images", "int"),
    ("accuracy", "accuracy", "pct"),
    ("recall", "recall", "pct"),
    ("flip_rate_cue", "flip: cue", "pct"),
    ("flip_rate_object", "flip: object", "pct"),
    ("flip_rate_background", "flip: background", "pct"),
    ("accuracy_without_cue", "accuracy without cue", "pct"),
    ("worst_group_accuracy", "worst group", "pct"),
    ("energy_object", "on object", "pct"),
    ("energy_border", "border", "pct"),
    ("cue", "cue", "text"),
)
MEAN_SIZE = 160  # mean image / mean heatmaps, pixels
MAX_GALLERIES = 4  # suspect-cluster galleries per class (the largest suspect clusters)


# ----------------------------------------------------------------------------
# Reading (sampled)
# ----------------------------------------------------------------------------


def _read_parquet(p):
    """A small summary table as pandas, or None when it is absent or unreadable (a Path or a URI)."""
    import pyarrow.parquet as pq

    if not fs.is_file(str(p)):
        return None
    try:
        return pq.read_table(fs.open_input(str(p)) if isinstance(p, str) else p).to_pandas()
    except Exception:  # a half-written or foreign file: report without it
        return None


def _field(name):
    import pyarrow.compute as pc

    return pc.field(name)


def _primary(ds, record: JobRecord, clusters, layer=None, method=None) -> tuple[str | None, str | None]:
    """The (layer, method) the report shows: given > the scan's > the job's first > the data's first."""
    import pyarrow.compute as pc

    names = ds.schema.names
    if "layer" not in names or "method" not in names:
        return None, None
    asked_layer, asked_method = layer, method
    if layer is None and clusters is not None and "layer" in clusters and len(clusters):
        layer = clusters["layer"].dropna().iloc[0] if clusters["layer"].notna().any() else None
    if method is None and clusters is not None and "method" in clusters and len(clusters):
        method = clusters["method"].dropna().iloc[0] if clusters["method"].notna().any() else None
    spec_methods = list(record.spec.explain.methods) if record.spec is not None else []
    if method is None and spec_methods:
        method = spec_methods[0]
    if layer is None and record.layers:
        layer = record.layers[0]
    # check against the data (first fragment with rows is enough to find a default)
    pairs = set()
    for frag in ds.get_fragments():
        t = frag.to_table(columns=["layer", "method"], filter=pc.field("layer").is_valid())
        if t.num_rows:
            pairs = set(zip(t.column("layer").to_pylist(), t.column("method").to_pylist()))
            break
    if not pairs:
        return layer, method
    layers = sorted({p[0] for p in pairs})
    methods = sorted({p[1] for p in pairs})
    if asked_layer is not None and asked_layer not in layers:  # a user's choice is never replaced silently
        raise AuditError(f"layer {asked_layer!r} is not in the records; layers: {', '.join(layers)}")
    if asked_method is not None and asked_method not in methods:
        raise AuditError(f"method {asked_method!r} is not in the records; methods: {', '.join(methods)}")
    if layer not in layers:
        layer = layers[0]
    if method not in methods:
        method = "gradcam" if "gradcam" in methods else methods[0]
    return layer, method


def _read_light(ds, layer, method):
    """Light columns of the primary (layer, method) rows, with the fragment each came from."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = ds.schema.names
    cols = [c for c in _LIGHT if c in names] + [c for c in names if c.startswith("energy_") and c not in _LIGHT]
    flt = None
    if layer is not None:
        flt = (pc.field("layer") == layer) & (pc.field("method") == method)
    tables = []
    for i, frag in enumerate(ds.get_fragments()):
        t = frag.to_table(columns=cols, filter=flt, schema=ds.schema)
        if t.num_rows:
            tables.append(t.append_column("_frag", pa.array(np.full(t.num_rows, i, np.int32))))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def _read_errors(ds, limit=200):
    import pyarrow.compute as pc

    names = ds.schema.names
    if "status" not in names:
        return 0, []
    cols = [c for c in ("image_id", "path", "label_name", "error") if c in names]
    t = ds.to_table(columns=cols, filter=pc.field("status") == "error")
    df = t.to_pandas()
    if "image_id" in df:
        df = df.drop_duplicates("image_id")
    return len(df), df.head(limit).to_dict("records")


def _fetch_maps(ds, light, idx, layer, method) -> dict:
    """Raw maps of the rows ``idx`` of ``light``: :func:`_row_key` -> (h, w) float32, file by file.

    Keyed by image and explained class: a multi-label image has a row (and a
    map) per label above 0.5.
    """
    import pyarrow.compute as pc

    if "cam" not in ds.schema.names or not len(idx):
        return {}
    frags = list(ds.get_fragments())
    sub = light.loc[idx, ["image_id", "_frag"]]
    wanted = {_row_key(light, i) for i in idx}
    out = {}
    for fi, ids in sub.groupby("_frag")["image_id"]:
        flt = pc.field("image_id").isin(list(ids))
        if layer is not None:
            flt = flt & (pc.field("layer") == layer) & (pc.field("method") == method)
        cols = [c for c in ("image_id", "target", "cam", "cam_h", "cam_w") if c in ds.schema.names]
        t = frags[int(fi)].to_table(columns=cols, filter=flt, schema=ds.schema)
        for row in t.to_pylist():
            key = _key(row["image_id"], row.get("target") if "target" in light else None)
            a = _cam_array(row)
            if a is not None and key in wanted:
                out[key] = a
    return out


def _cam_array(row: dict):
    """A record's map as (h, w) float32; a square one when cam_h x cam_w does not fit; None if unusable."""
    cam, h, w = row.get("cam"), row.get("cam_h"), row.get("cam_w")
    if cam is None:
        return None
    a = np.asarray(cam, np.float32)
    if not h or not w or h * w != a.size:
        side = int(round(math.sqrt(a.size)))
        if side * side != a.size:
            return None
        h = w = side
    return a.reshape(int(h), int(w))


def _key(image_id, target) -> tuple:
    return (image_id, int(target) if _ok(target) else None)


def _row_key(light, i) -> tuple:
    """The key of row ``i`` of ``light`` in :func:`_fetch_maps`' result: (image_id, target)."""
    return _key(light.at[i, "image_id"], light.at[i, "target"] if "target" in light else None)


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


class _Images:
    """Original images by record path, cached, with a fallback search next to the dataset."""

    def __init__(self, bases):
        self.bases = [Path(b) for b in bases if b and not fs.is_uri(str(b))]  # record paths in a bucket are URIs
        self.cache = {}

    def get(self, row):
        path = row.get("path")
        if not path or not isinstance(path, str):
            return None
        if path in self.cache:
            return self.cache[path]
        img = None

        relative = not fs.is_uri(path) and not Path(path).is_absolute()
        candidates = [path] + [str(b / path) for b in self.bases if relative]
        for cand in candidates:
            try:
                img = query.original_image({"path": cand})
                break
            except Exception:  # not found / not decodable: try the next place, then show the map alone
                img = None
        if img is not None:
            img = viz.fit(img, max(THUMB, MEAN_SIZE))
        if len(self.cache) < 2000:
            self.cache[path] = img
        return img


def _square(img, size):
    import cv2

    return cv2.resize(np.asarray(img), (size, size), interpolation=cv2.INTER_AREA)


def _overlay_pic(img, map01, size=THUMB):
    """JET overlay on the image, or the heatmap alone when the image is unavailable."""
    if img is None:
        return viz.colorize(viz.resize_map(map01, (size, size)))
    return viz.overlay_image(viz.fit(img, size), map01)


def _overlay_uri(img, map01, size=THUMB):
    return viz.data_uri(_overlay_pic(img, map01, size), "jpeg", 82)


def _mean_map(maps, size=32):
    """Mean of normalised maps on a common grid (maps may have different shapes)."""
    if not maps:
        return None
    acc = np.zeros((size, size), np.float64)
    for m in maps:
        acc += viz.resize_map(viz.normalize(m), (size, size))
    return (acc / len(maps)).astype(np.float32)


def _table_maps(df, keys):
    """{key tuple: mean map} from a summary table's ``mean_map`` (+ ``map_h``/``map_w``) columns."""
    if df is None or not len(df):
        return {}
    col = next((c for c in ("mean_map", "map", "mean_cam") if c in df), None)
    if col is None:
        return {}
    out = {}
    for _, r in df.iterrows():
        v = r[col]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        a = np.asarray(v, np.float32)
        if a.ndim == 1:
            h = int(r["map_h"]) if "map_h" in r and _ok(r["map_h"]) else int(round(math.sqrt(a.size)))
            w = int(r["map_w"]) if "map_w" in r and _ok(r["map_w"]) else a.size // max(h, 1)
            if h * w != a.size or not a.size:
                continue
            a = a.reshape(h, w)
        out[tuple(r.get(k) for k in keys)] = a
    return out


def _cue_box(img, box):
    """Draw the scan's cue box ([x0, y0, x1, y1] fractions) on a picture, white with a dark edge."""
    import cv2

    if img is None or box is None:
        return img
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return img
    h, w = img.shape[:2]
    p0 = (int(round(x0 * (w - 1))), int(round(y0 * (h - 1))))
    p1 = (int(round(x1 * (w - 1))), int(round(y1 * (h - 1))))
    img = img.copy()
    cv2.rectangle(img, p0, p1, (30, 30, 30), 3)
    cv2.rectangle(img, p0, p1, (255, 255, 255), 1)
    return img


def _ok(v) -> bool:
    if v is None:
        return False
    try:
        return not (isinstance(v, float) and math.isnan(v))
    except TypeError:
        return True


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


@dataclass
class _Ctx:
    ds: object
    light: object
    layer: str | None
    method: str | None
    images: _Images
    rng: np.random.Generator
    names: dict = field(default_factory=dict)  # class id -> name

    def class_name(self, cid) -> str:
        return self.names.get(int(cid), str(int(cid))) if _ok(cid) else "?"


def _items(ctx: _Ctx, rows, maps, note=None):
    """Gallery items (overlay + caption) for the rows of ``light`` given by index."""
    out = []
    for i in rows:
        r = ctx.light.loc[i].to_dict()
        m = maps.get(_row_key(ctx.light, i))
        if m is None:
            continue
        img = ctx.images.get(r)
        pred = r.get("pred_name") if _ok(r.get("pred_name")) else r.get("pred") if _ok(r.get("pred")) else None
        if pred is None:  # multi-label: no label above 0.5; the map explains the most probable one
            pred = f"none above 0.5 (top {ctx.class_name(r.get('target'))})"
        label = r.get("label_name") if _ok(r.get("label_name")) else r.get("label")
        score = _num(r.get("score"))
        eo = _num(r.get("energy_object"))
        sub = []
        if _ok(label):
            sub.append(f"label {label}")
        if eo is not None:
            sub.append(f"on object {eo:.0%}")
        eb = _num(r.get("energy_border"))
        if eb is not None:
            sub.append(f"border {eb:.0%}")
        if note:
            sub.append(note(r))
        out.append({
            "uri": _overlay_uri(img, viz.normalize(m)),
            "caption": f"{pred}" + (f" {score:.2f}" if score is not None else ""),
            "sub": " · ".join(s for s in sub if s),
            "wrong": r.get("correct") is False or r.get("correct") is np.False_,
            "title": str(r.get("path") or r.get("image_id")),
            "no_image": img is None,
        })
    return out


def _class_column(light):
    """The column that groups records into classes, as the scan does: ``target``
    (the explained class), else label when most rows have one, else pred."""
    if "target" in light and light["target"].notna().mean() >= 0.5:
        return "target", None
    if "label" in light and light["label"].notna().mean() >= 0.5:
        return "label", "label_name"
    return "pred", "pred_name"


def _class_table(classes, light, names_by_id):
    """Rows of the class table, suspects first, then by suspicion."""
    rows = []
    if classes is not None and len(classes):
        for _, r in classes.iterrows():
            d = {k: (None if not _ok(v) else v) for k, v in r.to_dict().items()}
            rows.append(d)
    elif light is not None:
        col, _ = _class_column(light)
        for cid, g in light.groupby(col, dropna=True):
            d = {"class_id": int(cid), "class_name": names_by_id.get(int(cid), str(cid)), "n": len(g),
                 "verdict": "not scanned", "suspicion": None, "evidence": ""}
            if "correct" in g and g["correct"].notna().any():
                d["accuracy"] = float(g["correct"].dropna().astype(float).mean())
            for c in ("energy_object", "energy_border"):
                if c in g and g[c].notna().any():
                    d[c] = float(g[c].mean())
            rows.append(d)
    for d in rows:
        d.setdefault("class_name", names_by_id.get(d.get("class_id"), str(d.get("class_id"))))
        d["suspect"] = d.get("verdict") == SUSPECT
        d["cost"] = cost_sentence(d)
        d["bar"] = max(0.0, min(1.0, _num(d.get("suspicion")) or 0.0))
    rows.sort(key=lambda d: (not d["suspect"], -(_num(d.get("suspicion")) or -1.0), str(d.get("class_name"))))
    return rows


def _sample(ctx, idx, k):
    idx = list(idx)
    if len(idx) <= k:
        return idx
    return sorted(ctx.rng.choice(idx, size=k, replace=False).tolist())


def _size_of(r):
    """Cluster size: ``n`` (scan contract) or ``size``."""
    for k in ("n", "size"):
        v = _num(r.get(k))
        if v is not None:
            return v
    return None


def _class_sections(ctx, table, clusters, class_maps, cluster_maps, max_classes, max_examples):
    """One section per class (suspects first): mean picture, clusters, galleries of examples."""
    light = ctx.light
    col, _ = _class_column(light)
    ok = light["status"].eq("ok") if "status" in light else np.ones(len(light), bool)
    has_examples = clusters is not None and "example_ids" in clusters
    sections = []
    for d in table[:max_classes]:
        cid = d.get("class_id")
        in_class = (light[col] == cid) if cid is not None else np.zeros(len(light), bool)
        sample = _sample(ctx, light.index[in_class & ok], max(4 * max_examples, 48))
        cl = clusters[clusters["class_id"] == cid] if clusters is not None and "class_id" in clusters else None
        # the suspect clusters' own examples (scan's example_ids), else sampled members
        wanted = list(sample)
        if has_examples and cl is not None:
            ids = {i for v in cl["example_ids"] if v is not None for i in list(v)}
            wanted += [i for i in light.index[in_class & light["image_id"].isin(ids)] if i not in set(sample)]
        maps = _fetch_maps(ctx.ds, light, wanted, ctx.layer, ctx.method)
        sample = [i for i in sample if _row_key(light, i) in maps]
        cmaps = {k[1]: v for k, v in cluster_maps.items() if k[0] == cid}
        sec = dict(d, anchor=f"class-{cid}", n_members=int(np.sum(in_class)))
        mean_img = _mean_picture(sec, ctx, sample, maps, class_maps.get((cid,)), cmaps, cl)
        sec["clusters"] = _cluster_rows(cl, cmaps, mean_img, has_examples)
        suspects = [c for c in sec["clusters"] if c["suspect"]]
        sec["more_galleries"] = max(0, len(suspects) - MAX_GALLERIES)
        sec["galleries"] = _cluster_galleries(ctx, suspects[:MAX_GALLERIES], wanted, sample, maps, cmaps,
                                              max_examples)
        if d["suspect"] and not sec["galleries"] and sample:
            sec["galleries"].append({"title": "examples", "note": "a random sample of the class",
                                     "items": _items(ctx, sample[:max_examples], maps)})
        sections.append(sec)
    return sections


def _mean_picture(sec: dict, ctx, sample, maps, class_map, cmaps, cl):
    """Fill the section's mean image and mean-map overlay; returns the mean image (or None)."""
    light = ctx.light
    imgs = [ctx.images.get(light.loc[i].to_dict()) for i in sample[:32]]
    imgs = [_square(im, MEAN_SIZE).astype(np.float64) for im in imgs if im is not None]
    mean_img = np.uint8(np.mean(imgs, axis=0)) if imgs else None
    if class_map is not None:
        mean_map, mean_src = class_map, "the scan's mean over the class"
    elif cmaps and cl is not None and len(cl):
        sizes = {r["cluster"]: _size_of(r) or 0.0 for _, r in cl.iterrows()}
        tot = sum(sizes.get(k, 0) for k in cmaps)
        mean = sum(viz.resize_map(viz.normalize(m), (32, 32)) * sizes.get(k, 0) for k, m in cmaps.items())
        mean_map = (mean / tot) if tot else _mean_map(list(cmaps.values()))
        mean_src = "size-weighted mean of the scan's clusters"
    else:
        mean_map = _mean_map([maps[_row_key(light, i)] for i in sample])
        mean_src = f"mean of a sample of {len(sample)} maps"
    sec["mean_src"] = mean_src
    sec["mean_image"] = viz.data_uri(mean_img, "jpeg", 85) if mean_img is not None else None
    sec["mean_overlay"] = None
    if mean_map is not None:
        pic = _overlay_pic(mean_img, viz.normalize(mean_map), MEAN_SIZE)
        sec["mean_overlay"] = viz.data_uri(_cue_box(pic, sec.get("cue_box")), "jpeg", 85)
    return mean_img


def _cluster_rows(cl, cmaps, mean_img, has_examples) -> list[dict]:
    """The class's clusters for the template, suspects first, then by size."""
    if cl is None or not len(cl):
        return []
    total = sum(_size_of(r) or 0.0 for _, r in cl.iterrows())
    rows = sorted((r for _, r in cl.iterrows()), key=lambda r: (r.get("verdict") != SUSPECT, -(_size_of(r) or 0.0)))
    out = []
    for r in rows:
        m = cmaps.get(r.get("cluster"))
        size = _size_of(r)
        share = _num(r.get("share")) if "share" in r else None
        if share is None and size is not None and total:
            share = size / total
        pic = _overlay_pic(mean_img, viz.normalize(m), THUMB) if m is not None else None
        out.append({
            "cluster": r.get("cluster"), "size": int(size) if size is not None else None,
            "share": share,
            "verdict": r.get("verdict") if _ok(r.get("verdict")) else "",
            "evidence": r.get("evidence") if _ok(r.get("evidence")) else "",
            "suspicion": _num(r.get("suspicion")),
            "suspect": r.get("verdict") == SUSPECT,
            "uri": viz.data_uri(_cue_box(pic, r.get("cue_box")), "jpeg", 85) if pic is not None else None,
            "examples": list(r.get("example_ids")) if has_examples and r.get("example_ids") is not None
            else None,
        })
    return out


def _cluster_galleries(ctx, suspects, wanted, sample, maps, cmaps, max_examples) -> list[dict]:
    """A gallery per suspect cluster: the scan's examples, else sampled members nearest its mean map."""
    light = ctx.light
    galleries = []
    for c in suspects:
        if c["examples"]:
            by_id = {light.at[i, "image_id"]: i for i in wanted}
            rows = [by_id[e] for e in c["examples"] if e in by_id]
            note = "the scan's examples of this cluster"
        elif c["cluster"] in cmaps and sample:
            assign = _assign(maps, light, sample, cmaps)
            rows = sorted((i for i, (k, _) in assign.items() if k == c["cluster"]), key=lambda i: -assign[i][1])
            note = "sampled members nearest to the cluster's mean map"
        else:
            continue
        galleries.append({
            "title": f"cluster {c['cluster']}" + (f" ({c['size']} images)" if c["size"] else ""),
            "note": note, "items": _items(ctx, rows[:max_examples], maps),
        })
    return galleries


TESTS_SHOWN = 6  # causal tests listed per class: object, background and the places that flipped most


def _add_tests(sections, tests) -> None:
    """Each class section's causal tests (its own sample): the object and background tests and the
    places that flipped most of its predictions, with the same place's rate on the other classes."""
    for sec in sections:
        sec["tests"] = []
        if tests is None or "class_id" not in tests:
            continue
        own = tests[(tests["class_id"] == sec.get("class_id")) & tests["cluster"].isna()]
        fixed = own[own["test"] != "region"]
        places = own[own["test"] == "region"].sort_values(["flip_rate", "area"], ascending=[False, True],
                                                          na_position="last")
        for _, r in list(fixed.iterrows()) + list(places.head(TESTS_SHOWN - len(fixed)).iterrows()):
            sec["tests"].append({"test": r["test"], "place": r["place"], "fill": r["fill"], "n": int(r["n"]),
                                 "flip_rate": _num(r["flip_rate"]), "others": _num(r.get("flip_rate_others")),
                                 "transplant": _num(r.get("transplant_rate"))})


def _assign(maps, light, rows, cmaps, size=16):
    """row -> (cluster, cosine similarity) of its normalised map to the nearest cluster mean."""
    keys = list(cmaps)
    C = np.stack([viz.resize_map(viz.normalize(cmaps[k]), (size, size)).ravel() for k in keys])
    C /= np.linalg.norm(C, axis=1, keepdims=True) + 1e-9
    out = {}
    for i in rows:
        v = viz.resize_map(viz.normalize(maps[_row_key(light, i)]), (size, size)).ravel()
        v = v / (np.linalg.norm(v) + 1e-9)
        s = C @ v
        j = int(np.argmax(s))
        out[i] = (keys[j], float(s[j]))
    return out


def _doubtful(ctx, max_examples):
    light = ctx.light
    ok = light["status"].eq("ok") if "status" in light else np.ones(len(light), bool)
    out = []
    if "correct" in light and light["correct"].notna().any():
        wrong = light[ok & light["correct"].eq(False)]
        n_wrong = len(wrong)
        if "score" in wrong:
            wrong = wrong.sort_values("score", ascending=False, kind="stable")
        rows = list(wrong.index[:max_examples])
        maps = _fetch_maps(ctx.ds, light, rows, ctx.layer, ctx.method)
        out.append({"title": "Confidently wrong", "count": n_wrong,
                    "note": f"{n_wrong} wrong predictions; the most confident first",
                    "items": _items(ctx, rows, maps)})
    if "energy_object" in light and light["energy_object"].notna().any():
        cand = light[ok & light["energy_object"].notna()].sort_values("energy_object", kind="stable")
        rows = list(cand.index[:max_examples])
        maps = _fetch_maps(ctx.ds, light, rows, ctx.layer, ctx.method)
        out.append({"title": "Least attention on the object", "count": len(cand),
                    "note": "share of the heatmap's energy inside the object mask or box, lowest first",
                    "items": _items(ctx, rows, maps)})
    elif "energy_border" in light and light["energy_border"].notna().any():
        cand = light[ok & light["energy_border"].notna()].sort_values("energy_border", ascending=False,
                                                                       kind="stable")
        rows = list(cand.index[:max_examples])
        maps = _fetch_maps(ctx.ds, light, rows, ctx.layer, ctx.method)
        out.append({"title": "Most attention on the border", "count": len(cand),
                    "note": "no object masks: the maps with the most energy in the outer 10% band",
                    "items": _items(ctx, rows, maps)})
    return out


def _fmt_time(t):
    try:
        return _dt.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OSError):
        return None


def write_report(out_dir, *, max_examples: int = 12, max_classes: int = 24, seed: int = 0,
                 layer: str | None = None, method: str | None = None, dest=None) -> Path:
    """Write ``report.html`` for the job output ``out_dir`` and return its path.

    ``max_examples``: overlays per gallery; ``max_classes``: classes with
    pictures (suspects first; the table lists every class); ``seed``: the
    sampling seed; ``layer``/``method``: which maps to show (default: the
    scan's, else the job's first); ``dest``: the folder to write it in
    (created; default ``out_dir``, e.g. another one when OUT is read-only).

    Raises:
        AuditError: not a job output, an unknown layer or method, or the
            report cannot be written (read-only or full destination).
    """
    out, under = _output_location(out_dir)
    ds = query.records_dataset(out)
    if "image_id" not in ds.schema.names:
        raise AuditError(f"{out}/records has no image_id column: not an audit job output")
    record = read_job_record(out) or JobRecord(spec=None)
    classes = _read_parquet(under("summary", "classes.parquet"))
    clusters = _read_parquet(under("summary", "clusters.parquet"))

    notes = [f"Warning: {partial}." for partial in [completeness(out)] if partial]
    if classes is None:
        notes.append("No scan summary (summary/classes.parquet): run `audit scan OUT` for verdicts and clusters.")
    else:
        notes.append(provenance.report_line(out))
    layer, method = _primary(ds, record, clusters, layer, method)
    light = _read_light(ds, layer, method)
    n_errors, error_rows = _read_errors(ds)
    names_by_id = _class_names(record, light)
    if light is None:
        table, sections, doubtful = _class_table(classes, None, names_by_id), [], []
    else:
        light = light.reset_index(drop=True)
        bases = [record.spec.dataset.path if record.spec is not None else None,
                 None if isinstance(out, str) else out.parent, Path.cwd()]
        ctx = _Ctx(ds, light, layer, method, _Images(bases), np.random.default_rng(seed), names_by_id)
        table = _class_table(classes, light, names_by_id)
        sections = _class_sections(ctx, table, clusters, _table_maps(classes, ("class_id",)),
                                   _table_maps(clusters, ("class_id", "cluster")), max_classes, max_examples)
        _add_tests(sections, _read_parquet(under("summary", "interventions.parquet")))
        doubtful = _doubtful(ctx, max_examples)
        galleries = [g for s in sections for g in s["galleries"]] + doubtful
        if any(it["no_image"] for g in galleries for it in g["items"]):
            notes.append("Some original images could not be read (moved, or not on this machine): "
                         "their heatmaps are shown alone.")
    header = _header(record, out, ds, light, table, n_errors, layer, method)
    if len(table) > max_classes:
        notes.append(f"Pictures for the first {max_classes} of {len(table)} classes (suspects first); "
                     "`audit report OUT --max-classes N` shows more.")
    columns = [(k, title, kind) for k, title, kind in _TABLE_COLUMNS if any(_ok(d.get(k)) for d in table)]
    html = _render({"job": header, "classes": table, "columns": columns, "sections": sections, "doubtful": doubtful,
                    "errors": {"count": n_errors, "rows": error_rows}, "notes": notes,
                    "max_examples": max_examples})
    return _write_html(html, Path(dest) if dest is not None else out)


def _output_location(out_dir):
    """(OUT as a Path or URI string, a function joining parts under it); a missing OUT is one line."""
    remote = fs.is_uri(str(out_dir))
    out = str(out_dir) if remote else Path(out_dir)
    if not (fs.exists(out) if remote else out.is_dir()):
        raise AuditError(f"job output not found: {out}")

    def under(*parts):
        return fs.join(out, *parts) if remote else out.joinpath(*parts)

    return out, under


def _class_names(record: JobRecord, light) -> dict:
    """Class id -> name: the job's classes, then any label names the records carry."""
    names_by_id = dict(enumerate(record.class_names))
    if light is not None and "label" in light and "label_name" in light:
        for cid, nm in light[["label", "label_name"]].dropna().drop_duplicates("label").itertuples(index=False):
            names_by_id.setdefault(int(cid), nm)
    return names_by_id


def _header(record: JobRecord, out, ds, light, table, n_errors, layer, method) -> dict:
    """The report's job header: model, dataset, counts, the view shown, timings, versions."""
    job, spec = record.raw, record.spec
    summary = job.get("summary") or {}
    flat = int(light["status"].eq("flat").sum()) if light is not None and "status" in light else None
    acc = None
    if light is not None and "correct" in light and light["correct"].notna().any():
        acc = float(light["correct"].dropna().astype(float).mean())
    model = job.get("model") or {}
    return {
        "name": job.get("name") or (spec.name if spec is not None else None)
        or (out.name if isinstance(out, Path) else str(out)),
        "model": model.get("path") or model.get("application") or (spec.model.path if spec is not None else None)
        or "?",
        "sha256": (model.get("sha256") or "")[:12],
        "dataset": (spec.dataset.path if spec is not None else None) or "?",
        "format": spec.dataset.format if spec is not None else None,
        "images": summary.get("images") or ((0 if light is None else len(light)) + n_errors),
        "rows": ds.count_rows(),
        "errors": n_errors,
        "flat": flat,
        "accuracy": acc if acc is not None else summary.get("accuracy"),
        "layer": layer, "method": method,
        "layers": record.layers or ([layer] if layer else []),
        "methods": (list(spec.explain.methods) if spec is not None else []) or ([method] if method else []),
        "status": job.get("status"),
        "started": _fmt_time((job.get("timings") or {}).get("started")),
        "seconds": (job.get("timings") or {}).get("run_s"),
        "generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "n_classes": len(table),
        "n_suspect": sum(d["suspect"] for d in table),
        "versions": job.get("versions") or {},
    }


def _write_html(html: str, folder):
    """``folder/report.html`` written atomically; a write that fails is one line naming the folder.

    ``folder`` may be a URI: the report is then one PUT into the bucket.
    """
    if isinstance(folder, str) and fs.is_uri(folder):
        path = fs.join(folder, "report.html")
        fs.write_bytes(path, html.encode("utf-8"))
        return path
    path = folder / "report.html"
    tmp = path.with_suffix(".html.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise cannot_write(path, e, "write the report elsewhere with --out DIR") from None
    return path


def _render(ctx) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.path("audit.templates", ""))),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.ChainableUndefined,
    )

    def pct(v, digits=0):
        v = _num(v)
        return "–" if v is None else f"{v * 100:.{digits}f}%"

    def num(v, digits=2):
        v = _num(v)
        return "–" if v is None else f"{v:.{digits}f}"

    env.filters["pct"] = pct
    env.filters["num"] = num
    return env.get_template("report.html.j2").render(**ctx)
