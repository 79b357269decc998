"""The output is plain Parquet: DuckDB and Polars read it as is and agree with audit.load."""

from __future__ import annotations

import duckdb
import helpers_jobs as h
import numpy as np
import pandas as pd
import polars as pl
import pytest

import audit
from audit.data import datasets, io
from audit.runner.spec import load_spec
from audit.runner.worker import AuditWorker


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Two committed shards (in-process worker, no Ray): 8 images, one unreadable, 2 methods."""
    tmp = tmp_path_factory.mktemp("interop")
    model = h.make_model(tmp / "model.keras")
    root, masks = h.make_folder(tmp / "data", n_per_class=4)
    (tmp / "data" / "cat" / "zero.png").write_bytes(b"")
    spec = load_spec({
        "model": {"path": model, "preprocess": "scale_0_1"},
        "dataset": {"format": "folder", "path": root, "masks": masks, "shard_size": 5},
        "explain": {"methods": ["gradcam", "gradcam++"], "regions": {"sky": [0, 0, 1, 0.4]}},
        "resources": {"batch_size": 4, "decode_threads": 2},
        "output": str(tmp / "out"),
    })
    plan = datasets.plan(spec.dataset)
    assert len(plan.shards) == 2
    io.prepare_output(spec.output, resume=False)
    w = AuditWorker(spec, job_id="interop", classes=plan.classes)
    for s in plan.shards:
        w.process_shard(s)
    w.close()
    return spec.output


def test_duckdb_reads_records_as_is(out):
    ref = audit.load(out).sort_values(["image_id", "method"], na_position="first").reset_index(drop=True)
    glob = f"{out}/records/*.parquet"
    con = duckdb.connect()
    got = con.execute(
        f"SELECT image_id, method, status, error, energy_object, energy_sky, pointing_hit, cam, cam_h, cam_w "
        f"FROM read_parquet('{glob}') ORDER BY image_id, method NULLS FIRST").df()
    assert len(got) == len(ref) == 1 + 8 * 2
    assert got.image_id.tolist() == ref.image_id.tolist()
    assert got.status.tolist() == ref.status.tolist()
    np.testing.assert_array_equal(got.energy_object.to_numpy(float), ref.energy_object.to_numpy(float))
    np.testing.assert_array_equal(got.energy_sky.to_numpy(float), ref.energy_sky.to_numpy(float))
    ok = ref.status == "ok"
    for a, b in zip(got.cam[ok], ref.cam[ok]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    err = got[got.status == "error"].iloc[0]
    assert err.image_id == "cat/zero.png" and "empty" in err.error and pd.isna(err.method)
    # SQL on the list column and the nullable bool
    bad = con.execute(f"SELECT count(*) FROM read_parquet('{glob}') "
                      f"WHERE status = 'ok' AND len(cam) <> cam_h * cam_w").fetchone()[0]
    assert bad == 0
    hits = con.execute(f"SELECT method, avg(pointing_hit::INT) FROM read_parquet('{glob}') "
                       f"WHERE status = 'ok' GROUP BY method ORDER BY method").fetchall()
    want = ref[ok].assign(h=ref.pointing_hit[ok].astype(float)).groupby("method").h.mean()
    assert [m for m, _ in hits] == list(want.index)
    np.testing.assert_allclose([v for _, v in hits], want.to_numpy(), rtol=1e-12)
    # the file metadata written by the job is visible too
    keys = {r[0] for r in con.execute(f"SELECT DISTINCT decode(key) FROM parquet_kv_metadata('{glob}')").fetchall()}
    assert {"shortcut_audit.job_id", "shortcut_audit.schema_version", "shortcut_audit.shard"} <= keys


def test_polars_reads_records_as_is(out):
    ref = audit.load(out)
    lf = pl.scan_parquet(f"{out}/records/*.parquet")
    df = lf.collect()
    assert df.height == len(ref)
    assert df.schema["cam"] == pl.List(pl.Float32) and df.schema["pointing_hit"] == pl.Boolean
    by_class = (lf.filter(pl.col("status") == "ok").group_by("label_name", "method")
                .agg(pl.col("energy_border").mean().alias("border"), pl.len().alias("n"))
                .sort("label_name", "method").collect())
    want = (ref[ref.status == "ok"].groupby(["label_name", "method"])
            .energy_border.agg(["mean", "size"]).reset_index())
    assert by_class["label_name"].to_list() == want.label_name.tolist()
    assert by_class["n"].to_list() == want["size"].tolist()
    np.testing.assert_allclose(by_class["border"].to_numpy(), want["mean"].to_numpy(), rtol=1e-6)
    row = df.filter((pl.col("image_id") == "dog/img_002.png") & (pl.col("method") == "gradcam")).row(0, named=True)
    ref_row = ref[(ref.image_id == "dog/img_002.png") & (ref.method == "gradcam")].iloc[0]
    np.testing.assert_array_equal(np.asarray(row["cam"], np.float32), np.asarray(ref_row.cam, np.float32))
    assert df.filter(pl.col("status") == "error")["image_id"].to_list() == ["cat/zero.png"]
