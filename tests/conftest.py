"""Settings for every test process.

Ray starts one idle worker process per CPU when a driver connects, for tasks.
The jobs here run actors with a runtime_env of their own, which never use
those processes (each costs a Python start and a Ray import, about 0.8 s of
CPU), so the tests turn that off for the Ray instances they start in-process,
the clusters that inherit this environment, and the children whose other
``RAY_*`` variables they clear (:func:`helpers_jobs.env_without_ray`: a spawned
``audit run``'s private Ray, a fake autoscaling cluster's nodes).
"""

from __future__ import annotations

import contextlib
import os

import pytest

PRESTART_OFF = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
for _key, _value in PRESTART_OFF.items():
    os.environ.setdefault(_key, _value)


class SharedCache:
    """A folder that the test processes of one run share (under ``-n 2`` both xdist workers).

    For what several modules build the same way (the tank/sky demo's models): the
    first test to need it builds it while holding :meth:`lock`, the others wait
    and read it instead of training again.  Each run starts with an empty one.
    """

    def __init__(self, root):
        self.root = root

    @contextlib.contextmanager
    def lock(self, name):
        import filelock  # a dependency of Ray's

        with filelock.FileLock(str(self.root / f".{name}.lock")):
            yield self.root / name


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, request) -> SharedCache:
    base = tmp_path_factory.getbasetemp()
    xdist_worker = hasattr(request.config, "workerinput")  # its basetemp is a folder of the run's
    root = (base.parent if xdist_worker else base) / "shared-cache"
    root.mkdir(exist_ok=True)
    return SharedCache(root)


# A test marked slow counts as this many quick ones when the modules are ordered (below): the slow
# ones take 20 s to 3 min each on 2 cores, the quick ones about a second.
SLOW_WEIGHT = 40


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    """The heaviest modules first, each module's tests kept together and in their order.

    With ``-n 2`` (``--dist loadfile --no-loadscope-reorder``, pyproject.toml) each worker takes
    the next whole module in this order when it is nearly done with its last: a module's fixtures
    (a Ray cluster, an S3 server, a trained model) start once, and the run ends on short modules,
    not with one worker alone on a long end-to-end test (longest first: each worker's last module
    is a light one).
    """
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def weight(tests) -> int:
        return sum(SLOW_WEIGHT if t.get_closest_marker("slow") else 1 for t in tests)

    ordered = sorted(modules.values(), key=weight, reverse=True)  # stable: ties keep the file order
    items[:] = [t for tests in ordered for t in tests]
