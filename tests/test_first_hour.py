"""The small things a new user meets in the first hour: notes, wording, help, where the demo writes."""

from __future__ import annotations

import pytest

from audit.runner.pool import Resources


@pytest.mark.parametrize("local, said", [(True, False), (False, True)])
def test_cluster_gpu_note_only_on_a_joined_cluster(local, said, capsys):
    from audit.data.jobspec import JobSpec
    from audit.runner.job import _note_cpu_fallback

    spec = JobSpec.from_partial({"resources": {"gpus_per_actor": "auto"}})
    _note_cpu_fallback(spec, Resources(1, 2.0, 0.0), local)
    err = capsys.readouterr().err
    assert ("autoscaler" in err) is said


def test_replan_wording_counts_the_shards_it_keeps():
    from audit.runner.resume import _keep

    assert _keep(0) == "keep no shard (it is the first)"
    assert _keep(1) == "keep the shard before it"
    assert _keep(3) == "keep the 3 shards before it"


def test_demo_writes_to_the_user_cache_by_default(tmp_path, monkeypatch):
    from audit.cli import build_parser
    from audit.demo import default_out

    monkeypatch.setenv("SHORTCUT_AUDIT_CACHE", str(tmp_path / "cache"))
    assert default_out() == tmp_path / "cache" / "demo"
    assert build_parser().parse_args(["demo"]).out is None  # not ./tank-sky-demo in the working tree


@pytest.mark.parametrize("command", ["run", "submit", "scan", "report", "layers", "explain", "demo"])
def test_every_command_has_a_description_and_verbose(command):
    from audit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    assert sub.description and len(sub.description) > 40
    assert "--verbose" in sub.format_help()
