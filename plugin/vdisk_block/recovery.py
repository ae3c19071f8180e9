"""What a disk's dead owners left, set right by its next owner.

A process runs this once for a disk, when it becomes the disk's owner
(service.own, owner.py). A job of that disk whose owner is dead (its lock is
free: the process is gone, however it ended) is settled by its journal row:

- a consolidation whose pivot was recorded (the disk's top is the job's
  target) is finished: the images it dropped are deleted, the journal says
  `done`;
- any other consolidation is `interrupted`: the disk still serves its old
  chain, which reads what the guest wrote (a job into the image below the
  top may have moved data from the top into it, and the guest's writes
  where the top held nothing went there); `job-resume` runs it again and
  `job-cancel` rolls it back (removing a half-written new image);
- a backup has `failed`: its temporary copy is removed; the snapshot it took
  stays in the chain (a consolidation merges it). A backup cannot be resumed,
  so it holds up no later job.

A job whose owner lives (a backup run by a `vdisk backup` command while the
disk's server restarts) is left alone. Then the target of the disk's last
consolidation is rebound (see rebind_target).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from typing import Any

from . import usage
from .catalog import FINAL_STATES, Catalog
from .chain import chain_paths
from .errors import ImageError
from .identity import format_id, rebind
from .identity import read as read_identity
from .owner import owner_alive

INTERRUPTED = "interrupted"


def settled(row: dict[str, Any]) -> bool:
    return row["state"] in FINAL_STATES or row["state"] == INTERRUPTED


def verdict(catalog: Catalog, row: dict[str, Any]) -> str:
    """What a job whose owner died is: `done` (its pivot was recorded, only the
    deletion of the dropped images may be missing), `failed` (a backup) or
    `interrupted`."""
    if row["kind"] == "backup":
        return "failed"
    if row["state"] == "pivoting" and catalog.disk(row["disk"])["top"] == row["top_after"]:
        return "done"
    return INTERRUPTED


def dead(catalog: Catalog, row: dict[str, Any], live: Collection[int] = ()) -> bool:
    """An unsettled job that no live process runs."""
    return not settled(row) and row["id"] not in live and \
        owner_alive(catalog.dir, row.get("owner")) is None


def why_interrupted(row: dict[str, Any]) -> str:
    if row["kind"] == "backup":
        return (f"the backup command stopped before it finished; its snapshot "
                f"{row['target'] or '(none)'} stays in the chain ('vdisk consolidate "
                f"{row['disk']} --into {row['target']}' merges it)")
    return "the process running the job stopped before it finished"


def recover_disk(catalog: Catalog, disk: str, live: Collection[int] = ()) -> list[int]:
    """Settle the dead jobs of a disk (idempotent; by its owner only); returns
    the ids of those it finished (done)."""
    finished = []
    rows = catalog.jobs(disk=disk)                  # newest first
    for row in rows:
        if not dead(catalog, row, live):
            continue
        state = verdict(catalog, row)
        if state == "done":
            finish_pivot(catalog, row["id"], row["dropped"])
            finished.append(row["id"])
            continue
        if row["kind"] == "backup":
            remove_temp(row)
        catalog.update_job(row["id"], state=state, error=why_interrupted(row))
    last = next((r for r in rows if r["kind"] == "consolidate"), None)
    if last is not None:
        rebind_target(catalog, catalog.job(last["id"]))
    return finished


def finish_pivot(catalog: Catalog, job: int, dropped: list[str], **fields: Any) -> None:
    """The end of a recorded pivot: delete what it dropped (what nothing else
    needs by now: usage.py; the top before the pivot even while another chain
    is broken), journal `done`."""
    top_before = catalog.job(job)["top_before"]
    usage.delete(catalog, [catalog.abspath(rel) for rel in dropped],
                 tops=[catalog.abspath(top_before)] if top_before else [])
    catalog.update_job(job, state="done", **fields)


def roll_back(catalog: Catalog, row: dict[str, Any]) -> None:
    """Undo what an interrupted consolidation left: a half-written new image
    (unless something else uses that name by now)."""
    if row["new_image"]:
        usage.delete(catalog, [catalog.abspath(row["target"])])


def not_a_moment(catalog: Catalog, rel: str) -> str | None:
    """Why an image of the datastore is not a moment of its disk, or None.

    A consolidation into an image of a chain copies the layers above into it
    as it goes: while it runs, after it stopped (interrupted, cancelled,
    failed), the image holds a mix that the disk never was (the disk reads
    the same, through its layers above). Its content ID says so: the one the
    job gave it (``target_id``), as long as nothing wrote it since."""
    from .identity import read as read_identity

    real = os.path.realpath(catalog.abspath(rel))
    for row in catalog.jobs():
        if row["kind"] != "consolidate" or row["new_image"] or row["state"] == "done" or \
                os.path.realpath(catalog.abspath(row["target"] or "")) != real:
            continue
        if not settled(row):
            return f"is the target of consolidation job {row['id']}, which has not finished"
        try:
            current = format_id(read_identity(real)[1].content_id)
        except (ImageError, OSError):
            continue
        if row["target_id"] and current == row["target_id"]:
            return (f"holds part of the layers above it since consolidation job {row['id']} "
                    f"into it was {row['state']}: it is not a moment of disk {row['disk']!r} "
                    "(snapshot the disk and clone that instead)")
    return None


def remove_temp(row: dict[str, Any]) -> None:
    """A backup's copy in progress (``.NAME.PID.tmp`` beside its destination)."""
    temp = row.get("temp")
    if temp and os.path.basename(temp).startswith(".") and temp.endswith(".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def rebind_target(catalog: Catalog, row: dict[str, Any]) -> None:
    """A job into an image of the chain may have stopped (crash, failure)
    between giving the target the fresh content ID it journalled and
    recording that ID in the image above (mirror.py). If the target still
    has exactly that ID, record it: the chain reads the same through it.
    Any other ID means someone else wrote the target: the chain stays
    refused. Idempotent."""
    if row["new_image"] or not row.get("target_id") or row["state"] == "done":
        return
    try:
        chain = chain_paths(catalog.abspath(catalog.disk(row["disk"])["top"]))
        target = os.path.realpath(catalog.abspath(row["target"]))
        real = [os.path.realpath(p) for p in chain]
        if target not in real[1:]:
            return
        i = real.index(target)
        if format_id(read_identity(chain[i])[1].content_id) == row["target_id"]:
            rebind(chain[i - 1], chain[i])
    except (ImageError, OSError):
        pass            # opening the disk reports what is wrong
