"""A journalled job as clients see it, from any process (docs/control.md).

The journal row says what the job's owner last recorded. For a job that no
live process runs any more, it also says what the disk's next owner will
settle it to (recovery.py); for a job running in this process, the live
figures of its MirrorJob. Reading takes no lock and changes nothing.
"""

from __future__ import annotations

import os
from typing import Any

from . import owner, recovery
from .catalog import Catalog
from .errors import RequestError
from .mirror import MirrorJob, State

STAT_FIELDS = ("copy_set_bytes", "bytes_copied", "bytes_mirrored", "bytes_direct",
               "bytes_handed_down", "passes",
               "time_to_ready_s", "duration_s", "pivot_pause_ms")


def stats(job: MirrorJob) -> dict[str, Any]:
    info = job.info()
    return {k: info[k] for k in STAT_FIELDS}


def job_info(catalog: Catalog, row: dict[str, Any], job: MirrorJob | None = None) -> dict[str, Any]:
    """A row as clients see it: the live figures of ``job`` (the MirrorJob
    running it in this process, if any), the pid of the process running it,
    and for a job whose process died, the state it will be settled to."""
    info = dict(row)
    info.pop("collapse", None)
    info.pop("temp", None)
    token = info.pop("owner", None)
    info["owner_pid"] = None
    if recovery.settled(row):
        return info
    if job is not None:
        info.update(stats(job))
        # done only once the journal says so: the dropped images are gone then
        info["state"] = "pivoting" if job.state is State.DONE else job.state.value
        info["error"] = job.error
        info["owner_pid"] = os.getpid()
    elif (holder := owner.owner_alive(catalog.dir, token)) is not None:
        info["owner_pid"] = holder.pid
    elif (state := recovery.verdict(catalog, row)) != "done":
        info["state"] = state
        info["error"] = recovery.why_interrupted(row)
    else:
        info["error"] = ("its process stopped after the pivot was recorded; the disk's next "
                         "owner deletes what it dropped ('vdisk job resume' does it now)")
    return info


def describe(catalog: Catalog, row: dict[str, Any], job: MirrorJob | None = None) -> str:
    """'backup job 7 (copying, running in process 1234)', for refusals."""
    info = job_info(catalog, row, job)
    text = f"{info['kind']} job {info['id']} ({info['state']}"
    if info["owner_pid"] is not None and info["owner_pid"] != os.getpid():
        text += f", running in process {info['owner_pid']}"
    if info["state"] == recovery.INTERRUPTED:
        text += f"; 'vdisk job resume {info['id']}' or 'vdisk job cancel {info['id']}'"
    return text + ")"


def refuse_elsewhere(catalog: Catalog, row: dict[str, Any], here: bool) -> None:
    """Refuse to touch a job that another live process runs (``here``: this
    process runs it)."""
    if recovery.settled(row) or here:
        return
    holder = owner.owner_alive(catalog.dir, row.get("owner"))
    if holder is not None:
        raise RequestError(catalog.dir, f"job {row['id']} ({row['kind']} of disk "
                           f"{row['disk']!r}) is running in {holder}")
