"""Job specs: schema, validation messages, overrides, defaults, paths; resource planning (no Ray, no TF)."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from audit.data import resources
from audit.data.jobspec import ResourcesSpec
from audit.errors import AuditError
from audit.runner.job import _check_resumable, plan_resources
from audit.runner.spec import apply_overrides, fill_defaults, load_spec


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"not really a model")
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    doc = {"name": "t", "model": {"path": "m.keras"},
           "dataset": {"format": "folder", "path": "data"}, "output": "out"}
    return tmp_path, doc


def write(tmp_path, doc, name="job.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def err(spec, overrides=()):
    with pytest.raises(AuditError) as e:
        load_spec(spec, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_schema_ships_in_the_package():
    s = resources.schema("job")
    assert s["additionalProperties"] is False
    assert set(s["properties"]) == {"name", "model", "dataset", "explain", "resources", "output"}
    # the file is the one in schemas/ (source of truth)
    src = Path(__file__).parents[1] / "schemas" / "job.schema.json"
    assert json.loads(src.read_text()) == s


def test_defaults_and_relative_paths(ws, monkeypatch):
    tmp, doc = ws
    monkeypatch.chdir("/")
    spec = load_spec(write(tmp, doc))
    assert spec.model.path == str(tmp / "m.keras")
    assert spec.dataset.path == str(tmp / "data")
    assert spec.output == str(tmp / "out")
    assert spec.dataset.shard_size == 512
    assert spec.explain.to_dict() == {"methods": ["gradcam", "gradcam++"], "layers": "auto",
                                      "target": "predicted", "regions": {}, "token_grid": None}
    assert spec.resources.batch_size == 64 and spec.resources.actors == "auto"
    assert spec.model.trust_code is False and spec.model.preprocess == "none"
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()  # what job.json holds
    # idempotent on an already resolved spec (job.json["spec"], or the JobSpec itself)
    assert load_spec(spec.to_dict()) == spec and load_spec(spec) == spec


def test_paths_from_the_command_line_are_relative_to_the_cwd(ws, monkeypatch, tmp_path_factory):
    tmp, doc = ws
    elsewhere = tmp_path_factory.mktemp("cwd")
    (elsewhere / "other.keras").write_bytes(b"x")
    monkeypatch.chdir(elsewhere)
    spec = load_spec(write(tmp, doc), ["model.path=other.keras", "output=res/o"])
    assert spec.model.path == str(elsewhere / "other.keras")
    assert spec.output == str(elsewhere / "res" / "o")
    assert spec.dataset.path == str(tmp / "data")  # from the file: relative to the file


def test_name_defaults_to_file_stem(ws):
    tmp, doc = ws
    doc.pop("name")
    assert load_spec(write(tmp, doc, "my-audit.yaml")).name == "my-audit"


def test_overrides_are_yaml(ws):
    tmp, doc = ws
    spec = load_spec(write(tmp, doc), ["dataset.shard_size=64", "explain.layers=[conv1, conv2]",
                                       "explain.regions.sky=[0, 0, 1, 0.4]", "resources.actors=3",
                                       "explain.target=1", "name=other"])
    assert spec.dataset.shard_size == 64
    assert spec.explain.layers == ["conv1", "conv2"]
    assert spec.explain.regions == {"sky": [0, 0, 1, 0.4]}
    assert spec.resources.actors == 3 and spec.explain.target == 1
    assert spec.name == "other"
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("overrides, words", [
    (["dataset.shardsize=3"], ["unknown key 'dataset.shardsize'", "did you mean 'shard_size'"]),
    (["colour=red"], ["unknown key 'colour'", "expected one of: dataset, explain, model"]),
    (["explain.method=[gradcam]"], ["unknown key 'explain.method'", "methods"]),
    (["dataset.shard_size=abc"], ["dataset.shard_size", "an integer >= 1", "'abc'"]),
    (["dataset.shard_size=0"], ["dataset.shard_size", "an integer >= 1"]),
    (["dataset.format=csv"], ["dataset.format", "'folder', 'manifest', 'parquet', 'tfrecord'", "'csv'"]),
    (["explain.methods=[gradcam, gradcamxx]"], ["explain.methods[1]", "'gradcam++'", "'gradcamxx'"]),
    (["explain.layers=5"], ["explain.layers", "'auto' or a list of strings"]),
    (["explain.regions.sky=[0, 0, 1]"], ["explain.regions.sky", "a list of 4 numbers"]),
    (["explain.regions.Sky=[0, 0, 1, 1]"], ["explain.regions", "'Sky'"]),
    (["explain.regions.sky=[0.5, 0, 0.2, 1]"], ["explain.regions.sky", "x0 < x1"]),
    (["explain.token_grid=[7]"], ["explain.token_grid"]),
    (["explain.token_grid=[0, 7]"], ["explain.token_grid[0]", ">= 1"]),
    (["explain.token_grid=[1, 1]"], ["explain.token_grid", "one cell", "h x w > 1"]),
    (["resources.actors=none"], ["resources.actors", "'auto' or an integer >= 1"]),
    (["model.trust_code=maybe"], ["model.trust_code", "true or false"]),
    (["dataset.path=nowhere"], ["dataset.path", "not found"]),
    (["model.path=missing.keras"], ["model.path", "model file not found", "missing.keras"]),
    (["model.application=ResNet50"], ["exactly one of 'path'", "'application'"]),
    (["dataset"], ["--set expects key.path=value"]),
])
def test_errors_name_the_key_and_what_was_expected(ws, overrides, words):
    tmp, doc = ws
    msg = err(write(tmp, doc), overrides)
    for w in words:
        assert w in msg, (w, msg)


def test_missing_sections_and_bad_yaml(ws):
    tmp, doc = ws
    doc.pop("output")
    assert "missing required key 'output'" in err(write(tmp, doc))
    p = tmp / "bad.yaml"
    p.write_text("model: [unclosed\n")
    assert "not valid YAML" in err(p)
    assert "job spec not found" in err(tmp / "nope.yaml")
    p.write_text("- a list\n")
    assert "YAML mapping" in err(p)


def test_fill_defaults_keeps_given_values():
    doc = {"dataset": {"format": "parquet", "path": "x", "shard_size": 7}}
    out = fill_defaults(doc)
    assert out["dataset"]["shard_size"] == 7 and out["dataset"]["limit"] is None
    assert out["resources"]["max_retries"] == 3
    assert doc == {"dataset": {"format": "parquet", "path": "x", "shard_size": 7}}  # not mutated


def _res(**kw):
    """A spec holding only its resources (what plan_resources reads)."""
    return SimpleNamespace(resources=ResourcesSpec(**kw))


@pytest.mark.parametrize("res, cluster, shards, expected", [
    (_res(), {"CPU": 8}, 100, {"actors": 4, "cpus_per_actor": 2.0, "gpus_per_actor": 0.0}),
    (_res(), {"CPU": 2}, 100, {"actors": 1, "cpus_per_actor": 2.0, "gpus_per_actor": 0.0}),
    (_res(), {"CPU": 1}, 100, {"actors": 1, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0}),
    (_res(), {"CPU": 16, "GPU": 4}, 100, {"actors": 4, "cpus_per_actor": 1.0, "gpus_per_actor": 1.0}),
    (_res(actors=2), {"CPU": 2}, 100, {"actors": 2, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0}),
    (_res(actors=8), {"CPU": 8}, 3, {"actors": 3, "cpus_per_actor": 2.0, "gpus_per_actor": 0.0}),
    (_res(gpus_per_actor=0.5), {"CPU": 8, "GPU": 2}, 100, {"actors": 4, "cpus_per_actor": 1.0, "gpus_per_actor": 0.5}),
])
def test_plan_resources(res, cluster, shards, expected):
    nodes = [{"Alive": True, "Resources": {"CPU": cluster["CPU"]}}]
    got = asdict(plan_resources(res, cluster, nodes, shards))
    assert {k: got[k] for k in expected} == expected
    assert got["min_actors"] == 1 and got["grows"] == (res.resources.actors == "auto")


def test_plan_resources_refuses_impossible():
    nodes = [{"Alive": True, "Resources": {"CPU": 1}}, {"Alive": True, "Resources": {"CPU": 1}}]
    with pytest.raises(AuditError, match="largest node has 1 CPUs"):
        plan_resources(_res(cpus_per_actor=2), {"CPU": 2}, nodes, 10)
    with pytest.raises(AuditError, match="cluster has 0 GPUs"):
        plan_resources(_res(gpus_per_actor=1), {"CPU": 2}, nodes, 10)
    with pytest.raises(AuditError, match="no node has 'tpu_slot'"):
        plan_resources(_res(custom={"tpu_slot": 1}), {"CPU": 2}, nodes, 10)


@pytest.mark.parametrize("res, shards, expected", [
    # GPU workers that scale from zero: requested anyway, none refused
    (_res(gpus_per_actor=1), 100, {"actors": 1, "min_actors": 1, "gpus_per_actor": 1.0, "cpus_per_actor": 1.0}),
    (_res(actors=4, gpus_per_actor=1), 100, {"actors": 4, "min_actors": 1, "gpus_per_actor": 1.0}),
    (_res(actors={"min": 2, "max": 8}, gpus_per_actor=1), 100, {"actors": 8, "min_actors": 2}),
    (_res(actors={"min": 2, "max": 8}, gpus_per_actor=1), 3, {"actors": 3, "min_actors": 2}),
    (_res(actors={"min": 4, "max": 8}, gpus_per_actor=1), 3, {"actors": 3, "min_actors": 3}),
    (_res(actors={"max": 8}, custom={"tpu_slot": 1}), 100, {"actors": 8, "min_actors": 1, "gpus_per_actor": 0.0,
                                                          "cpus_per_actor": 1.0, "custom": {"tpu_slot": 1.0}}),
    (_res(cpus_per_actor=8), 100, {"actors": 1, "cpus_per_actor": 8.0}),
])
def test_plan_resources_on_a_cluster_that_can_grow(res, shards, expected):
    nodes = [{"Alive": True, "Resources": {"CPU": 2}}]
    got = asdict(plan_resources(res, {"CPU": 2}, nodes, shards, fixed=False))
    assert {k: got[k] for k in expected} == expected


def test_auto_cpus_per_actor_fits_on_one_node():
    nodes = [{"Alive": True, "Resources": {"CPU": 1}}] * 4
    got = plan_resources(_res(actors=1), {"CPU": 4}, nodes, 10, fixed=False)
    assert got.cpus_per_actor == 1.0  # not 4: no node has 4


def test_auto_pool_counts_custom_resources():
    from audit.runner.pool import Resources, auto_count, missing

    assert auto_count({"CPU": 8, "tpu_slot": 3}, 0.0, {"tpu_slot": 1.0}) == 3
    assert auto_count({"CPU": 8, "GPU": 2}, 0.5, {}) == 4
    assert auto_count({"CPU": 8}, 1.0, {}) == 1  # none yet: one is asked for
    r = Resources(actors=2, cpus_per_actor=1, gpus_per_actor=1, accelerator_type="L4")
    assert r.needs() == {"CPU": 1, "GPU": 1, "accelerator_type:L4": 0.001}
    assert r.kind() == "L4" and r.describe() == "1 GPU + a L4 GPU + 1 CPU"
    nodes = [{"Alive": True, "Resources": {"CPU": 4, "GPU": 1}}, {"Alive": False, "Resources": {"CPU": 4}}]
    assert missing(r.needs(), nodes) == ["accelerator_type:L4"]


@pytest.mark.parametrize("override, words", [
    ("resources.actors={min: 3, max: 2}", "resources.actors: min (3) is more than max (2)"),
    ("resources.actors={min: 1}", "missing required key 'resources.actors.max'"),
    ("resources.actors={max: 2, most: 3}", "unknown key 'resources.actors.most'"),
    ("resources.accelerator_type=A100", "resources.accelerator_type needs resources.gpus_per_actor > 0"),
    ("resources.custom={tpu: 0}", "resources.custom.tpu: expected a number > 0"),
    ("resources.start_timeout_s=0", "resources.start_timeout_s: expected a number > 0"),
])
def test_pool_spec_mistakes_are_one_line(ws, override, words):
    tmp, doc = ws
    assert words in err(write(tmp, doc), [override])


def test_resume_needs_the_same_spec(ws):
    tmp, doc = ws
    spec = load_spec(write(tmp, doc))
    written = spec.to_dict()  # what job.json holds
    _check_resumable(spec, {"spec": written, "model": {"sha256": "a"}}, "a")
    other = load_spec(write(tmp, doc), ["dataset.shard_size=7"])
    with pytest.raises(AuditError, match=r"dataset.shard_size is 7 now but 512"):
        _check_resumable(other, {"spec": written}, None)
    with pytest.raises(AuditError, match="model file .* changed"):
        _check_resumable(spec, {"spec": written, "model": {"sha256": "a"}}, "b")
    # resources may change between runs
    more = load_spec(write(tmp, doc), ["resources.actors=4"])
    _check_resumable(more, {"spec": written}, None)
    # a job written before a key joined the schema: the missing key is its default, not a change
    older = copy.deepcopy(written)
    del older["dataset"]["max_image_bytes"], older["dataset"]["resize_masks"]
    _check_resumable(spec, {"spec": older}, None)
    with pytest.raises(AuditError, match=r"dataset.resize_masks is True now but False"):
        _check_resumable(load_spec(write(tmp, doc), ["dataset.resize_masks=true"]), {"spec": older}, None)


def test_cli_reports_spec_errors_in_one_line(ws, capsys):
    from audit.cli import main

    tmp, doc = ws
    doc["dataset"]["colour"] = "red"
    code = main(["run", str(write(tmp, doc))])
    err_out = capsys.readouterr().err.strip()
    assert code == 2
    assert err_out.startswith("audit: error: spec error: unknown key 'dataset.colour'")
    assert len(err_out.splitlines()) == 1


@pytest.mark.parametrize("name", ["example_folder.yaml", "example_manifest.yaml", "example_parquet.yaml",
                                  "example_autoscale.yaml", "tank_sky.yaml"])
def test_shipped_specs_are_valid(name):
    from audit.runner.spec import read_yaml, validate

    path = resources.path("audit.jobs", name)
    validate(read_yaml(path))  # schema only: their data lives elsewhere
    assert fill_defaults(read_yaml(path))["resources"]["max_retries"] >= 0


def test_output_under_a_file_is_a_spec_error(ws):
    tmp, doc = ws
    (tmp / "afile").write_text("x")
    msg = err(write(tmp, doc), [f"output={tmp / 'afile' / 'sub'}"])
    assert f"output: {tmp / 'afile'} is not a directory" in msg


@pytest.mark.parametrize("address, words", [
    ("127.0.0.1:1", "cannot connect to the Ray cluster at 127.0.0.1:1"),
    ("ray://127.0.0.1:1", "cannot connect to the Ray cluster at ray://127.0.0.1:1"),
    ("head-without-port", "expected 'auto', HOST:PORT or ray://HOST:10001"),
])
def test_unreachable_address_is_one_line_not_a_hang(ws, capsys, address, words):
    """Ray retries an unreachable GCS for minutes; the CLI checks the address first."""
    from audit.cli import main

    tmp, doc = ws
    assert main(["run", str(write(tmp, doc)), "--address", address]) == 2
    e = capsys.readouterr().err.strip()
    assert e.startswith("audit: error: ") and words in e and len(e.splitlines()) == 1


def test_python_dash_m_audit():
    import subprocess
    import sys

    from audit import __version__

    r = subprocess.run([sys.executable, "-m", "audit", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"shortcut-audit {__version__}"


@pytest.mark.parametrize("argv, words", [
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    (["run"], "run: the following arguments are required: spec"),
    (["scan", "x", "--fill", "zeros"], "scan: argument --fill: invalid choice: 'zeros'"),
])
def test_usage_mistakes_are_one_line(argv, words, capsys):
    from audit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err_out = capsys.readouterr().err.strip()
    assert err_out.startswith("audit: error: ") and words in err_out and len(err_out.splitlines()) == 1


def test_model_path_must_be_a_keras_file(ws):
    tmp, doc = ws
    msg = err(write(tmp, doc), [f"model.path={tmp / 'data'}"])
    assert "model.path: expected a .keras or .h5 file" in msg and "SavedModel" in msg
    (tmp / "notes.txt").write_text("x")
    assert "expected a .keras or .h5 file, got" in err(write(tmp, doc), [f"model.path={tmp / 'notes.txt'}"])


def test_start_timeout_default_is_the_schema_default():
    from audit.runner.pool import DEFAULT_START_TIMEOUT_S

    res = resources.schema("job")["properties"]["resources"]["properties"]
    assert res["start_timeout_s"]["default"] == DEFAULT_START_TIMEOUT_S
