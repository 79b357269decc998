"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1.

:func:`start` runs ``python -m moto.server`` as a subprocess on a free port
with authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``): the first calls
create an IAM user with an access key, every later request must be signed
with that key, so a wrong credential is refused as it would be by AWS.
:class:`S3Server` sets the standard variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) in ``os.environ`` while it runs; Ray workers
started afterwards inherit them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(proc: subprocess.Popen, url: str, name: str) -> None:
    """Polls ``url`` until the server process ``proc`` answers (30 s at most)."""
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not start")


class S3Server:
    """One moto server; ``key``/``secret`` are the valid credential, ``endpoint`` its URL.

    ``auth=False`` (benchmarks): any credential is accepted, and the server
    spends no CPU on checking signatures and policies for each request.
    """

    def __init__(self, auth: bool = True):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MOTO_ACCOUNT_ID": "123456789012"}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        else:
            env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self._saved = {k: os.environ.get(k) for k in ENV_KEYS}
        self._wait()
        self.key, self.secret = self._make_user() if auth else ("bench", "bench")
        self.set_env()

    def _wait(self):
        wait_http(self.proc, f"{self.endpoint}/moto-api/", "moto server")

    def _make_user(self):
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="auditor")
        iam.put_user_policy(UserName="auditor", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        k = iam.create_access_key(UserName="auditor")["AccessKey"]
        return k["AccessKeyId"], k["SecretAccessKey"]

    def set_env(self, key=None, secret=None):
        """The standard variables for this server (``key``/``secret``: another credential)."""
        from audit.data import fs

        for k in ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=key or self.key,
                          AWS_SECRET_ACCESS_KEY=secret or self.secret, AWS_DEFAULT_REGION="us-east-1")
        fs.clear_cache()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload(self, local, uri: str) -> str:
        """Copy a local file or folder to ``uri`` (s3://bucket/prefix); returns ``uri``."""
        c = self.client()
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        local = Path(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for p in files:
            rel = p.name if local.is_file() else p.relative_to(local).as_posix()
            key = prefix if local.is_file() else f"{prefix}/{rel}".lstrip("/")
            c.upload_file(str(p), bucket, key)
        return uri

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            r = c.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return sorted(out)
            token = r["NextContinuationToken"]

    def stop(self):
        from audit.data import fs

        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fs.clear_cache()
