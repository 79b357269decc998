"""``audit submit SPEC.yaml --address http://HEAD:8265``: run a job on a cluster via the Ray Jobs API."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from audit.cli.run import add_resume, spec_arg
from audit.errors import AuditError

EXAMPLE = """examples:
  audit submit jobs/example_folder.yaml --address http://head:8265
  audit submit job.yaml --address http://head:8265 --wait
  audit submit job.yaml --address http://head:8265 --resume=replan   # the dataset changed since
  RAY_AUTH_TOKEN=$(cat token) audit submit job.yaml --address https://head:8265 --wait
  audit submit job.yaml --address http://head:8265 --working-dir . --runtime-env env.yaml

The spec must name paths the cluster can read (a shared filesystem), or
ship them with --working-dir (then paths in the spec are relative to it).
Token authentication: the token comes from --token-file, RAY_AUTH_TOKEN or
RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token when RAY_AUTH_MODE=token).
Prints the submission id; --wait follows the job's logs to the end.
See jobs/README.md.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a job to a Ray cluster through the Ray Jobs API",
        description="Submit a job spec to a Ray cluster through the Ray Jobs API (the job runs on the "
                    "cluster as `audit run SPEC --address auto`) and print the submission id; --wait "
                    "follows its logs to the end.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", help="job spec (YAML)")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 0 if it succeeded")
    add_resume(p, "pass --resume (or --resume=replan) to `audit run` on the cluster: continue the job in its "
                  "output, refused at the first committed shard that changed; =replan keeps the shards before "
                  "that one and redoes the rest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec value; repeatable")
    p.add_argument("--working-dir", help="local directory uploaded as the job's working_dir (holds the spec)")
    p.add_argument("--runtime-env", help="YAML/JSON file with a Ray runtime_env (pip, env_vars, ...)")
    p.add_argument("--token-file", help="file holding the cluster's auth token (token authentication)")
    p.add_argument("--submission-id", help="choose the submission id (default: Ray picks one)")
    p.add_argument("--python", default="python", help="Python executable on the cluster (default: python)")
    p.set_defaults(func=run, submit_parser=p)


def auth_headers(token_file=None) -> dict:
    """Authorization header for token authentication, from the places Ray reads it."""
    token = None
    path = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_file and not os.path.isfile(token_file):
        raise AuditError(f"--token-file: not found: {token_file}")
    if os.environ.get("RAY_AUTH_TOKEN") and not token_file:
        token = os.environ["RAY_AUTH_TOKEN"].strip()
    elif path and os.path.isfile(path):
        token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def entrypoint(spec: str, python: str, resume: bool | str, overrides) -> str:
    """The shell command the cluster runs: ``audit run SPEC --address auto`` and the options passed on.

    Args:
        spec: the spec's path as the cluster sees it.
        python: the cluster's Python executable.
        resume: False, True (``--resume``) or ``"replan"`` (``--resume=replan``).
        overrides: ``KEY.PATH=VALUE`` strings, each passed as ``--set``.
    """
    cmd = [python, "-m", "audit", "run", spec, "--address", "auto"]
    if resume == "replan":
        cmd.append("--resume=replan")
    elif resume:
        cmd.append("--resume")
    for o in overrides:
        cmd += ["--set", o]
    return " ".join(shlex.quote(c) for c in cmd)


def _runtime_env(args) -> dict:
    env: dict = {}
    if args.runtime_env:
        import yaml

        p = Path(args.runtime_env)
        if not p.is_file():
            raise AuditError(f"--runtime-env: not found: {p}")
        try:
            env = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            raise AuditError(f"--runtime-env: {p} is not valid YAML{at}") from None
        if not isinstance(env, dict):
            raise AuditError(f"--runtime-env: {p} must hold a mapping (working_dir, pip, env_vars, ...)")
    if args.working_dir:
        env["working_dir"] = str(Path(args.working_dir).resolve())
    return env


def submit(args) -> tuple[object, str]:
    from audit.runner.spec import apply_overrides, read_yaml, validate

    args.spec = spec_arg(args, args.submit_parser)
    validate(apply_overrides(read_yaml(args.spec), args.overrides))  # fail fast, locally
    spec = Path(args.spec).resolve()
    if args.working_dir:
        wd = Path(args.working_dir).resolve()
        if not wd.is_dir():
            raise AuditError(f"--working-dir: not a directory: {wd}")
        try:
            remote_spec = spec.relative_to(wd).as_posix()
        except ValueError:
            raise AuditError(f"the spec {spec} must be inside --working-dir {wd}") from None
    else:
        remote_spec = str(spec)
    runtime_env = _runtime_env(args) or None  # local mistakes first, before contacting the cluster
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(args.token_file)
    try:
        client = JobSubmissionClient(args.address, headers=headers or None)
    except Exception as e:
        raise AuditError(f"cannot reach the Ray Jobs API at {args.address}: {_one_line(e)}") from None
    kwargs = {"entrypoint": entrypoint(remote_spec, args.python, args.resume, args.overrides),
              "runtime_env": runtime_env,
              "metadata": {"tool": "shortcut-audit", "spec": spec.name}}
    if args.submission_id:
        kwargs["submission_id"] = args.submission_id
    return client, _submit(client, kwargs, args.address)


AGENT_WAIT_S = 60.0  # a cluster just started: how long to wait for its job agent before giving up
_NO_AGENT = "No available agent"  # the Jobs API's answer while no node's job agent has registered yet


def _submit(client, kwargs: dict, address, wait_s: float = AGENT_WAIT_S, pause: float = 2.0) -> str:
    """``client.submit_job(**kwargs)``, tried again while the cluster's job agent is not up yet.

    Raises:
        AuditError: the submission failed (one line), or no agent came up within ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except Exception as e:
            if _NO_AGENT not in str(e) or time.monotonic() >= deadline:
                raise AuditError(f"submission to {address} failed: {_one_line(e)}") from None
        time.sleep(pause)


def _one_line(e) -> str:
    text = " ".join(str(e).split())
    if "401" in text or "Unauthorized" in text or "Authentication required" in text:
        return ("the cluster requires token authentication; give the token with RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or --token-file")
    if "403" in text or "Forbidden" in text:
        return "the cluster refused the authentication token (wrong token?)"
    return text[:300] or type(e).__name__


def follow(client, sid) -> str:
    """Print the job's logs as they come; return its final status."""
    import asyncio

    from ray.job_submission import JobStatus

    async def tail():
        async for lines in client.tail_job_logs(sid):
            print(lines, end="", flush=True)

    with contextlib.suppress(RuntimeError):  # connection closed early: fall back to polling
        asyncio.run(tail())

    status = client.get_job_status(sid)
    while not status.is_terminal():
        time.sleep(1.0)
        status = client.get_job_status(sid)
    return status.value if isinstance(status, JobStatus) else str(status)


def run(args) -> int:
    client, sid = submit(args)
    print(sid)
    if not args.wait:
        print(f"follow it with: ray job logs --address {args.address} --follow {sid}", file=sys.stderr)
        return 0
    status = follow(client, sid)
    print(f"job {sid}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
