"""A GCS emulator for the tests: ``gcp-storage-emulator`` on 127.0.0.1, in memory.

:class:`GcsServer` starts it as a subprocess on a free port with one bucket
and sets ``STORAGE_EMULATOR_HOST`` (the variable Google's clients and
:mod:`audit.data.fs` read) while it runs; Ray workers started afterwards
inherit it.  The emulator checks no credential.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers_s3 import _free_port, wait_http


def available() -> bool:
    return shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)) is not None


class GcsServer:
    """One emulator holding bucket ``bucket``; ``endpoint`` its URL."""

    def __init__(self, bucket: str):
        from audit.data import fs

        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
        self.proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory",
                                      "--default-bucket", bucket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._saved = os.environ.get("STORAGE_EMULATOR_HOST")
        self._wait(bucket)
        os.environ["STORAGE_EMULATOR_HOST"] = self.endpoint
        fs.clear_cache()

    def _wait(self, bucket):
        wait_http(self.proc, f"{self.endpoint}/storage/v1/b/{bucket}", "gcp-storage-emulator")

    def upload(self, local, uri: str) -> str:
        """Copy a local file or folder to ``uri`` (gs://bucket/prefix) through pyarrow; returns ``uri``."""
        from audit.data import fs

        local = Path(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for p in files:
            fs.write_bytes(uri if local.is_file() else fs.join(uri, p.relative_to(local).as_posix()), p.read_bytes())
        return uri

    def stop(self):
        from audit.data import fs

        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self._saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = self._saved
        fs.clear_cache()
