"""The job commands of a disk's service: consolidate, backup-begin/end, job-*.

A mixin of DiskService (diskservice.py), which gives it the catalog, the
open disk, its ownership and events. A job is journalled under the owner
token of the process that runs it; a job another live process runs is
refused with that process's pid, never touched (docs/control.md,
"Ownership").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import recovery, usage
from .catalog import FINAL_STATES, Catalog
from .chainops import snapshot
from .disk import Disk
from .errors import RequestError
from .identity import format_id
from .jobinfo import describe, job_info, refuse_elsewhere, stats
from .mirror import ACTIVE, MirrorJob, State

log = logging.getLogger(__name__)

PIVOT_TIMEOUT_S = 60.0


class JobCommands:
    catalog: Catalog
    dir: str
    name: str
    jobs: dict[int, MirrorJob]
    _lock: threading.RLock
    _journal: threading.Condition          # notified when a job's row settles
    disk: Callable[[str], Disk]
    settle: Callable[[], None]
    token: str
    users: Callable[[str], list[str]]
    snapshot_images: Callable[[], dict[str, str]]
    is_top: Callable[[str], bool]
    _emit: Callable[[dict[str, Any]], None]

    def consolidate(self, disk: str, into: str | None = None, to: str | None = None,
                    pivot: bool = True) -> dict[str, Any]:
        d = self.disk(disk)
        with self._lock:
            self._refuse_active()
            paths = [os.path.realpath(f.path) for f in d.layers]
            index = 1
            if into is not None:
                want = os.path.realpath(self.catalog.abspath(into))
                if want not in paths[1:]:
                    raise RequestError(self.dir, f"{into} is not a backing image of {disk!r}")
                index = paths.index(want)
            if index >= len(paths):
                raise RequestError(self.dir, f"disk {disk!r} is a single image: nothing "
                                   "to consolidate")
            new_path = self.catalog.abspath(to) if to else None
            if new_path is not None:
                self.catalog.relpath(new_path)
                if os.path.exists(new_path):
                    raise RequestError(self.dir, f"{to} already exists")
                rel = self.catalog.relpath(new_path)
                for row in self.catalog.jobs():
                    if row["new_image"] and row["target"] == rel and not recovery.settled(row):
                        raise RequestError(self.dir, f"{to} is the new image of job "
                                           f"{row['id']} ({row['kind']} of disk "
                                           f"{row['disk']!r}, not finished): resume or "
                                           "cancel it first")
            collapse = index + 1 if new_path else index
            # under the images lock: no linked clone of the image it writes
            # is made between the check and the journal naming the job
            with usage.images_lock(self.dir, f"consolidate {disk}"):
                self._check_consolidation(d, index, new_path)
                job_id = self.catalog.add_job(
                    disk, "consolidate",
                    target=self.catalog.relpath(new_path or d.layers[index].path),
                    new_image=int(bool(new_path)), collapse=collapse,
                    top_before=self.catalog.relpath(d.path), owner=self.token)
            return {"job": self._start(job_id, d, collapse, new_path, pivot)}

    def _check_consolidation(self, d: Disk, index: int, new_path: str | None) -> None:
        """What a consolidation into d.layers[index] (or onto it, with new_path)
        writes or drops must not be a named snapshot's image (the snapshot would
        no longer be its moment), and an image it writes nothing else may read."""
        named = self.snapshot_images()
        for f in d.layers[:index + 1]:
            what = named.get(os.path.realpath(f.path))
            if what is not None:
                raise RequestError(self.dir, f"{self.catalog.relpath(f.path)} is the image "
                                   f"of {what}, which a consolidation would change; "
                                   "'vdisk snapshot delete' merges into it")
        if not new_path:
            users = self.users(d.layers[index].path)
            if users:
                raise RequestError(self.dir, f"{self.catalog.relpath(d.layers[index].path)} "
                                   f"is also used by {', '.join(users)}; "
                                   "consolidate --to a new image instead")

    def _start(self, job_id: int, d: Disk, collapse: int, new_path: str | None,
               pivot: bool) -> dict[str, Any]:
        try:
            job = MirrorJob(d, collapse, new_path=new_path,
                            on_change=lambda j, st: self._changed(job_id, j, st),
                            on_target_id=lambda cid: self.catalog.update_job(
                                job_id, target_id=format_id(cid)))
            self.jobs[job_id] = job
            job.start()
        except Exception as e:
            self.jobs.pop(job_id, None)
            self.catalog.update_job(job_id, state="failed", error=str(e))
            raise
        if pivot:
            threading.Thread(target=self._auto_pivot, args=(job_id,), daemon=True,
                             name=f"vdisk-pivot-{job_id}").start()
        return self._info(self.catalog.job(job_id))

    def _auto_pivot(self, job_id: int) -> None:
        job = self.jobs[job_id]
        while job.wait((State.READY,), 1.0) is State.COPYING:
            pass
        if job.state is State.READY:
            try:
                self.job_complete(job_id)
            except Exception as e:   # noqa: BLE001 - the job journals its own failure
                log.warning("job %d: the pivot failed: %s", job_id, e)

    def _changed(self, job_id: int, job: MirrorJob, state: State) -> None:
        if state is State.DONE:         # recorded and announced by the pivot's cleanup
            return
        if state is State.PIVOTING:
            # recorded by the pivot's persist, in the transaction that names
            # the new top: a commit here would be one more sync in the
            # barrier, where the guest waits
            self._announce(job_id, state.value)
            return
        self.catalog.update_job(job_id, state=state.value, error=job.error, stats=stats(job))
        self._announce(job_id, state.value)

    def _announce(self, job_id: int, state: str) -> None:
        if state in FINAL_STATES:
            with self._journal:
                self._journal.notify_all()
        self._emit({"event": "JOB_STATUS_CHANGE", "timestamp": time.time(),
                    "data": {"id": job_id, "disk": self.name, "state": state}})

    # -- backups ------------------------------------------------------------------------

    def backup_begin(self, disk: str, owner: str, output: str,
                     temp: str | None = None) -> dict[str, Any]:
        """Journal a backup run by the process whose owner token is ``owner`` and
        take its snapshot. Until backup-end (or that process's death) the disk
        has a job, so nothing else writes the frozen layers the backup reads."""
        from .owner import owner_alive

        d = self.disk(disk)
        if owner_alive(self.dir, owner) is None:
            raise RequestError(self.dir, f"backup-begin: owner {owner!r} is not a live process")
        with self._lock:
            self._refuse_active()
            job_id = self.catalog.add_job(disk, "backup", owner=owner, output=output,
                                          temp=temp, top_before=self.catalog.relpath(d.path))
            try:
                frozen = self.catalog.relpath(d.path)
                new = self.catalog.new_image_path(disk)
                snapshot(d, self.catalog.abspath(new), lambda _p: self.catalog.set_top(
                    disk, new, job=job_id, target=frozen, top_after=new), self.is_top)
            except Exception as e:
                self.catalog.update_job(job_id, state="failed", error=str(e))
                raise
        self._announce(job_id, "copying")
        return {"job": self._info(self.catalog.job(job_id)), "disk": disk, "top": new,
                "frozen": frozen}

    def backup_end(self, id: int, owner: str, error: str | None = None,  # noqa: A002
                   bytes: int | None = None) -> dict[str, Any]:  # noqa: A002
        row = self._row(id)
        if row["kind"] != "backup":
            raise RequestError(self.dir, f"job {id} is a {row['kind']}, not a backup")
        state = "failed" if error else "done"
        if row["owner"] != owner:
            raise RequestError(self.dir, f"job {id} belongs to another process")
        if row["state"] == state and (row["error"] or None) == (error or None):
            return {"job": self._info(row)}     # (a retry, after the worker restarted)
        if row["state"] != "copying":
            raise RequestError(self.dir, f"job {id} is {row['state']}")
        self.catalog.update_job(id, state=state, error=error,
                                stats={"bytes": bytes} if bytes is not None else {})
        self._announce(id, state)
        return {"job": self._info(self.catalog.job(id))}

    # -- jobs -----------------------------------------------------------------------------

    def job_complete(self, id: int) -> dict[str, Any]:   # noqa: A002 - protocol name
        """Pivot a ready job; return once the journal records it done (its
        dropped images deleted), also for a job that pivoted on its own."""
        job, row = self._live(id)
        # images that other disks' chains use stay (a replaced layer may be shared)
        dropped = [self.catalog.relpath(f.path) for f in job.disk.layers[:job.collapse]
                   if not self.users(f.path)]
        target = row["target"]

        def persist(_path: str) -> None:
            self.catalog.set_top(self.name, target, job=id, state="pivoting",
                                 top_after=target, dropped=dropped)

        if job.state is State.READY:
            try:
                job.complete(persist)
                recovery.finish_pivot(self.catalog, id, dropped, stats=stats(job))
                self._announce(id, "done")
            except RequestError:
                if job.state not in (State.PIVOTING, State.DONE):
                    raise
        if job.state not in (State.PIVOTING, State.DONE):
            raise RequestError(self.dir, f"job {id} is {job.state.value}, not ready")
        with self._journal:             # pivoted by another thread: wait for its journal
            if not self._journal.wait_for(lambda: self.catalog.job(id)["state"] == "done",
                                          PIVOT_TIMEOUT_S):
                raise RequestError(self.dir, f"job {id} did not finish its pivot within "
                                   f"{PIVOT_TIMEOUT_S:g} s")
        return {"job": self._info(self.catalog.job(id))}

    def job_cancel(self, id: int) -> dict[str, Any]:   # noqa: A002
        row = self._row(id)
        if row["state"] in FINAL_STATES:
            raise RequestError(self.dir, f"job {id} is {row['state']}: nothing to cancel")
        job = self.jobs.get(id)
        if job is not None:
            if job.state not in ACTIVE:
                raise RequestError(self.dir, f"job {id} is {job.state.value}: too late to "
                                   "cancel")
            job.cancel()
        else:
            refuse_elsewhere(self.catalog, row, here=False)
            self.settle()                       # a dead job: interrupted, done or failed
            row = self.catalog.job(id)
            if row["state"] == recovery.INTERRUPTED:
                recovery.roll_back(self.catalog, row)
                self.catalog.update_job(id, state="cancelled")
        return {"job": self._info(self.catalog.job(id))}

    def job_resume(self, id: int) -> dict[str, Any]:   # noqa: A002
        row = self._row(id)
        refuse_elsewhere(self.catalog, row, here=id in self.jobs)
        if row["kind"] == "backup":
            raise RequestError(self.dir, f"job {id} is a backup, which cannot be resumed: run "
                               f"'vdisk backup' again ('vdisk job cancel {id}' closes this one)")
        d = self.disk(self.name)
        self.settle()                           # a dead job: interrupted or done
        before, row = row, self.catalog.job(id)
        if before["state"] == "pivoting" and row["state"] == "done":
            return {"job": self._info(row)}     # its pivot was recorded: finished now
        if row["state"] != recovery.INTERRUPTED:
            raise RequestError(self.dir, f"job {id} is {row['state']}, not interrupted")
        new_path = self.catalog.abspath(row["target"]) if row["new_image"] else None
        # what was checked when the job started may have changed since it died
        # (a clone of its target, a named snapshot): checked again
        index = row["collapse"] - 1 if new_path else row["collapse"]
        self._check_consolidation(d, index, new_path)
        if new_path and os.path.exists(new_path):   # a half-written image of the dead run
            if not usage.delete(self.catalog, [new_path]):
                raise RequestError(self.dir, f"{row['target']} cannot be removed (a disk or "
                                   "snapshot uses it now, or a broken chain may): job "
                                   f"{id} cannot run again; cancel it")
        with usage.images_lock(self.dir, f"resume job {id}"):     # (as in consolidate)
            self._check_consolidation(d, index, new_path)
            self.catalog.update_job(id, state="copying", error=None, owner=self.token)
        return {"job": self._start(id, d, row["collapse"], new_path, True)}

    def query_jobs(self, disk: str | None = None, id: int | None = None) -> dict[str, Any]:  # noqa: A002
        if disk is not None and disk != self.name:
            raise RequestError(self.dir, f"this service runs disk {self.name!r}, not {disk!r}")
        return {"jobs": [self._info(r) for r in self.catalog.jobs(disk=self.name, job=id)]}

    # -- helpers ------------------------------------------------------------------------

    def _row(self, id: int) -> dict[str, Any]:  # noqa: A002
        row = self.catalog.job(id)
        if row["disk"] != self.name:
            raise RequestError(self.dir, f"job {id} is a job of disk {row['disk']!r}, not of "
                               f"{self.name!r}")
        return row

    def _live(self, id: int) -> tuple[MirrorJob, dict[str, Any]]:  # noqa: A002
        row = self._row(id)
        job = self.jobs.get(id)
        if job is None:
            refuse_elsewhere(self.catalog, row, here=False)
            info = self._info(row)
            hint = "; use job-resume or job-cancel" if info["state"] == "interrupted" else ""
            raise RequestError(self.dir, f"job {id} is {info['state']}{hint}")
        return job, row

    def _refuse_active(self) -> None:
        """Refuse a new job while the disk has one (the caller owns the disk)."""
        row = self.catalog.active_job(self.name)
        if row is not None and recovery.dead(self.catalog, row, self.jobs):
            self.settle()                       # a dead backup fails and holds up nothing
            row = self.catalog.active_job(self.name)
        if row is not None:
            raise RequestError(self.dir, f"disk {self.name!r} already has a job: "
                               f"{describe(self.catalog, row, self.jobs.get(row['id']))}")

    def _info(self, row: dict[str, Any]) -> dict[str, Any]:
        return job_info(self.catalog, row, self.jobs.get(row["id"]))
