"""The progress bar of a job: images (committed + inside shards), images/s, ETA, errors, pending actors."""

from __future__ import annotations

import sys


class Progress:
    """A tqdm bar of committed images (plus those inside shards), or nothing with ``enabled=False``."""

    def __init__(self, total, initial, errors, enabled, name):
        self.bar = None
        self.name = name
        self.committed = initial
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", desc=name, dynamic_ncols=True,
                            smoothing=0.1, file=sys.stderr)
            self.bar.set_postfix(errors=errors)

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def update(self, n, errors):
        """``n`` more images committed."""
        self.committed += n
        self.show(0, errors)

    def show(self, live, errors=None):
        """Show committed images plus ``live`` images done in shards not yet committed.

        The count never goes back (a shard retried after a failure is not taken
        off again); it always ends at the committed count.
        """
        if self.bar is not None:
            n = min(self.committed + live, self.bar.total)
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)
            if errors is not None:
                self.bar.set_postfix(errors=errors, refresh=False)

    def pool(self, line, waiting):
        """The actor pool changed while shards wait for it (``waiting for 4 GPU actors: 1 running, 3 pending``).

        The line is written once (it reaches the job's log) and, while actors
        are pending, stays in the bar's description.
        """
        self.write(f"audit: {line}")
        if self.bar is not None:
            self.bar.set_description(f"{self.name} ({line})" if waiting else self.name, refresh=False)

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
