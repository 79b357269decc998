"""A fake autoscaling Ray cluster on this machine, started and stopped by pid (tests and bench).

Ray's ``fake_multinode`` node provider launches "nodes" (a raylet each, on
this machine) when the autoscaler sees resource demand, and terminates them
when idle: the same scale-from-zero cycle as KubeRay or the cluster launcher,
no cloud needed.  ``ray.cluster_utils.AutoscalingCluster`` drives it, but it
reads an ``example.yaml`` the wheel does not ship and runs ``ray stop
--force``, which ends every Ray process on the machine (other test sessions'
too).  :class:`FakeAutoscalingCluster` writes the cluster config itself,
starts the head with ``ray start --head --block`` on free ports and its own
``--temp-dir``, in a session of its own, and stops only the processes it
started: the head's process group, plus every process whose command line or
environment names its temp dir (the fake nodes' raylets and workers, which
the autoscaler's monitor spawns).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HEAD_START_TIMEOUT_S = 120.0  # a loaded 2-core machine can take a minute to start a head
STOP_WAIT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_config(gcs_address, worker_types, idle_timeout_minutes=10.0) -> dict:
    """The autoscaler config for ``fake_multinode`` (what Ray's example.yaml holds, written out)."""
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    types.update(worker_types)
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        # gcs_address: the fake nodes would join 6379 (another Ray's, or none) without it
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def gpu_worker_type(max_workers=3, cpus=1, gpus=1, **extra) -> dict:
    """A worker node type with a fake GPU (Ray counts it; no device exists)."""
    res = {"CPU": cpus, "GPU": gpus, "object_store_memory": 80 * 2**20, **extra}
    return {"gpu_worker": {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": max_workers}}


class FakeAutoscalingCluster:
    """A head with 0 CPUs and an autoscaler that adds ``worker_types`` nodes on demand.

    Args:
        worker_types: ``available_node_types`` entries for the workers
            (:func:`gpu_worker_type`).
        idle_timeout_minutes: how long an idle worker node lives.
        env: extra environment for the head (and so the nodes and workers).
    """

    def __init__(self, worker_types, idle_timeout_minutes=10.0, env=None):
        self.worker_types = worker_types
        self.idle_timeout_minutes = idle_timeout_minutes
        self.extra_env = dict(env or {})
        self.temp_dir = tempfile.mkdtemp(prefix="rfa", dir="/tmp")  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.address = None

    @property
    def config_path(self) -> Path:
        return Path(self.temp_dir) / "autoscaling.yaml"

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(cluster_config(self.address, self.worker_types,
                                                                  self.idle_timeout_minutes)))

    def set_node_type(self, node_type: str, **fields) -> None:
        """Change a node type (``min_workers``, ``max_workers``) while the cluster runs.

        The autoscaler reads its config file again at every update.
        """
        self.worker_types[node_type].update(fields)
        self.write_config()

    def set_max_workers(self, node_type: str, n: int) -> None:
        self.set_node_type(node_type, max_workers=n)

    def start(self) -> str:
        """Start the head; returns its GCS address (``host:port``) once it answers."""
        from ray._private.services import get_node_ip_address

        self.address = f"{get_node_ip_address()}:{self.port}"
        self.write_config()
        from helpers_jobs import env_without_ray

        env = env_without_ray(**{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_TOKEN")})
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    # the driver's mode: a new head with a token in ~/.ray would switch to token mode on its own,
                    # and a driver that started a local Ray before is in token mode (Ray set RAY_AUTH_MODE)
                    "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "disabled",
                    "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **self.extra_env})
        ray_bin = Path(sys.executable).parent / "ray"
        cmd = [str(ray_bin), "start", "--head", "--block", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={self.config_path}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--object-store-memory=100000000", "--disable-usage-stats"]
        log = open(Path(self.temp_dir) / "head.log", "wb")  # noqa: SIM115 - lives as long as the head
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for_gcs()
        return self.address

    def _wait_for_gcs(self) -> None:
        t0 = time.time()
        while time.time() - t0 < HEAD_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.head_log()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                time.sleep(2)  # the GCS answers before the head's raylet has registered
                return
            time.sleep(0.5)
        raise RuntimeError(f"the fake cluster's head did not start in {HEAD_START_TIMEOUT_S:.0f} s")

    def head_log(self) -> str:
        p = Path(self.temp_dir) / "head.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # -- nodes --------------------------------------------------------------------------------------
    def worker_nodes(self) -> list[dict]:
        """Alive nodes other than the head (``ray.nodes()`` entries), from the connected driver."""
        import ray

        return [n for n in ray.nodes() if n["Alive"] and not n.get("Resources", {}).get("node:__internal_head__")]

    def wait_for(self, predicate, timeout=180.0, what="a condition"):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"fake cluster: timed out after {timeout:.0f} s waiting for {what}")

    def preempt(self, node_id: str, actor_pid: int | None = None) -> None:
        """What a cloud does to a spot node: drain it (reason PREEMPTION), then kill it.

        Ray's drain tells the GCS that the node goes away (its actors then die
        as ``preempted``); the node's raylet and its workers are SIGKILLed.
        """
        import ray
        from ray.core.generated import autoscaler_pb2

        gcs = ray._raylet.GcsClient(address=self.address)
        deadline_ms = int(time.time() * 1000) + 1000
        with contextlib.suppress(Exception):  # a node that already went away cannot be drained
            gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                           "spot instance taken back (test)", deadline_ms)
        for pid in self._node_pids(node_id) + ([actor_pid] if actor_pid else []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _node_pids(self, node_id: str) -> list[int]:
        """The raylet of the fake node ``node_id`` (its env names the id the provider gave it)."""
        found = []
        for pid in self.pids():
            env = _environ(pid)
            if env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id or f"--node_id={node_id}" in _cmdline(pid):
                found.append(pid)
        return found

    # -- the end ------------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Every live process this cluster started (its process group, or its temp dir named)."""
        mine = []
        pgid = self.proc.pid if self.proc else None
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            with contextlib.suppress(OSError):
                in_group = pgid is not None and os.getpgid(pid) == pgid
                if in_group or self.temp_dir in _cmdline(pid) or self.temp_dir in json.dumps(_environ(pid)):
                    mine.append(pid)
        return mine

    def stop(self) -> None:
        """Kill every process of this cluster (never ``ray stop``: that ends every Ray on the machine).

        SIGKILL at once: on SIGTERM the head drains for up to 30 s, and nothing of
        this cluster is kept.
        """
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for _ in range(3):  # the nodes' processes, which the autoscaler's monitor spawned
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_WAIT_S)
        self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.decode(errors="replace").partition("=")
        if sep:
            out[k] = v
    return out
