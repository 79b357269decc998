"""Import TensorFlow without its C++ start-up chatter on stderr.

TensorFlow logs "oneDNN custom operations are on", "Could not find cuda
drivers" and the absl pre-initialisation warning from C++ while it is being
imported, before TF_CPP_MIN_LOG_LEVEL can apply.  For CLI users (and Ray
workers, whose stderr is forwarded to the driver) we point file descriptor 2 at
/dev/null for the duration of the import only.  Python exceptions still
propagate normally.
"""

from __future__ import annotations

import os
import sys


def import_tensorflow():
    """Import and return ``tensorflow`` with C++ start-up logs silenced."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        import keras  # noqa: F401  (imports the backend while stderr is quiet)
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tf
