"""summary/images.parquet read in bounded memory: the costs, `audit compare`'s join and `audit export`'s
metadata read only the columns and rows they need, a batch at a time, and give what a whole-table read gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data.schema import arrow_schema
from audit.scan import compare, cost, export
from audit.scan.perimage import Cue

SHARDS, PER_SHARD, WIDE = 24, 400, 96  # 9,600 rows; a long path and 96 floats of cue_pixels per row
CUE = Cue(1, "dog", "corner:bottom_right", "corner:bottom_right")
ROOT = Path(__file__).resolve().parents[1]


def _shard(s: int, rng, flip: float = 0.0) -> pa.Table:
    n = PER_SHARD
    ids = [f"c{i % 3}/img{s:03d}_{i:04d}.png" for i in range(n)]
    label, pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    decides = (rng.random(n) < 0.3) ^ (rng.random(n) < flip)
    status = np.where(rng.random(n) < 0.02, "error", "ok")
    cols = {"image_id": ids, "path": ["/data/" + "p" * 400 + i for i in ids], "shard": [s] * n, "label": label,
            "pred": pred, "correct": label == pred, "cue": [CUE.name] * n, "cue_class": [1] * n,
            "cue_place": [CUE.place] * n, "cue_area": rng.random(n), "cue_share": rng.random(n),
            "pred_without_cue": pred, "cue_decides": np.where(status == "ok", decides, None),
            "cue_present": rng.random(n) < 0.4, "cue_confidence": rng.random(n).astype(np.float32),
            "cue_pixels": list(rng.random((n, WIDE), np.float32)), "status": status}
    schema = arrow_schema("images")
    return pa.Table.from_pydict({k: cols.get(k, [None] * n) for k in schema.names}, schema=schema)


def _job(root: Path, seed: int, flip: float = 0.0) -> str:
    """A job output with only summary/images.parquet, written one row group per shard as the pass does."""
    (root / "summary").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(root / "summary" / "images.parquet", arrow_schema("images")) as w:
        for s in range(SHARDS):
            w.write_table(_shard(s, rng, flip))
    return str(root)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    return _job(d / "a", 0), _job(d / "b", 0, flip=0.1)


def _whole(out) -> pd.DataFrame:
    return pd.read_parquet(Path(out) / "summary" / "images.parquet")


def test_costs_streamed_equal_the_whole_table(jobs):
    a, _ = jobs
    assert cost.stored_costs(a, {1: "dog"}) == cost.costs_of(_whole(a), {1: "dog"})
    df = _whole(a)
    ok = df[df.status != "error"]
    own = ok[ok.label == 1]
    want = int((own.correct & own.cue_present).sum()), int(own.cue_present.sum())
    got = cost.stored_costs(a)[(1, CUE.name)].with_cue
    assert (got.k, got.n) == want and got.n > 0  # against a direct count


def test_compare_join_partitioned_equals_the_in_memory_join(jobs):
    a, b = jobs
    want = compare.image_changes(_whole(a), _whole(b))
    got = compare.stored_image_changes(a, b, max_rows=1000)  # 10 parts of each side, spilled and joined
    key = ["image_id", "cue"]
    assert len(want) > 100
    pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                  want.sort_values(key).reset_index(drop=True), check_dtype=False)
    same = compare.stored_image_changes(a, b)  # one part: no spill
    assert sorted(same.image_id) == sorted(want.image_id)


def test_export_metadata_streamed_equals_the_whole_table(jobs, tmp_path):
    a, _ = jobs
    target = export.Target(str(tmp_path / "exp"), False)
    n = export.write_metadata(a, [CUE], target)
    got = pd.read_csv(tmp_path / "exp" / "metadata.csv", keep_default_na=False)
    want = export.metadata(_whole(a), [CUE])
    assert n == len(want) == len(got)
    pd.testing.assert_frame_equal(got.sort_values("img_filename").reset_index(drop=True),
                                  want.sort_values("img_filename").reset_index(drop=True), check_dtype=False)


def test_readers_ask_pyarrow_for_the_needed_columns_only(jobs, monkeypatch):
    import pyarrow.dataset as pads

    asked = []
    real = pads.dataset

    class Spy:
        def __init__(self, *a, **k):
            self.d = real(*a, **k)
            self.schema = self.d.schema

        def to_batches(self, columns=None, filter=None, **k):
            asked.append((tuple(columns), filter is not None))
            return self.d.to_batches(columns=columns, filter=filter, **k)

    monkeypatch.setattr(pads, "dataset", Spy)
    a, b = jobs
    cost.stored_costs(a)
    compare.stored_image_changes(a, b)
    export.write_metadata(a, [CUE], export.Target(str(Path(a) / "x"), False))
    assert asked and all(cols and flt for cols, flt in asked)  # every read projected and filtered
    wanted = {c for cols, _ in asked for c in cols}
    assert not wanted & {"path", "cue_pixels", "cue_place", "cue_area"}, wanted


PEAK = """
import json, sys, tracemalloc
import pandas, pyarrow as pa, pyarrow.compute, pyarrow.dataset, pyarrow.parquet
from audit.scan import compare, cost
tracemalloc.start()  # after the imports: what the read itself allocates
a, b, what = sys.argv[1:4]
if what == "costs":
    cost.stored_costs(a)
else:
    compare.stored_image_changes(a, b, max_rows=1000)
print(json.dumps({"arrow": pa.default_memory_pool().max_memory(), "python": tracemalloc.get_traced_memory()[1]}))
"""


def _peak(what: str, a: str, b: str) -> int:
    """Peak bytes (Arrow's pool plus Python's allocations) of one read in a fresh process."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PEAK, a, b, what], capture_output=True,
                       text=True, env=env, timeout=120, check=True)
    p = json.loads(r.stdout.strip().splitlines()[-1])
    return int(p["arrow"]) + int(p["python"])


def test_reads_stay_far_below_the_table_in_memory(jobs):
    """The costs and the partitioned join peak at a small share of the table's size in memory."""
    a, b = jobs
    whole = pq.read_table(Path(a) / "summary" / "images.parquet").nbytes
    assert whole > 8e6  # ~9,600 rows x (a 420-byte path + 96 floats + ...)
    assert _peak("costs", a, b) < whole / 10
    assert _peak("join", a, b) < whole / 4
