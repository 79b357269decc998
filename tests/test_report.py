"""``audit report``: a self-contained page from a synthetic job output, rendered in headless Chromium."""

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.cli import main
from audit.data.schema import records_schema
from audit.errors import AuditError
from audit.review.report import write_report

CLASSES = ["no_tank", "tank"]
H = W = 8  # map size
IMG = 32  # image size


def _map(kind, rng):
    """A raw map: attention in the top band (sky), on the centre (object) or nowhere (flat)."""
    m = rng.random((H, W)).astype(np.float32) * 0.1
    if kind == "sky":
        m[:3] += 1.0
    elif kind == "object":
        m[3:6, 3:6] += 1.0
    elif kind == "flat":
        m[:] = 0.0
    return m


def make_out(root: Path, n_per_class=12, n_errors=2, summary=True, images=True, seed=0, shards=2):
    """A job output as audit run + audit scan would write it (records, job.json, summary)."""
    rng = np.random.default_rng(seed)
    out = root / "out"
    (out / "records").mkdir(parents=True)
    data = root / "data"
    schema = records_schema(regions=("sky",))
    rows = []
    k = 0
    for label, cname in enumerate(CLASSES):
        for i in range(n_per_class):
            rel = f"{cname}/{i:04d}.png"
            path = data / rel
            if images:
                path.parent.mkdir(parents=True, exist_ok=True)
                img = np.full((IMG, IMG, 3), (90, 140, 200) if i % 2 else (120, 120, 120), np.uint8)
                img[:10] = (235, 200, 120) if label else (60, 60, 70)  # sky: sunny vs cloudy
                cv2.circle(img, (16, 20), 6, (40, 90, 30) if label else (100, 80, 60), -1)
                cv2.imwrite(str(path), img)
            kind = "sky" if (label == 1 and i < n_per_class * 2 // 3) else "object"
            if i == n_per_class - 1:
                kind = "flat"
            pred = label if i % 5 else 1 - label
            for method in ("gradcam", "gradcam++"):
                m = _map(kind, rng)
                rows.append({
                    "image_id": rel, "path": str(path), "shard": k % shards, "label": label,
                    "label_name": cname, "pred": pred, "pred_name": CLASSES[pred],
                    "score": float(0.55 + 0.4 * rng.random()), "correct": pred == label, "target": pred,
                    "layer": "conv_out", "method": method, "cam": m.ravel().tolist(), "cam_h": H, "cam_w": W,
                    "status": "flat" if kind == "flat" else "ok", "error": None, "width": IMG, "height": IMG,
                    "has_mask": True,
                    "energy_object": None if kind == "flat" else (0.1 if kind == "sky" else 0.8) + 0.05 * rng.random(),
                    "energy_border": None if kind == "flat" else (0.6 if kind == "sky" else 0.1),
                    "energy_sky": None if kind == "flat" else (0.7 if kind == "sky" else 0.1),
                    "_kind": kind,  # not a column: what the scan would find
                })
            k += 1
    for e in range(n_errors):
        rows.append({"image_id": f"tank/broken{e}.png", "path": str(data / f"tank/broken{e}.png"), "shard": 0,
                     "label": 1, "label_name": "tank", "status": "error", "error": "cannot decode: truncated PNG"})
    for s in range(shards):
        part = [r for r in rows if r["shard"] == s]
        cols = {f.name: [r.get(f.name) for r in part] for f in schema}
        pq.write_table(pa.table(cols, schema=schema), out / "records" / f"part-{s:05d}.parquet")
    job = {
        "job_id": "abc123", "name": "tank-sky", "status": "ok",
        "spec": {"name": "tank-sky", "model": {"path": "models/tank_sky.keras"},
                 "dataset": {"format": "folder", "path": str(data), "classes": CLASSES},
                 "explain": {"methods": ["gradcam", "gradcam++"], "layers": "auto"}},
        "model": {"path": "models/tank_sky.keras", "sha256": "f" * 64},
        "classes": CLASSES, "layers": ["conv_out"],
        "versions": {"shortcut-audit": "0.1.0", "tensorflow": "2.21"},
        "timings": {"started": 1.7e9, "run_s": 12.5},
        "summary": {"images": 2 * n_per_class + n_errors, "errors": n_errors},
    }
    (out / "job.json").write_text(json.dumps(job))
    if summary:
        _write_summary(out, rows, n_per_class, rng, legacy=summary == "legacy")
    return out


def _write_summary(out, rows, n_per_class, rng, legacy=False):
    """summary/classes.parquet and clusters.parquet as `audit scan` writes them (a subset of the
    columns of schemas/classes.schema.json and clusters.schema.json; the report must cope).
    ``legacy``: no class mean map, no example_ids, ``size`` instead of ``n``."""
    (out / "summary").mkdir()
    sky, obj = _map("sky", rng), _map("object", rng)
    flist = pa.list_(pa.float32())
    classes = {
        "class_id": pa.array([1, 0], pa.int32()), "class_name": ["tank", "no_tank"],
        "n": pa.array([n_per_class] * 2, pa.int64()), "accuracy": pa.array([0.8, 0.8], pa.float32()),
        "recall": pa.array([0.75, 0.85], pa.float32()),
        "suspicion": pa.array([0.83, 0.05], pa.float32()), "verdict": ["shortcut_suspected", "ok"],
        "evidence": ["67% of the attention sits in 'sky' (0.0-0.4 of the height), not on the tank",
                     "attention on the object (78% of energy)"],
        "cue": ["region:sky", "object"],
        "cue_box": pa.array([[0.0, 0.0, 1.0, 0.4], None], flist),
        "flip_rate_cue": pa.array([0.61, 0.02], pa.float32()),
        "flip_rate_object": pa.array([0.05, 0.4], pa.float32()),
        "energy_object": pa.array([0.35, 0.8], pa.float32()), "energy_border": pa.array([0.45, 0.1], pa.float32()),
        "layer": ["conv_out"] * 2, "method": ["gradcam"] * 2,
    }
    if not legacy:
        mixed = (2 * sky + obj) / 3
        classes |= {"mean_map": pa.array([mixed.ravel().tolist(), obj.ravel().tolist()], flist),
                    "map_h": pa.array([H, H], pa.int32()), "map_w": pa.array([W, W], pa.int32())}
    pq.write_table(pa.table(classes), out / "summary" / "classes.parquet")
    sky_ids = sorted({r["image_id"] for r in rows if r.get("target") == 1 and r.get("_kind") == "sky"})
    n_sky = n_per_class * 2 // 3
    clusters = {
        "class_id": pa.array([0, 1, 1], pa.int32()), "cluster": pa.array([0, 0, 1], pa.int32()),
        ("size" if legacy else "n"): pa.array([n_per_class, n_sky, n_per_class - n_sky], pa.int64()),
        "mean_map": pa.array([obj.ravel().tolist(), sky.ravel().tolist(), obj.ravel().tolist()], flist),
        "map_h": pa.array([H] * 3, pa.int32()), "map_w": pa.array([W] * 3, pa.int32()),
        "verdict": ["ok", "shortcut_suspected", "ok"], "suspicion": pa.array([0.05, 0.9, 0.1], pa.float32()),
        "evidence": ["on the object", "attention on the sky band", "on the object"],
        "cue_box": pa.array([None, [0.0, 0.0, 1.0, 0.4], None], flist),
        "layer": ["conv_out"] * 3, "method": ["gradcam"] * 3,
    }
    if not legacy:
        clusters["share"] = pa.array([1.0, n_sky / n_per_class, 1 - n_sky / n_per_class], pa.float32())
        clusters["example_ids"] = pa.array([[], sky_ids[:12], []], pa.list_(pa.string()))
    pq.write_table(pa.table(clusters), out / "summary" / "clusters.parquet")


def _data_uris(html):
    return re.findall(r'src="(data:image/(?:png|jpeg);base64,[^"]+)"', html)


def _decode(uri):
    data = base64.b64decode(uri.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = make_out(tmp_path_factory.mktemp("rep"))
    path = write_report(out, max_examples=6)
    return out, path, path.read_text()


def test_report_is_self_contained_and_every_image_decodes(report):
    out, path, html = report
    assert path == out / "report.html"
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    uris = _data_uris(html)
    assert len(srcs) == len(uris) > 10  # every picture inline, nothing fetched
    assert "http://" not in html and "https://" not in html
    for u in uris:
        img = _decode(u)
        assert img is not None and img.shape[0] >= 32 and img.astype(float).var() > 10


def test_report_content_suspects_first(report):
    _, _, html = report
    # the header
    assert "tank-sky" in html and "models/tank_sky.keras" in html and "ffffffffffff" in html
    assert "conv_out" in html
    # class table sorted by suspicion: tank (suspect) before no_tank
    table = html[html.index('id="classes"'):html.index("</table>")]
    assert table.index("<b>tank</b>") < table.index("<b>no_tank</b>")
    assert "shortcut suspected" in table and "sits in &#39;sky&#39;" in table
    assert "61%" in table and "83%" not in table  # flip rate cue as a percentage; suspicion as 0.83
    assert "0.83" in table
    # per-class sections: suspect first, with a gallery for the suspect cluster
    assert html.index('id="class-1"') < html.index('id="class-0"')
    sec = html[html.index('id="class-1"'):html.index('id="class-0"')]
    assert "mean heatmap" in sec and "cluster 0" in sec and "attention on the sky band" in sec
    assert "the scan&#39;s mean over the class" in sec
    assert len(_data_uris(sec)) >= 2 + 2 + 3
    # doubtful examples and errors
    assert "Confidently wrong" in html and "Least attention on the object" in html
    assert html.count("tank/broken") == 2 and "cannot decode: truncated PNG" in html
    assert ">2</div><div class=\"k\">unreadable images" in html


def _gallery_titles(html):
    sec = html[html.index('id="class-1"'):html.index('id="class-0"')]
    gal = sec[sec.index('class="gallery"'):]
    return sec, re.findall(r'<img src="data:[^"]+" alt="([^"]+)"', gal)


def test_gallery_shows_the_suspect_clusters_examples(report):
    """The overlays under the suspect cluster are the scan's example_ids (sky images tank/0000..0007)."""
    _, _, html = report
    sec, titles = _gallery_titles(html)
    assert "the scan&#39;s examples of this cluster" in sec
    assert 1 <= len(titles) <= 6
    for t in titles:
        assert re.search(r"tank/000[0-7][.]png$", t), t


def test_gallery_without_example_ids_uses_nearest_members(tmp_path):
    out = make_out(tmp_path, summary="legacy")
    sec, titles = _gallery_titles(write_report(out, max_examples=6).read_text())
    assert "sampled members nearest to the cluster" in sec and "size-weighted mean" in sec
    assert 1 <= len(titles) <= 6
    for t in titles:
        assert re.search(r"tank/000[0-7][.]png$", t), t


def test_report_without_summary_or_images(tmp_path):
    out = make_out(tmp_path, n_per_class=6, summary=False, images=False)
    html = write_report(out, max_examples=4).read_text()
    assert "run `audit scan OUT`" in html
    assert "not scanned" in html
    assert "heatmaps are shown alone" in html
    for u in _data_uris(html):  # heatmaps alone, still valid pictures
        assert _decode(u) is not None


def test_report_size_is_bounded_by_sampling(tmp_path):
    small = make_out(tmp_path / "a", n_per_class=10)
    big = make_out(tmp_path / "b", n_per_class=300, shards=6)
    s1 = write_report(small, max_examples=6).stat().st_size
    s2 = write_report(big, max_examples=6).stat().st_size
    assert s2 < 2.5 * s1 and s2 < 1_500_000


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(AuditError, match="job output not found"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("audit: error:") and "records" in err[0]


def test_cli_report(report, capsys):
    out = report[0]
    assert main(["report", str(out), "--max-examples", "3"]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    # a layer or method the records do not have is an error, not a silent fallback
    for args, words in ((["--layer", "nope"], "layer 'nope' is not in the records; layers: conv_out"),
                        (["--method", "cam"], "method 'cam' is not in the records; methods: gradcam, gradcam++")):
        assert main(["report", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("audit: error: ") and words in err[0], (args, err)


# ----------------------------------------------------------------------------
# Headless Chromium: it renders, every image loads, the screenshot is not blank
# ----------------------------------------------------------------------------

CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var p = document.createElement('p');
  p.id = 'img-check';
  p.textContent = 'IMAGES ' + imgs.length + ' BROKEN ' + bad.length;
  document.body.appendChild(p);
});
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def _run_chromium(exe, *args, timeout=90):
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HOME": profile})


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (CI installs Debian's chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    _, path, html = report
    n_imgs = len(re.findall(r"<img ", html))
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    r = _run_chromium(exe, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    m = re.search(r"IMAGES (\d+) BROKEN (\d+)", r.stdout)
    assert m, f"chromium did not run the check: rc={r.returncode} {r.stderr[-800:]}"
    assert int(m.group(1)) == n_imgs > 10
    assert int(m.group(2)) == 0, "some images did not load"
    shot = tmp_path / "shot.png"
    r = _run_chromium(exe, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars",
                      path.as_uri())
    assert shot.is_file(), f"no screenshot: rc={r.returncode} {r.stderr[-800:]}"
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (2000, 1280)
    assert img.astype(float).var() > 200, "the screenshot is blank"
    # the dark header band is there (the page was styled, not raw text)
    assert img[:40].mean() < 90


def test_multilabel_rows_show_their_own_class_map_and_no_label_caption(tmp_path):
    """A multi-label image has a row per explained label: each class shows its own map, and a row
    with no label above 0.5 (null pred) is captioned as such, not as 'nan'."""
    from audit.data.query import records_dataset
    from audit.review.report import _fetch_maps, _read_light, _row_key

    out = make_out(tmp_path, n_per_class=6, n_errors=0, summary=False, images=False)
    schema = records_schema(regions=("sky",))
    rng = np.random.default_rng(1)
    maps = {0: _map("object", rng), 1: _map("sky", rng)}
    rows = [{"image_id": "tank/ml.png", "path": "tank/ml.png", "shard": 2, "label": 1, "label_name": "tank",
             "pred": None if t == 0 else 1, "pred_name": None if t == 0 else "tank", "score": 0.99 - 0.5 * t,
             "correct": False, "target": t, "layer": "conv_out", "method": "gradcam",
             "cam": maps[t].ravel().tolist(), "cam_h": H, "cam_w": W, "status": "ok", "width": IMG,
             "height": IMG, "has_mask": False} for t in (0, 1)]
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    pq.write_table(pa.table(cols, schema=schema), out / "records" / "part-00002.parquet")
    ds = records_dataset(out)
    light = _read_light(ds, "conv_out", "gradcam").reset_index(drop=True)
    idx = list(light.index[light.image_id == "tank/ml.png"])
    got = _fetch_maps(ds, light, idx, "conv_out", "gradcam")
    assert sorted(got) == [("tank/ml.png", 0), ("tank/ml.png", 1)]
    for i in idx:
        np.testing.assert_array_equal(got[_row_key(light, i)], maps[int(light.at[i, "target"])])
    html = write_report(out, max_examples=40).read_text()
    assert "none above 0.5 (top no_tank)" in html and ">nan " not in html


def test_an_incomplete_output_is_named_in_the_report(tmp_path):
    out = make_out(tmp_path, n_per_class=6)
    assert "incomplete output" not in write_report(out, max_examples=4).read_text()
    job = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**job, "status": "interrupted", "shards": {"total": 16}}))
    html = write_report(out, max_examples=4).read_text()
    assert "Warning: incomplete output: 0 of 16 shards committed (the job was interrupted)" in html
    assert "audit run SPEC --resume" in html
