"""The typed job spec: one validation, job.json written from it and read back into it (no Ray, no TF)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from audit.data import io
from audit.data.jobspec import DatasetSpec, JobRecord, JobSpec, ModelSpec, read_job_record, record_of
from audit.errors import AuditError
from audit.runner.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent / "audit"
SPEC_MODULES = {"audit/runner/spec.py", "audit/data/jobspec.py"}
SECTIONS = {"spec"}  # job.json's spec; its other entries ("dataset": counts, "model": sha) are facts


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"x")
    (tmp_path / "data" / "a").mkdir(parents=True)
    doc = {"model": {"path": "m.keras", "input_size": [32, 48]},
           "dataset": {"format": "folder", "path": "data", "shard_size": 8},
           "explain": {"regions": {"sky": [0, 0, 1, 0.4]}}, "output": "out"}
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_spec(p)


def test_load_spec_returns_typed_sections(spec):
    assert isinstance(spec, JobSpec) and isinstance(spec.model, ModelSpec) and isinstance(spec.dataset, DatasetSpec)
    assert spec.dataset.shard_size == 8 and spec.resources.batch_size == 64 and spec.model.size == (32, 48)
    assert spec.explain.regions == {"sky": [0, 0, 1, 0.4]} and spec.name == "job"
    assert spec["dataset"]["shard_size"] == 8 and spec.dataset.get("limit") is None  # dict-style, for scripts
    with pytest.raises(KeyError):
        spec.dataset["nope"]


def test_job_json_round_trip(spec, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    doc = {"job_id": "j1", "spec": spec.to_dict(), "classes": ["a"], "layers": ["conv2"],
           "input_size": [32, 48], "model": {"sha256": "abc"}}
    io.atomic_write_json(io.job_path(out), doc)
    rec = read_job_record(out)
    assert rec.spec == spec and rec.job_id == "j1" and rec.model_sha256 == "abc"
    assert rec.size == (32, 48) and rec.class_names == ["a"] and rec.layers == ["conv2"]
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()
    assert load_spec(spec.to_dict()) == spec
    assert read_job_record(tmp_path / "nowhere") is None


def test_an_older_job_json_gets_the_defaults_of_newer_keys(spec):
    old = spec.to_dict()
    del old["dataset"]["resize_masks"], old["resources"]["max_retries"]
    rec = record_of({"spec": old})
    assert rec.spec == spec and rec.spec.dataset.resize_masks is False
    assert record_of({"spec": {"model": 3}}).spec is None  # unusable: no spec, not a crash


def test_size_and_classes_are_decided_once(spec):
    assert JobRecord(spec=spec).size == (32, 48)  # the spec's input_size
    assert JobRecord(spec=spec, input_size=(8, 8)).size == (8, 8)  # what the actors found wins
    bare = JobSpec.coerce({"model": {"path": "m"}, "dataset": {"format": "folder", "path": "d", "classes": ["x"]}})
    assert JobRecord(spec=bare).size is None and JobRecord(spec=bare).class_names == ["x"]
    assert JobRecord(spec=None).size is None and JobRecord(spec=None).class_names == []


def test_from_dict_is_strict(spec):
    d = spec.to_dict()
    d["dataset"]["colour"] = "red"
    with pytest.raises(AuditError, match="unknown key dataset.colour"):
        JobSpec.from_dict(d)


def _spec_reads(path: Path) -> list[str]:
    """``x.get("spec"|"dataset"|...)``, ``x["spec"|...]``, ``spec.get(...)`` and ``spec[...]`` in one module."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            owner = ast.unparse(node.func.value)
            key = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            if key in SECTIONS or owner.split(".")[-1].endswith("spec"):
                bad.append(f"{path}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key = node.slice.value if isinstance(node.slice, ast.Constant) else None
            owner = ast.unparse(node.value)
            if key in SECTIONS or owner.split(".")[-1].endswith("spec"):
                bad.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    return bad


def test_no_dict_reads_of_the_spec_outside_the_spec_modules():
    bad = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).as_posix()
        if rel not in SPEC_MODULES:
            bad += _spec_reads(f)
    assert bad == [], "read the typed spec (spec.dataset.path), not a dict:\n" + "\n".join(bad)


def test_the_checker_sees_dict_reads(tmp_path):
    p = tmp_path / "m.py"
    p.write_text('a = spec.get("model")\nb = job["spec"]\nc = self.spec["dataset"]\nd = x.get("spec", {})\n'
                 'e = spec.dataset.path\nf = row.get("path")\nrecord["resources"] = 1\n')
    assert len(_spec_reads(p)) == 4
