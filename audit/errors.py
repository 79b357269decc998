"""User-facing errors.

An :class:`AuditError` is a mistake the user can fix (a bad path, an unknown
layer, a malformed spec).  The CLI prints its message on one line and exits
with status 2 instead of showing a traceback.
"""


class AuditError(Exception):
    """A user mistake, reported as one clear line (no traceback)."""
