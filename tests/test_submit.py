"""``audit submit`` against a real head started with ``ray start --head`` in token mode.

The head runs in its own session (``setsid``) with its own temp dir and free
ports, and is stopped by its process ids at the end (SIGTERM to the
``ray start --block`` process, then SIGKILL to anything left in its process
group).  Skipped, with the reason, only when the head cannot start here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helpers_jobs as h
import pytest

from audit.cli import main
from audit.cli.submit import auth_headers, entrypoint
from audit.errors import AuditError

VENV_BIN = Path(sys.executable).parent


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _group_pids(pgid):
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getpgid(int(p.name)) == pgid:
                    out.append(int(p.name))
            except (ProcessLookupError, PermissionError):
                pass
    return out


@pytest.fixture(scope="module")
def head():
    token = secrets.token_hex(16)
    gcs, dash, client, agent, agent_grpc, metrics, rtenv = _free_ports(7)
    tmp = tempfile.mkdtemp(prefix="rsub", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rtenv}", f"--temp-dir={tmp}",
           "--disable-usage-stats"]
    with open(Path(tmp) / "head.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(address, token, proc, deadline=90)
    except RuntimeError as e:
        _stop(proc)
        pytest.skip(f"cannot start a token-mode Ray head here: {e}")
    yield {"address": address, "token": token, "tmp": tmp, "gcs": f"127.0.0.1:{gcs}",
           "client": f"ray://127.0.0.1:{client}"}
    _stop(proc)


def _wait_for_dashboard(address, token, proc, deadline):
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            req = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the dashboard did not answer within {deadline} s")


def _actor_count(head, class_name):
    """Actors of ``class_name``, alive or dead, that the head's state API knows of."""
    import urllib.request

    req = urllib.request.Request(f"{head['address']}/api/v0/actors?limit=10000",
                                 headers={"Authorization": f"Bearer {head['token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        actors = json.load(r)["data"]["result"]["result"]
    return sum(1 for a in actors if a.get("class_name") == class_name)


@contextlib.contextmanager
def _reaped(*procs):
    """Subprocesses a failed assertion must not leave running: killed (by their ids) on the way out."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _client_server_logs(head):
    """The tail of the head's Ray Client server logs, to explain a failed ``ray://`` run."""
    out = []
    for f in sorted(Path(head["tmp"]).glob("session_latest/logs/ray_client_server*")):
        out.append(f"\n--- {f.name}\n" + f.read_text(errors="replace")[-1500:])
    return "".join(out)


def _stop(proc):
    """Stop the head by its process ids: the ray start process, then its process group."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    t0 = time.time()
    while time.time() - t0 < 10:
        left = _group_pids(pgid)
        if not left:
            return
        time.sleep(0.5)
    for pid in _group_pids(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_entrypoint_and_headers(tmp_path, monkeypatch):
    cmd = entrypoint("/data/my job.yaml", "python", True, ["dataset.limit=5"])
    assert cmd == "python -m audit run '/data/my job.yaml' --address auto --resume --set dataset.limit=5"
    assert entrypoint("j.yaml", "py", "replan", []) == "py -m audit run j.yaml --address auto --resume=replan"
    assert entrypoint("j.yaml", "py", False, []) == "py -m audit run j.yaml --address auto"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert auth_headers() == {"Authorization": "Bearer abc"}
    f = tmp_path / "tok"
    f.write_text("xyz\n")
    assert auth_headers(str(f)) == {"Authorization": "Bearer xyz"}


def test_submit_resume_forms_are_those_of_run(capsys):
    from audit.cli import build_parser

    p = build_parser()
    for cmd in (["run", "j.yaml"], ["submit", "j.yaml", "--address", "http://h:8265"]):
        assert p.parse_args([*cmd, "--resume"]).resume is True
        assert p.parse_args([*cmd, "--resume=replan"]).resume == "replan"
        assert p.parse_args(cmd).resume is False
        ns = p.parse_args([cmd[0], "--resume", "j.yaml", *cmd[2:]])  # a bare --resume before the spec
        assert ns.resume is True and ns.spec_after_resume == "j.yaml"
        with pytest.raises(SystemExit):
            p.parse_args([*cmd, "--resume", "other"])
        assert "--resume takes no value or =replan, not 'other'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["submit", "--address", "http://127.0.0.1:1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("audit: error: submit: the following arguments are required: spec")
    assert len(err.splitlines()) == 1


def test_local_mistakes_fail_before_contacting_the_cluster(tmp_path, capsys):
    spec = h.write_spec(tmp_path / "job.yaml")
    (tmp_path / "bad.yaml").write_text("pip: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n")
    dead = "http://127.0.0.1:1"  # nothing listens there: these must fail before trying it
    cases = [
        (["--runtime-env", str(tmp_path / "bad.yaml")], "bad.yaml is not valid YAML (line 2"),
        (["--runtime-env", str(tmp_path / "list.yaml")], "must hold a mapping"),
        (["--runtime-env", str(tmp_path / "nope.yaml")], "--runtime-env: not found"),
        (["--token-file", str(tmp_path / "nope")], "--token-file: not found"),
        (["--working-dir", str(tmp_path / "job.yaml")], "--working-dir: not a directory"),
    ]
    for extra, words in cases:
        assert main(["submit", spec, "--address", dead, *extra]) == 2, extra
        e = capsys.readouterr().err.strip()
        assert e.startswith("audit: error: ") and words in e and len(e.splitlines()) == 1, (extra, e)
    assert main(["submit", spec, "--address", dead]) == 2
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:1" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_with_token_and_wait(head, tmp_path, monkeypatch, capsys):
    h.make_model(tmp_path / "model.keras")
    h.make_folder(tmp_path / "data", 6, masks=False)
    spec = h.write_spec(tmp_path / "job.yaml", resources={"actors": 1, "batch_size": 8})
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    # no token / a wrong token: refused, in one line.  Fresh processes with a clean
    # environment and HOME: this process's Ray may have cached token mode and a local token.
    # Started here and read after the submitted job below (they send nothing it could see).
    def cli(*extra, token=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["HOME"] = str(tmp_path)
        if token:
            env["RAY_AUTH_TOKEN"] = token
        return subprocess.Popen([sys.executable, "-m", "audit", "submit", spec, "--address", head["address"], *extra],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    refused = [(cli(), "requires token authentication"), (cli(token="not-the-token"), "refused the authentication token")]

    # a spec error is caught locally before anything is sent
    assert main(["submit", spec, "--address", head["address"], "--set", "dataset.shardsize=3"]) == 2
    assert "unknown key 'dataset.shardsize'" in capsys.readouterr().err

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    tok = tmp_path / "token"
    tok.write_text(head["token"])
    with _reaped(*(p for p, _ in refused)):
        code = main(["submit", spec, "--address", head["address"], "--token-file", str(tok), "--wait",
                     "--submission-id", "audit-test-1"])
        cap = capsys.readouterr()
        ends = [(p.communicate(timeout=120)[1], p.returncode, words) for p, words in refused]
    for err, returncode, words in ends:
        assert returncode == 2 and words in err, err[-1000:]
        assert len(err.strip().splitlines()) == 1, err[-1000:]
    assert code == 0, cap.out[-2000:] + cap.err[-2000:]
    assert cap.out.splitlines()[0] == "audit-test-1"
    assert "job t (" in cap.out and "12 of 12 audited" in cap.out  # the job's own summary, from its logs
    assert "SUCCEEDED" in cap.err
    assert len(list((tmp_path / "out" / "records").glob("part-*.parquet"))) == 2

    # a picture replaced in place: --resume is refused on the cluster, --resume=replan redoes its shard
    h.write_png(tmp_path / "data" / "dog" / "img_001.png", h.image(5, 1, size=40)[0])
    common = ["submit", spec, "--address", head["address"], "--token-file", str(tok), "--wait"]
    assert main([*common, "--resume"]) == 1
    cap = capsys.readouterr()
    assert "cannot resume: shard 1 (records/part-00001.parquet)" in cap.out + cap.err, cap.out[-2000:]
    assert main([*common, "--resume=replan"]) == 0
    cap = capsys.readouterr()
    assert "--resume=replan: shard 1 changed" in cap.out + cap.err and "12 of 12 audited" in cap.out
    assert "6 from committed shards" in cap.out, cap.out[-2000:]


@pytest.mark.slow
def test_run_joins_the_cluster_with_address(head, tmp_path):
    """``audit run --address HOST:PORT`` from outside the head: its actors run on the cluster."""
    h.make_model(tmp_path / "model.keras")
    h.make_folder(tmp_path / "data", 5, masks=False)
    spec = h.write_spec(tmp_path / "job.yaml", resources={"actors": 1, "batch_size": 8})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of this machine's

    cmd = [sys.executable, "-m", "audit", "run", spec, "--no-progress"]

    def run(*extra, **kw):
        return subprocess.Popen([*cmd, *extra], env={**env, **kw}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path)

    def finished(p):
        out, err = p.communicate(timeout=240)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    # no token, a token without token mode (Ray then sends none), a wrong token: one line
    # each that says what to set (Ray's C++ retries are not shown), and no output written
    cases = [({}, "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"),
             ({"RAY_AUTH_TOKEN": head["token"]}, "set RAY_AUTH_MODE=token (Ray sends the token"),
             ({"RAY_AUTH_TOKEN": "wrong", "RAY_AUTH_MODE": "token"}, "must hold the cluster's token")]
    procs = [(subprocess.Popen([*cmd, "--address", head["gcs"]], env={**env, **extra_env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path), words)
             for extra_env, words in cases]  # at once: each is a CLI start-up (TensorFlow import)
    for p, words in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 2 and "uses token authentication" in err and words in err, err[-2000:]
        assert len(err.strip().splitlines()) == 1, err[-2000:]
    assert not (tmp_path / "out").exists()

    # at once (the head has a CPU for each run's actor): through the GCS address, through Ray
    # Client (ray://) into a second output, and an address where nothing listens
    before = _actor_count(head, "AuditWorker")
    gcs = run("--address", head["gcs"], RAY_AUTH_TOKEN=head["token"], RAY_AUTH_MODE="token")
    client = run("--address", head["client"], "--set", f"output={tmp_path / 'out_client'}",
                 RAY_AUTH_TOKEN=head["token"], RAY_AUTH_MODE="token")
    nothing = run("--address", "127.0.0.1:1", "--set", f"output={tmp_path / 'out2'}", RAY_AUTH_TOKEN=head["token"])
    with _reaped(gcs, client, nothing):
        _joined(head, tmp_path, before, finished(gcs), finished(client), finished(nothing))


def _joined(head, tmp_path, before, r, client, nothing):
    """The three runs of test_run_joins_the_cluster_with_address, as they ended."""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "10 of 10 audited" in r.stdout
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["status"] == "ok" and job["resources"]["actors"] == 1

    r = client
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + _client_server_logs(head)
    assert "10 of 10 audited" in r.stdout
    assert len(list((tmp_path / "out_client" / "records").glob("part-*.parquet"))) == 2
    assert json.loads((tmp_path / "out_client" / "job.json").read_text())["resources"]["actors"] == 1
    # each run's one actor ran on the head's cluster (its GCS lists both), not in a local Ray
    assert _actor_count(head, "AuditWorker") == before + 2

    # nothing listens there: one line, no traceback
    r = nothing
    assert r.returncode == 2 and r.stderr.strip().startswith("audit: ") and "127.0.0.1:1" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]



@pytest.mark.slow
def test_token_refusal_is_found_by_one_handshake(head, tmp_path):
    """The quick check names a refusal, and lets a good token (or a ray:// address) through."""
    code = ("import sys, ray\nfrom audit.runner.cluster import _token_refusal\n"
            "for a in sys.argv[1:]:\n    e = _token_refusal(ray, a)\n"
            "    print(type(e).__name__ if e is not None else 'None')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)

    def check(**kw):
        r = subprocess.run([sys.executable, "-c", code, head["gcs"], head["client"]], env={**env, **kw},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()

    assert check() == ["AuthenticationError", "None"]
    assert check(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong") == ["AuthenticationError", "None"]
    assert check(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"]) == ["None", "None"]

class _FlakyClientRay:
    """Stands in for ``ray``: its first ``fail`` connections fail the way Ray Client's
    proxy reports a session process that died at start (an empty reason)."""

    class exceptions:  # noqa: N801 - mirrors ray.exceptions
        RayError = type("RayError", (Exception,), {})

    def __init__(self, fail):
        self.fail, self.inits, self.shutdowns = fail, [], 0

    def init(self, address, **kwargs):
        self.inits.append(address)
        if len(self.inits) <= self.fail:
            raise ConnectionAbortedError("Initialization failure from server:\n")

    def shutdown(self):
        self.shutdowns += 1


def test_ray_client_session_start_failures_are_retried(monkeypatch):
    from audit.errors import AuditError
    from audit.runner import cluster as job

    monkeypatch.setattr(job.time, "sleep", lambda s: None)
    fake = _FlakyClientRay(fail=2)
    job._connect(fake, "ray://head:10001", {}, attempts=3)
    assert fake.inits == ["ray://head:10001"] * 3 and fake.shutdowns == 2

    fake = _FlakyClientRay(fail=3)
    with pytest.raises(AuditError) as e:
        job._connect(fake, "ray://head:10001", {}, attempts=3)
    assert len(fake.inits) == 3
    msg = str(e.value)
    assert "failed to start a session 3 times" in msg and "no reason given" in msg and "\n" not in msg

    # a GCS address is not Ray Client: the same failure is not retried
    fake = _FlakyClientRay(fail=1)
    with pytest.raises(AuditError, match="cannot connect to the Ray cluster at head:6379"):
        job._connect(fake, "head:6379", {}, attempts=3)
    assert len(fake.inits) == 1


class _AgentLate:
    """A Jobs client whose agent registers after ``late`` refused submissions."""

    def __init__(self, late, error="No available agent to submit job, please try again later."):
        self.late, self.error, self.calls = late, error, 0

    def submit_job(self, **kwargs):
        self.calls += 1
        if self.calls <= self.late:
            raise RuntimeError(self.error)
        return "raysubmit_1"


def test_submission_waits_for_a_late_job_agent():
    from audit.cli.submit import _submit

    c = _AgentLate(2)
    assert _submit(c, {}, "http://h:8265", wait_s=5, pause=0) == "raysubmit_1" and c.calls == 3
    never = _AgentLate(10 ** 6)
    with pytest.raises(AuditError, match="submission to http://h:8265 failed: No available agent"):
        _submit(never, {}, "http://h:8265", wait_s=0.05, pause=0.01)
    other = _AgentLate(1, error="HTTP 500 boom")
    with pytest.raises(AuditError, match="boom"):
        _submit(other, {}, "http://h:8265", wait_s=5, pause=0)
    assert other.calls == 1
