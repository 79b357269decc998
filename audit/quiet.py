"""Keep C++ chatter off the user's stderr: TensorFlow's import, Ray's connection retries.

TensorFlow 2.16+ prints the absl "All log messages before absl::InitializeLog()"
line and "Could not find cuda drivers" from C++ while it is being imported,
whatever TF_CPP_MIN_LOG_LEVEL says.  :func:`install` makes *every* later first
import of ``tensorflow`` or ``keras`` (wherever it happens: a module-level
``import keras``, a Ray actor) run with file descriptor 2 pointed at /dev/null;
``audit --verbose`` (``AUDIT_VERBOSE=1``) leaves them alone.

TensorFlow logs "oneDNN custom operations are on", "Could not find cuda
drivers" and the absl pre-initialisation warning from C++ while it is being
imported, before TF_CPP_MIN_LOG_LEVEL can apply.  For CLI users (and Ray
workers, whose stderr is forwarded to the driver) we point file descriptor 2 at
/dev/null for the duration of the import only.  Python exceptions still
propagate normally.  :func:`stderr_to` is the same redirection to any file,
used to read what Ray's C++ client logs while it connects to a cluster.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys

QUIET_MODULES = ("tensorflow", "keras")
# What TensorFlow, absl and Ray read at start-up; a Ray actor gets them in its runtime env.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "ABSL_MIN_LOG_LEVEL": "3",
             "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "2", "RAY_DEDUP_LOGS": "1"}


@contextlib.contextmanager
def stderr_to(file=None):
    """Point file descriptor 2 at ``file`` (an open binary file; None: /dev/null) inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        if file is None:
            target = os.open(os.devnull, os.O_WRONLY)
            os.dup2(target, 2)
            os.close(target)
        else:
            os.dup2(file.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow():
    """Import and return ``tensorflow`` with C++ start-up logs silenced."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if verbose():
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with stderr_to(None):
        import keras  # noqa: F401  (imports the backend while stderr is quiet)
        import tensorflow as tf
    return tf


def verbose() -> bool:
    """True when the user asked to see the libraries' own log lines (``--verbose``)."""
    return os.environ.get("AUDIT_VERBOSE", "") not in ("", "0")


def quiet_env() -> dict:
    """The environment variables that keep TensorFlow, absl and gRPC quiet ({} with --verbose)."""
    return {} if verbose() else dict(QUIET_ENV)


class _QuietLoader(importlib.abc.Loader):
    """The real loader, run with stderr at /dev/null (the package's C++ logs at import)."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        with stderr_to(None):
            self.inner.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` / ``keras`` through the other finders and wraps their loader."""

    def find_spec(self, name, path=None, target=None):
        if name not in QUIET_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _QuietLoader):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Silence the C++ start-up lines of TensorFlow and Keras for the rest of this process.

    Sets the quiet environment (unless already set) and hooks the first import of
    ``tensorflow`` or ``keras``; does nothing with ``--verbose`` (``AUDIT_VERBOSE=1``).
    """
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
