"""Keep C++ chatter off the user's stderr: TensorFlow's import, Ray's connection retries.

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
import os
import sys


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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with stderr_to(None):
        import keras  # noqa: F401  (imports the backend while stderr is quiet)
        import tensorflow as tf
    return tf
