"""How the suite is spread over pytest-xdist workers, and Ray's idle workers in the tests.

``-n 2`` runs with ``--dist loadgroup`` (pyproject's addopts): tests that
share a module-scoped fixture of their module (a local Ray, a cluster, an S3
server, a trained demo model), and the slow tests of a module, are put in
one group per module, so each such fixture is built on one worker only and
the long groups start first (xdist sends the largest groups first, then the
single tests, which fill the end of the run).  A test that names its own
``xdist_group`` keeps it.
"""

from __future__ import annotations

import os

import pytest

# Ray starts one idle worker process per CPU when a driver connects, for tasks; the jobs here run
# actors with a runtime_env of their own, which never use those processes (each costs a Python
# start and a Ray import).  Tests only: a spawned `audit run` or cluster keeps Ray's defaults
# unless it inherits this environment.
os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


def _shares_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for defs in info.name2fixturedefs.values():
        for d in defs:
            if d.scope == "module" and getattr(d, "baseid", "").startswith(item.nodeid.split("::")[0]):
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before xdist's worker hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        if item.get_closest_marker("slow") or _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
