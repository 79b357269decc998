"""Bounded spec input: alias bombs, file size, message length, numeric ranges, the warm-up batch (no Ray)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from audit.data.jobspec import JobSpec
from audit.errors import AuditError
from audit.runner import spec as S
from audit.runner.spec import load_spec, numeric_bounds


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"not really a model")
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    doc = {"name": "t", "model": {"path": "m.keras"},
           "dataset": {"format": "folder", "path": "data"}, "output": "out"}
    return tmp_path, doc


def write_text(tmp, text, name="job.yaml"):
    p = tmp / name
    p.write_text(text)
    return p


def err(spec, overrides=()):
    with pytest.raises(AuditError) as e:
        load_spec(spec, overrides)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= S.MAX_MESSAGE + 20, msg[:200]
    return msg


BASE = "name: t\nmodel: {path: m.keras}\ndataset: {format: folder, path: data}\noutput: out\n"


def bomb(levels: int) -> str:
    """The issue's alias bomb: each level a list of nine aliases of the level below."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for k in range(1, levels + 1):
        lines.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]")
    return "\n".join(lines)


def test_an_alias_bomb_is_refused_before_it_is_built(ws):
    tmp, _ = ws
    # 9^6 = 531441 strings once expanded (small enough that the test cannot hang without the guard)
    text = BASE.replace("dataset:", "explain:\n  layers: *a6\ndataset:") + "\n"
    p = write_text(tmp, "x-anchors:\n" + "\n".join("  " + ln for ln in bomb(6).splitlines()) + "\n" +
                   text.replace("*a6", "*a6"))
    msg = err(p)
    assert "aliases expand to more than 1000 extra nodes" in msg and str(p) in msg


def test_a_few_aliases_are_fine(ws):
    tmp, _ = ws
    text = BASE + "explain:\n  regions:\n    sky: &top [0, 0, 1, 0.4]\n    top: *top\n"
    spec = load_spec(write_text(tmp, text))
    assert spec.explain.regions == {"sky": [0, 0, 1, 0.4], "top": [0, 0, 1, 0.4]}


def test_alias_budget_counts_expanded_nodes_not_aliases():
    small = S.safe_yaml("a: &a [1, 2]\nb: [*a, *a, *a]\n", "t")
    assert small == {"a": [1, 2], "b": [[1, 2]] * 3}
    with pytest.raises(AuditError, match="alias"):
        S.safe_yaml(bomb(4), "t")  # 9^4 = 6561 extra nodes from 36 aliases
    S.safe_yaml(bomb(2), "t")  # 9^2 = 81 extra nodes: fine


def test_recursive_alias_and_deep_nesting_are_one_line():
    with pytest.raises(AuditError, match="alias|nested"):
        S.safe_yaml("a: &a [1, *a]\n", "t")
    with pytest.raises(AuditError, match="nested too deeply|not valid YAML"):
        S.safe_yaml("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "t")


def test_a_spec_file_over_the_size_limit_is_refused(ws):
    tmp, _ = ws
    p = write_text(tmp, BASE + "# " + "x" * S.MAX_SPEC_BYTES + "\n")
    assert "at most 1024 KiB" in err(p)
    p = tmp / "bin.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    assert "not UTF-8" in err(p)


def test_set_values_obey_the_same_rules(ws):
    tmp, doc = ws
    p = write_text(tmp, yaml.safe_dump(doc))
    assert "alias" in err(p, ["explain.layers=" + "{" + bomb(5).replace("\n", ", ") + "}"])
    spec = load_spec(p, ["name=[unclosed"])  # not YAML: taken as the string it is
    assert spec.name == "[unclosed"


@pytest.mark.parametrize("overrides, shown", [
    (["x" * 5000 + "=1"], "unknown key"),
    (["dataset.shard_size=" + "9" * 5000], "dataset.shard_size"),
    (["dataset.shard_size=" + "'" + "a" * 5000 + "'"], "dataset.shard_size"),
    (["model.path=" + "p" * 5000 + ".keras"], "model.path"),
    (["explain.regions." + "s" * 3000 + "=[0, 0, 1, 1]"], "explain.regions"),
    (["explain.layers=[" + ", ".join(["7"] * 5000) + "]"], "explain.layers"),
    (["dataset.classes=[" + ", ".join(["c" * 100] * 500) + ", 5]"], "dataset.classes"),
])
def test_no_message_renders_an_unbounded_value(ws, overrides, shown):
    tmp, doc = ws
    msg = err(write_text(tmp, yaml.safe_dump(doc)), overrides)
    assert shown in msg and ("..." in msg or "items>" in msg), msg


def test_every_numeric_knob_has_documented_bounds():
    bounds = numeric_bounds()
    assert {"resources.batch_size", "dataset.shard_size", "dataset.limit", "resources.decode_threads",
            "dataset.max_pixels", "resources.max_retries"} <= set(bounds)
    assert all(lo is not None and hi is not None for lo, hi in bounds.values()), bounds
    doc = (Path(__file__).parents[1] / "docs" / "jobs.md").read_text()
    table = doc[doc.index("### Bounds"):]
    rows = dict((k, (lo, hi)) for k, lo, hi in re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", table, re.M))
    assert rows == {k: (str(lo), str(hi)) for k, (lo, hi) in bounds.items()}


@pytest.mark.parametrize("key", sorted(k for k in numeric_bounds() if "[]" not in k and "*" not in k
                                       and k != "resources.actors.min" and k != "resources.actors.max"))
def test_a_value_past_the_highest_is_one_line(ws, key):
    tmp, doc = ws
    hi = numeric_bounds()[key][1]
    msg = err(write_text(tmp, yaml.safe_dump(doc)), [f"{key}={hi * 10 + 1}"])
    assert key in msg and f"<= {hi}" in msg


def test_cli_refuses_a_huge_batch_size_in_one_line(ws, capsys):
    from audit.cli import main

    tmp, doc = ws
    code = main(["run", str(write_text(tmp, yaml.safe_dump(doc))), "--set", "resources.batch_size=1e23"])
    out = capsys.readouterr().err.strip()
    assert code == 2 and len(out.splitlines()) == 1 and "resources.batch_size" in out


def test_the_warm_up_batch_is_at_most_the_data():
    from audit.runner.worker import AuditWorker

    spec = JobSpec.from_partial({"dataset": {"shard_size": 512, "limit": None}, "resources": {"batch_size": 4096}})
    assert AuditWorker(spec).warm_up_size() == 512
    assert AuditWorker(spec, largest_shard=3).warm_up_size() == 3
    spec = replace(spec, dataset=replace(spec.dataset, limit=7))
    assert AuditWorker(spec).warm_up_size() == 7
    spec = replace(spec, resources=replace(spec.resources, batch_size=2))
    assert AuditWorker(spec, largest_shard=3).warm_up_size() == 2
