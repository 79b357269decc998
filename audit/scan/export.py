"""``audit export``: group labels, cue masks and a counterfactual dataset from the per-image evidence.

From ``OUT/summary/images.parquet`` (:mod:`audit.scan.imagepass`) into ``DIR``:

* ``groups``: ``DIR/metadata.csv`` in the layout the public Group DRO, JTT
  and DFR code reads (``img_filename, y, split, place``) plus ``cue`` and
  ``confidence`` (:func:`metadata`);
* ``masks``: ``DIR/masks/<image file name>.png``, the cue pixels of every
  image that carries a cue, at the image's own resolution (0 or 255);
* ``counterfactual``: ``DIR/counterfactual/manifest.csv`` and its images: each
  image carrying a cue with the cue removed by the causal test's edit, and a
  sample of other classes' images with the cue pasted in, with their
  provenance; a ``manifest`` dataset that ``audit run`` reads.

``DIR`` may be a bucket URI.  Nothing there is overwritten without ``force``.
"""

from __future__ import annotations

import io as _io
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from audit.data import fs
from audit.errors import AuditError
from audit.scan import imagetable, perimage
from audit.scan.imagepass import CueWorker, pass_spec, read_summary
from audit.scan.probes.edits import replace_background

WHAT = ("groups", "masks", "counterfactual")
PASTE = 64  # other classes' images per cue that receive it in the counterfactual set
SPLITS = (60, 80)  # crc32(image_id) % 100 below 60: split 0 (train), below 80: 1 (val), else 2 (test)
META_HEADER = ["img_filename", "y", "split", "place", "cue", "confidence"]
TARGETS = {"groups": "metadata.csv", "masks": "masks", "counterfactual": "counterfactual"}


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    to: str
    what: tuple
    rows: int = 0  # metadata.csv rows
    masks: int = 0
    removed: int = 0  # counterfactual images with the cue removed
    pasted: int = 0  # ... with the cue pasted in
    written: list = field(default_factory=list)


def split_of(image_id: str) -> int:
    """0 train, 1 val, 2 test: a fixed split by CRC32 of the image id (60/20/20)."""
    k = zlib.crc32(str(image_id).encode()) % 100
    return 0 if k < SPLITS[0] else (1 if k < SPLITS[1] else 2)


def metadata(images_df, cues: list):
    """One row per image: ``img_filename, y, split, place, cue, confidence``.

    ``place`` is 0 for an image without a cue, else the 1-based index of the
    first cue (in ``cues`` order) it carries (``cue_present``); with one cue,
    0/1 like Waterbirds' ``place``.  ``confidence``: 1 where the cue decides
    the prediction, else the presence detector's probability (``cue_confidence``;
    the cue's share of the heatmap where no detector ran), and 1 minus the
    largest of those for an image without a cue.
    """
    import pandas as pd

    if images_df is None or not len(images_df):
        return pd.DataFrame(columns=META_HEADER)
    df = images_df[images_df["status"] != "error"] if "status" in images_df else images_df
    order = {c.name: k + 1 for k, c in enumerate(cues)}
    df = df.assign(_k=df["cue"].map(order).fillna(len(order) + 1))
    share = df["cue_share"].astype(float).fillna(0.0)
    if "cue_confidence" in df:  # the presence detector's probability, where it ran
        share = df["cue_confidence"].astype(float).fillna(share)
    conf = np.where(df["cue_decides"].fillna(False).astype(bool), 1.0, share)
    df = df.assign(_conf=conf, _share=share).sort_values(["image_id", "_k"], kind="stable")
    first = df.drop_duplicates("image_id").set_index("image_id")
    pres = df[df["cue_present"].fillna(False).astype(bool)].drop_duplicates("image_id").set_index("image_id")
    ids = first.index
    has = ids.isin(pres.index)
    p = pres.reindex(ids)
    out = pd.DataFrame({
        "img_filename": ids, "y": first["label"].astype("Float64").fillna(-1).astype(int).to_numpy(),
        "split": [split_of(i) for i in ids], "place": np.where(has, p["_k"].fillna(0), 0).astype(int),
        "cue": np.where(has, p["cue"].astype(object).fillna("").astype(str), ""),
        "confidence": np.where(has, p["_conf"], 1.0 - df.groupby("image_id")["_share"].max().reindex(ids)).astype(float)})
    return out.reset_index(drop=True)[META_HEADER]


def file_name(image_id: str, suffix: str = ".png") -> str:
    """A relative file name after an image id (``cat/x.jpg`` -> ``cat/x.png``; a URI id: its base name)."""
    s = str(image_id)
    if "://" in s or s.startswith("/"):
        s = s.rsplit("/", 1)[-1]
    parts = [p for p in PurePosixPath(s.replace("\\", "/")).parts if p not in ("..", ".", "/")]
    stem = PurePosixPath(*parts) if parts else PurePosixPath("image")
    return str(stem.with_suffix(suffix))


def png(img: np.ndarray) -> bytes:
    import cv2

    a = np.asarray(img)
    ok, buf = cv2.imencode(".png", a[..., ::-1] if a.ndim == 3 else a)
    if not ok:
        raise AuditError("cannot encode a PNG")
    return buf.tobytes()


def paste(recipients: np.ndarray, donors: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Copies of ``recipients`` with the ``pixels`` ((N, H, W) bool) taken from ``donors`` in turn."""
    out = np.array(recipients)
    for i in range(len(out)):
        d = donors[i % len(donors)]
        out[i][pixels[i]] = d[pixels[i]]
    return out


class Target:
    """The export folder (local or a bucket): refuses to overwrite without ``force``."""

    def __init__(self, to: str, force: bool):
        self.to, self.force, self.remote = str(to), force, fs.is_uri(str(to))

    def path(self, rel: str) -> str:
        return fs.join(self.to, rel) if self.remote else str(PurePosixPath(self.to) / rel)

    def claim(self, what) -> None:
        """Refuse (or, with force, clear) what the export would overwrite."""
        for w in what:
            p = self.path(TARGETS[w])
            if not fs.exists(p):
                continue
            if not self.force:
                raise AuditError(f"{p} exists; export elsewhere, or replace it with --force")
            self._remove(p)

    def _remove(self, p: str) -> None:
        import shutil

        if not self.remote:
            shutil.rmtree(p) if fs.exists(p) and not fs.is_file(p) else fs.delete(p)
            return
        if fs.is_file(p):
            fs.delete(p)
            return
        for rel, _ in fs.list_files(p):
            fs.delete(fs.join(p, rel))

    def write(self, rel: str, data: bytes) -> None:
        import os

        p = self.path(rel)
        if not self.remote:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        fs.write_bytes(p, data)

    def stream(self, rel: str):
        """A binary output stream of ``rel`` (a local file, or one bucket object complete when closed)."""
        import os

        p = self.path(rel)
        if not self.remote:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            return open(p, "wb")
        fsys, key = fs.resolve(p)
        return fsys.open_output_stream(key)


def csv_bytes(df, header: bool = True) -> bytes:
    buf = _io.StringIO()
    df.to_csv(buf, index=False, header=header)
    return buf.getvalue().encode()


def export(out, to, what=WHAT, *, force: bool = False, paste_n: int = PASTE, quiet: bool = False) -> ExportResult:
    """Write group labels, cue masks and a counterfactual dataset of a job output into ``to``.

    Args:
        out: a job output whose per-image pass ran (``summary/images.parquet``).
        to: the export folder or bucket URI.
        what: any of :data:`WHAT`.
        force: replace what an earlier export left in ``to``.
        paste_n: other classes' images per cue that get it pasted in.
        quiet: print nothing.

    Returns:
        An :class:`ExportResult`.

    Raises:
        AuditError: no per-image evidence, an unknown item, or an existing file without ``force``.
    """
    what = tuple(what)
    bad = [w for w in what if w not in WHAT]
    if bad or not what:
        raise AuditError(f"unknown export item {bad[0] if bad else ''!r}; expected some of {', '.join(WHAT)}")
    imagetable.require(out, "images")
    cues = _cues(out)
    target = Target(to, force)
    target.claim(what)
    res = ExportResult(str(to), what)
    if "groups" in what:
        res.rows = write_metadata(out, cues, target)
    if "masks" in what or "counterfactual" in what:
        _images_out(out, cues, target, what, res, paste_n)
    if not quiet:
        print(describe(res))
    return res


META_COLUMNS = ["image_id", "label", "cue", "cue_share", "cue_confidence", "cue_decides", "cue_present"]


def write_metadata(out, cues: list, target: Target) -> int:
    """``metadata.csv`` (:func:`metadata`) written one shard at a time (an image's rows for every cue lie in
    its shard), images by id within a shard; returns its rows."""
    n = 0
    with target.stream(TARGETS["groups"]) as f:
        f.write(csv_bytes(metadata(None, cues)))
        for _, df in imagetable.by_shard(out, META_COLUMNS, imagetable.ok_rows()):
            meta = metadata(df, cues)
            f.write(csv_bytes(meta, header=False))
            n += len(meta)
    return n


def _cues(out) -> list:
    """The cues of the images table, in the order of the scan (classes.parquet), with their edits."""
    cues = perimage.cues_of(read_summary(out, "classes"), read_summary(out, "interventions"))
    named = imagetable.cue_names(out)
    cues = [c for c in cues if c.name in named]
    if not cues:
        raise AuditError(f"the cues of {out}/summary/images.parquet are no longer the scan's: rerun "
                         f"`audit scan {out} --per-image`")
    return cues


def _images_out(out, cues, target: Target, what, res: ExportResult, paste_n: int) -> None:
    """Masks and cue-removed images shard by shard, then the pasted sample; the counterfactual manifest."""
    import pyarrow.compute as pc

    worker = CueWorker(pass_spec(out, cues))
    rows = []
    carriers = imagetable.ok_rows() & (pc.field("cue_present") == True)  # noqa: E712 (an Arrow expression)
    for shard, present in imagetable.by_shard(out, ["image_id", "cue"], carriers):
        recs = worker.read_records(int(shard))
        recs = recs[recs["image_id"].isin(set(present["image_id"])) & (recs["status"] != "error")]
        recs = recs.reset_index(drop=True)
        if len(recs):
            rows += _shard_images(worker, recs, present, cues, target, what, res)
    if "counterfactual" in what:
        rows += _pasted(worker, out, cues, target, res, paste_n)
        _manifest(target, rows)


def _shard_images(worker, recs, present, cues, target: Target, what, res: ExportResult) -> list:
    """Masks at each image's resolution and the images with their cues removed (manifest rows)."""
    import cv2

    x = worker.inputs(recs)
    has = {c.name: set(present.loc[present["cue"] == c.name, "image_id"]) for c in cues}
    union = np.zeros(x.images.shape[:3], bool)
    edited = np.array(x.images)
    used = [[] for _ in range(len(recs))]
    for cue in cues:
        sel = recs["image_id"].isin(has[cue.name]).to_numpy()
        if not sel.any():
            continue
        px = worker.pixels(cue, x)
        union[sel] |= px[sel]
        edited[sel] = perimage.remove_cue(edited[sel], cue, px[sel], None if x.objects is None else x.objects[sel],
                                          x.levels)
        for i in np.nonzero(sel)[0]:
            used[i].append(cue.name)
    rows = []
    for i, r in enumerate(recs.itertuples()):
        if "masks" in what:
            h, w = int(getattr(r, "height", 0) or 0), int(getattr(r, "width", 0) or 0)
            m = union[i].astype(np.uint8) * 255
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) if h > 0 and w > 0 else m
            target.write(f"masks/{file_name(r.image_id)}", png(m))
            res.masks += 1
        if "counterfactual" in what:
            name = f"images/removed-{res.removed:06d}.png"
            target.write(f"counterfactual/{name}", png(edited[i]))
            res.removed += 1
            rows.append((name, _label(r), str(r.image_id), "cue removed", "+".join(used[i])))
    return rows


def _label(r) -> int:
    v = getattr(r, "label", None)
    return int(v) if v is not None and v == v else -1


def _pasted(worker, out, cues, target: Target, res: ExportResult, paste_n: int) -> list:
    """A sample of other classes' images without the cue, with the cue of a carrying image pasted in."""
    rows = []
    for cue in cues:
        if cue.kind == "transform":  # a recolouring or texture has no pixels to carry over
            continue
        d, r = _paste_pairs(out, cue, paste_n)
        if not len(d) or not len(r):
            continue
        rx = worker.inputs(_with_maps(worker, r))
        dx = worker.inputs(_with_maps(worker, d))
        px = worker.pixels(cue, rx)
        if cue.kind == "background":  # the recipient's object on a carrying image's background
            new = replace_background(rx.images, rx.objects, dx.images)[0] if rx.objects is not None else None
        else:
            new = paste(rx.images, dx.images, px)
        if new is None:
            continue
        for i, (rid, did, lab) in enumerate(zip(r["image_id"], np.resize(d["image_id"].to_numpy(), len(r)), r["label"])):
            name = f"images/pasted-{res.pasted:06d}.png"
            target.write(f"counterfactual/{name}", png(new[i]))
            res.pasted += 1
            rows.append((name, int(lab), str(rid), f"cue pasted from {did}", cue.name))
    return rows


def _paste_pairs(out, cue, paste_n: int):
    """(donors, recipients) of ``cue``: images of its class that carry it, and images of other labels that do
    not, the ``paste_n`` of each with the smallest CRC32 of their id (file order breaks ties), donors cut to
    the recipients' number; read a batch at a time."""
    import pyarrow.compute as pc

    donors, recipients = _Smallest(paste_n), _Smallest(paste_n)
    where = imagetable.ok_rows() & (pc.field("cue") == cue.name)
    for df in imagetable.batches(out, ["image_id", "shard", "label", "cue_present"], where):
        has = df["cue_present"].fillna(False).astype(bool)
        donors.add(df[has & (df["label"] == cue.class_id)])
        recipients.add(df[~has & (df["label"] != cue.class_id) & df["label"].notna()])
    r = recipients.rows()
    return donors.rows().iloc[:len(r)].reset_index(drop=True), r


class _Smallest:
    """The ``k`` rows with the smallest CRC32 of ``image_id`` seen so far, ties in the order seen."""

    def __init__(self, k: int):
        self.k, self.seen, self.kept = int(k), 0, None

    def add(self, df) -> None:
        import pandas as pd

        if not len(df):
            return
        df = df.assign(_crc=[zlib.crc32(str(i).encode()) for i in df["image_id"]],
                       _seq=np.arange(self.seen, self.seen + len(df)))
        self.seen += len(df)
        both = df if self.kept is None else pd.concat([self.kept, df], ignore_index=True)
        self.kept = both.sort_values(["_crc", "_seq"], kind="stable").iloc[:self.k]

    def rows(self):
        import pandas as pd

        if self.kept is None:
            return pd.DataFrame(columns=["image_id", "shard", "label"])
        return self.kept.drop(columns=["_crc", "_seq"]).reset_index(drop=True)


def _with_maps(worker, sel):
    """The records (with maps) of the images of ``sel`` (rows of images.parquet), in its order."""
    import pandas as pd

    parts = [worker.read_records(int(s)) for s in sorted(set(sel["shard"]))]
    recs = pd.concat(parts, ignore_index=True).drop_duplicates("image_id").set_index("image_id", drop=False)
    return recs.loc[list(sel["image_id"])].reset_index(drop=True)


def _manifest(target: Target, rows: list) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=["path", "label", "source_id", "provenance", "cue"])
    target.write("counterfactual/manifest.csv", csv_bytes(df))


def describe(res: ExportResult) -> str:
    parts = []
    if "groups" in res.what:
        parts.append(f"{res.rows:,} rows in metadata.csv")
    if "masks" in res.what:
        parts.append(f"{res.masks:,} cue masks in masks/")
    if "counterfactual" in res.what:
        parts.append(f"{res.removed:,} images with the cue removed and {res.pasted:,} with it pasted in, "
                     "counterfactual/manifest.csv")
    return f"exported to {res.to}: " + "; ".join(parts)
