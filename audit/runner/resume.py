"""``--resume``: which committed shards still hold what the new plan says.

Every committed manifest entry is compared with the new plan's shard of the
same id: its descriptor (source, range, byte offsets), then its identity
(input count, first and last ``image_id``, hash of the input list, hash of
the size and modification time of each file it reads; see
:mod:`audit.data.identity`).  The default refuses at the first shard that
changed, naming it and what changed; ``--resume=replan`` keeps the committed
shards before that one and takes the rest out of the output (manifest entry,
then Parquet file) so they are redone under the new plan.  A part file whose
size or row count disagrees with its entry is not committed: it is redone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from audit.data import formats, fs, identity, io
from audit.data.identity import compare, shard_identity
from audit.errors import AuditError

RESUME_MODES = ("check", "replan")


@dataclass
class Committed:
    """The shards a run skips, and what it found on the way."""

    entries: dict[int, dict] = field(default_factory=dict)  # shard id -> manifest entry (kept)
    broken: dict[int, str] = field(default_factory=dict)  # shard id -> why its part file is not committed
    replanned_from: int | None = None  # --resume=replan: the first shard that changed
    reason: str | None = None  # what changed in it
    dropped: list[int] = field(default_factory=list)  # shards taken out of the output by a replan

    @property
    def images(self) -> int:
        return sum(int(e["inputs"]["stop"]) - int(e["inputs"]["start"]) for e in self.entries.values())

    @property
    def errors(self) -> int:
        return sum(int(e.get("errors", 0)) for e in self.entries.values())


def resume_mode(resume) -> str | None:
    """``resume`` as given to :func:`audit.runner.job.run_job` -> None, "check" or "replan"."""
    if resume in (None, False):
        return None
    if resume is True:
        return "check"
    if resume in RESUME_MODES:
        return resume
    raise AuditError(f"--resume={resume}: expected --resume or --resume=replan")


def reconcile(out, plan, ds: dict, job_id: str, mode: str | None) -> Committed:
    """The committed shards of ``out`` that the new ``plan`` keeps.

    Args:
        out: the output directory.
        plan: the new :class:`audit.data.datasets.Plan`.
        ds: ``spec.dataset`` (to compute identities).
        job_id: the job's id (an entry of another job never matches).
        mode: None (a fresh output), "check" or "replan".

    Returns:
        :class:`Committed`.

    Raises:
        AuditError: (mode "check") a committed shard no longer matches the plan.
    """
    found = Committed()
    if mode is None or not io.has_manifest(out):
        return found
    entries = io.committed_shards(out, broken=found.broken)
    formats.clear_caches()  # a folder listing cached in this process may predate a change
    identity.clear_cache()  # so may a listing of object sizes and times
    by_id = {s.id: s for s in plan.shards}
    for sid in sorted(entries):
        why = _change(entries[sid], by_id.get(sid), ds, plan.classes, job_id)
        if why is None:
            found.entries[sid] = entries[sid]
            continue
        if mode != "replan":
            raise AuditError(
                f"cannot resume: shard {sid} ({io.RECORDS}/{entries[sid].get('file')}) no longer matches the "
                f"dataset: {why}. The dataset changed since the job started: audit it into a new output, or "
                f"rerun with --resume=replan to {_keep(len(found.entries))} and redo the rest")
        found.replanned_from, found.reason = sid, why
        found.dropped = [k for k in sorted(entries) if k >= sid]
        break
    if mode == "replan":
        found.dropped = sorted(set(found.dropped) | _strays(out, plan))
    return found


def notes(found: Committed) -> list[str]:
    """One line per thing a resume found and repairs (broken part files, a replan)."""
    lines = [f"audit: shard {sid} is redone: {why}" for sid, why in sorted(found.broken.items())]
    if found.replanned_from is not None:
        lines.append(f"audit: --resume=replan: shard {found.replanned_from} changed ({found.reason}); keeping "
                     f"{len(found.entries)} committed shards, redoing the rest under the new plan")
    return lines


def drop(out, found: Committed) -> None:
    """Take the shards a replan redoes out of the output (after the output lock is held)."""
    if found.dropped:
        io.uncommit(out, found.dropped)


def _change(entry, shard, ds, classes, job_id) -> str | None:
    return compare(entry, shard, lambda: shard_identity(ds, shard, classes), job_id)


_PART = re.compile(r"part-(\d+)\.(parquet|json)$")


def _strays(out, plan) -> set[int]:
    """Ids of part files or manifest entries beyond the new plan (the dataset shrank)."""
    if fs.is_uri(str(out)):  # record objects no entry names are orphans, removed at the end of the job
        return {sid for sid in io.manifest_entries(out) if sid >= len(plan.shards)}
    out = Path(out)
    stray = set()
    for d in (io.RECORDS, io.MANIFEST):
        for p in (out / d).glob("part-*"):
            m = _PART.match(p.name)
            if m and int(m.group(1)) >= len(plan.shards):
                stray.add(int(m.group(1)))
    return stray


def _keep(n: int) -> str:
    """What --resume=replan keeps, in words: "keep the 3 shards before it", "keep no shard"."""
    if n == 0:
        return "keep no shard (it is the first)"
    return "keep the shard before it" if n == 1 else f"keep the {n} shards before it"
