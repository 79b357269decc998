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
SECTION_NAMES = {"model", "dataset", "explain", "resources"}
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



def test_a_section_is_not_a_dict(spec):
    """No dict paths left: a section is read by attribute only, and the entry points take the typed spec."""
    from audit.data import datasets
    from audit.runner.worker import AuditWorker

    ds = spec.dataset  # (the name keeps the checker below from flagging these deliberate reads)
    with pytest.raises(TypeError):
        ds["path"]  # noqa: B018
    with pytest.raises(TypeError):
        _ = "path" in ds
    assert not hasattr(ds, "get") and not hasattr(spec, "get") and not hasattr(spec, "__getitem__")
    with pytest.raises(TypeError, match="DatasetSpec.from_partial"):
        datasets.plan(spec.dataset.to_dict())
    with pytest.raises(TypeError, match="JobSpec.from_partial"):
        AuditWorker(spec.to_dict())
    with pytest.raises(TypeError, match="JobSpec or DatasetSpec"):
        datasets.load_images({"dataset": spec.dataset.to_dict()}, ["a"], (8, 8))
    partial = DatasetSpec.from_partial({"path": "d", "shard_size": 3, "colour": "red"})  # unknown keys ignored
    assert partial == DatasetSpec(path="d", shard_size=3)


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
    bare = JobSpec.from_partial({"model": {"path": "m"}, "dataset": {"format": "folder", "path": "d", "classes": ["x"]}})
    assert JobRecord(spec=bare).size is None and JobRecord(spec=bare).class_names == ["x"]
    assert JobRecord(spec=None).size is None and JobRecord(spec=None).class_names == []


def test_from_dict_is_strict(spec):
    d = spec.to_dict()
    d["dataset"]["colour"] = "red"
    with pytest.raises(AuditError, match="unknown key dataset.colour"):
        JobSpec.from_dict(d)


def _is_section(owner: str) -> bool:
    """``spec.dataset``, ``self.spec.model``, ``load_spec(p).explain``, ...: a section of a spec."""
    head, _, last = owner.rpartition(".")
    return last in SECTION_NAMES and head.split(".")[-1].split("(")[0].endswith("spec")


def _spec_reads(path: Path, sections_only: bool = False) -> list[str]:
    """Dict reads of the spec in one module: ``x.get("spec")``, ``x["spec"]``, ``spec.get(...)``,
    ``spec[...]``, and a section's ``spec.dataset[...]`` / ``spec.dataset.get(...)``.

    ``sections_only``: only the reads of a section (tests and bench scripts hold
    plain dicts named ``spec`` before they load them).
    """
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            owner, arg = ast.unparse(node.func.value), node.args[0] if node.args else None
            key = arg.value if isinstance(arg, ast.Constant) else None
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            owner, key = ast.unparse(node.value), node.slice.value if isinstance(node.slice, ast.Constant) else None
        else:
            continue
        dict_read = key in SECTIONS or owner.split(".")[-1].endswith("spec")
        if _is_section(owner) or (dict_read and not sections_only):
            bad.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    return bad


def test_no_dict_reads_of_the_spec_outside_the_spec_modules():
    bad = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).as_posix()
        if rel not in SPEC_MODULES:
            bad += _spec_reads(f)
    assert bad == [], "read the typed spec (spec.dataset.path), not a dict:\n" + "\n".join(bad)


def test_no_section_read_as_a_dict_in_tests_or_bench():
    bad = []
    for folder in ("tests", "bench"):
        for f in sorted((ROOT.parent / folder).rglob("*.py")):
            bad += _spec_reads(f, sections_only=True)
    assert bad == [], "read the typed spec (spec.dataset.path), not a dict:\n" + "\n".join(bad)


def test_the_checker_sees_dict_reads(tmp_path):
    p = tmp_path / "m.py"
    p.write_text('a = spec.get("model")\nb = job["spec"]\nc = self.spec["dataset"]\nd = x.get("spec", {})\n'
                 'e = spec.dataset.path\nf = row.get("path")\nrecord["resources"] = 1\n'
                 'g = spec.dataset["path"]\nh = self.spec.model.get("path")\ni = load_spec(x).explain["layers"]\n'
                 'j = keras.model["x"]\n')
    assert len(_spec_reads(p)) == 7
    assert [b.split(" ", 1)[1] for b in _spec_reads(p, sections_only=True)] == [
        "spec.dataset['path']", "self.spec.model.get('path')", "load_spec(x).explain['layers']"]
