"""Settings for every test process.

Ray starts one idle worker process per CPU when a driver connects, for tasks.
The jobs here run actors with a runtime_env of their own, which never use
those processes (each costs a Python start and a Ray import), so the tests
turn that off for the Ray instances they start in-process (and the clusters
that inherit this environment).  A spawned ``audit run`` keeps Ray's default.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
