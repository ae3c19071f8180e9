"""The job commands of a datastore's service: consolidate, backup, job-*.

A mixin of DatastoreService (service.py), which gives it the catalog, the
open disks, ownership and events. A job is journalled under the owner token
of the process that runs it; a job another live process runs is refused
with that process's pid, never touched (docs/control.md, "Ownership").
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import owner, recovery
from .catalog import FINAL_STATES, Catalog
from .chainops import snapshot
from .disk import Disk
from .errors import RequestError
from .identity import format_id
from .mirror import ACTIVE, MirrorJob, State


class JobCommands:
    catalog: Catalog
    dir: str
    jobs: dict[int, MirrorJob]
    _lock: threading.RLock
    disk: Callable[[str], Disk]
    own: Callable[[str], None]
    token: str
    _users: Callable[[str, str], list[str]]
    _emit: Callable[[dict[str, Any]], None]

    def consolidate(self, disk: str, into: str | None = None, to: str | None = None,
                    pivot: bool = True) -> dict[str, Any]:
        d = self.disk(disk)
        with self._lock:
            self._refuse_active(disk)
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
            collapse = index + 1 if new_path else index
            if not new_path:
                users = self._users(d.layers[index].path, disk)
                if users:
                    raise RequestError(self.dir, f"{self.catalog.relpath(d.layers[index].path)} "
                                       f"is also used by disk(s) {', '.join(users)}; "
                                       "consolidate --to a new image instead")
            job_id = self.catalog.add_job(
                disk, "consolidate", target=self.catalog.relpath(new_path or d.layers[index].path),
                new_image=int(bool(new_path)), collapse=collapse,
                top_before=self.catalog.relpath(d.path), owner=self.token)
            return {"job": self._start(job_id, disk, d, collapse, new_path, pivot)}

    def _start(self, job_id: int, disk: str, d: Disk, collapse: int, new_path: str | None,
               pivot: bool) -> dict[str, Any]:
        try:
            job = MirrorJob(d, collapse, new_path=new_path,
                            on_change=lambda j, st: self._changed(job_id, disk, j, st),
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
        return self._job_info(self.catalog.job(job_id))

    def _auto_pivot(self, job_id: int) -> None:
        job = self.jobs[job_id]
        while job.wait((State.READY,), 1.0) in (State.COPYING,):
            pass
        if job.state is State.READY:
            try:
                self.job_complete(job_id)
            except Exception:   # noqa: BLE001 - recorded in the journal by the job
                pass

    def _changed(self, job_id: int, disk: str, job: MirrorJob, state: State) -> None:
        if state is State.DONE:         # recorded and announced by the pivot's cleanup
            return
        self.catalog.update_job(job_id, state=state.value, error=job.error, stats=_stats(job))
        self._announce(job_id, disk, state.value)

    def _announce(self, job_id: int, disk: str, state: str) -> None:
        self._emit({"event": "JOB_STATUS_CHANGE", "timestamp": time.time(),
                    "data": {"id": job_id, "disk": disk, "state": state}})

    # -- backups ------------------------------------------------------------------------

    def backup_begin(self, disk: str, owner: str, output: str,  # noqa: A002
                     temp: str | None = None) -> dict[str, Any]:
        """Journal a backup run by the process whose owner token is ``owner`` and
        take its snapshot. Until backup-end (or that process's death) the disk
        has a job, so nothing else writes the frozen layers the backup reads."""
        from .owner import owner_alive

        d = self.disk(disk)
        if owner_alive(self.dir, owner) is None:
            raise RequestError(self.dir, f"backup-begin: owner {owner!r} is not a live process")
        with self._lock:
            self._refuse_active(disk)
            job_id = self.catalog.add_job(disk, "backup", owner=owner, output=output,
                                          temp=temp, top_before=self.catalog.relpath(d.path))
            try:
                frozen = self.catalog.relpath(d.path)
                new = self.catalog.new_image_path(disk)
                snapshot(d, self.catalog.abspath(new), lambda _p: self.catalog.set_top(
                    disk, new, job=job_id, target=frozen, top_after=new))
            except Exception as e:
                self.catalog.update_job(job_id, state="failed", error=str(e))
                raise
        self._announce(job_id, disk, "copying")
        return {"job": self._job_info(self.catalog.job(job_id)), "disk": disk, "top": new,
                "frozen": frozen}

    def backup_end(self, id: int, owner: str, error: str | None = None,  # noqa: A002
                   bytes: int | None = None) -> dict[str, Any]:  # noqa: A002
        row = self.catalog.job(id)
        if row["kind"] != "backup":
            raise RequestError(self.dir, f"job {id} is a {row['kind']}, not a backup")
        if row["state"] != "copying":
            raise RequestError(self.dir, f"job {id} is {row['state']}")
        if row["owner"] != owner:
            raise RequestError(self.dir, f"job {id} belongs to another process")
        state = "failed" if error else "done"
        stats = {"bytes": bytes} if bytes is not None else {}
        self.catalog.update_job(id, state=state, error=error, stats=stats)
        self._announce(id, row["disk"], state)
        return {"job": self._job_info(self.catalog.job(id))}

    # -- jobs -----------------------------------------------------------------------------

    def job_complete(self, id: int) -> dict[str, Any]:   # noqa: A002 - protocol name
        job, row = self._live(id)
        disk = row["disk"]
        # images that other disks' chains use stay (a replaced layer may be shared)
        dropped = [self.catalog.relpath(f.path) for f in job.disk.layers[:job.collapse]
                   if not self._users(f.path, disk)]
        target = row["target"]

        def persist(_path: str) -> None:
            self.catalog.set_top(disk, target, job=id, state="pivoting", top_after=target,
                                 dropped=dropped)

        if job.state is State.READY:
            try:
                job.complete(persist)
                recovery.finish_pivot(self.catalog, id, dropped, stats=_stats(job))
                self._announce(id, disk, "done")
            except RequestError:
                if job.state not in (State.PIVOTING, State.DONE):
                    raise
        if job.state in (State.PIVOTING, State.DONE):     # pivoted by someone else
            job.wait((State.DONE,), 60)
            for _ in range(600):
                if self.catalog.job(id)["state"] == "done":
                    break
                time.sleep(0.05)
        elif job.state is not State.DONE:
            raise RequestError(self.dir, f"job {id} is {job.state.value}, not ready")
        return {"job": self._job_info(self.catalog.job(id))}

    def job_cancel(self, id: int) -> dict[str, Any]:   # noqa: A002
        row = self.catalog.job(id)
        if row["state"] in FINAL_STATES:
            raise RequestError(self.dir, f"job {id} is {row['state']}: nothing to cancel")
        job = self.jobs.get(id)
        if job is not None:
            if job.state not in ACTIVE:
                raise RequestError(self.dir, f"job {id} is {job.state.value}: too late to "
                                   "cancel")
            job.cancel()
        else:
            self._refuse_elsewhere(row)
            self.own(row["disk"], settle=True)  # a dead job: interrupted, done or failed
            row = self.catalog.job(id)
            if row["state"] == recovery.INTERRUPTED:
                recovery.roll_back(self.catalog, row)
                self.catalog.update_job(id, state="cancelled")
        return {"job": self._job_info(self.catalog.job(id))}

    def job_resume(self, id: int) -> dict[str, Any]:   # noqa: A002
        row = self.catalog.job(id)
        self._refuse_elsewhere(row)
        if row["kind"] == "backup":
            raise RequestError(self.dir, f"job {id} is a backup, which cannot be resumed: run "
                               f"'vdisk backup' again ('vdisk job cancel {id}' closes this one)")
        d = self.disk(row["disk"])
        self.own(row["disk"], settle=True)      # a dead job: interrupted or done
        row = self.catalog.job(id)
        if row["state"] != recovery.INTERRUPTED:
            raise RequestError(self.dir, f"job {id} is {row['state']}, not interrupted")
        new_path = self.catalog.abspath(row["target"]) if row["new_image"] else None
        if new_path and os.path.exists(new_path):
            os.unlink(new_path)             # a half-written image from the dead run
        self.catalog.update_job(id, state="copying", error=None, owner=self.token)
        return {"job": self._start(id, row["disk"], d, row["collapse"], new_path, True)}

    def query_jobs(self, disk: str | None = None, id: int | None = None) -> dict[str, Any]:  # noqa: A002
        if disk is not None:
            self.catalog.disk(disk)             # a disk that does not exist is an error
        return {"jobs": [self._job_info(r) for r in self.catalog.jobs(disk=disk, job=id)]}

    def _live(self, id: int) -> tuple[MirrorJob, dict[str, Any]]:  # noqa: A002
        row = self.catalog.job(id)
        job = self.jobs.get(id)
        if job is None:
            self._refuse_elsewhere(row)
            info = self._job_info(row)
            hint = "; use job-resume or job-cancel" if info["state"] == "interrupted" else ""
            raise RequestError(self.dir, f"job {id} is {info['state']}{hint}")
        return job, row

    def _refuse_active(self, disk: str) -> None:
        """Refuse a new job while the disk has one (the caller owns the disk)."""
        row = self.catalog.active_job(disk)
        if row is not None and recovery.dead(self.catalog, row, self.jobs):
            self.own(disk, settle=True)         # a dead backup fails and holds up nothing
            row = self.catalog.active_job(disk)
        if row is not None:
            raise RequestError(self.dir, f"disk {disk!r} already has a job: "
                               f"{self._describe(row)}")

    def _refuse_elsewhere(self, row: dict[str, Any]) -> None:
        """Refuse to touch a job that another live process runs."""
        if recovery.settled(row) or row["id"] in self.jobs:
            return
        holder = owner.owner_alive(self.dir, row.get("owner"))
        if holder is not None:
            raise RequestError(self.dir, f"job {row['id']} ({row['kind']} of disk "
                               f"{row['disk']!r}) is running in {holder}")

    def _describe(self, row: dict[str, Any]) -> str:
        info = self._job_info(row)
        text = f"{info['kind']} job {info['id']} ({info['state']}"
        if info["owner_pid"] is not None and info["owner_pid"] != os.getpid():
            text += f", running in process {info['owner_pid']}"
        if info["state"] == recovery.INTERRUPTED:
            text += f"; 'vdisk job resume {info['id']}' or 'vdisk job cancel {info['id']}'"
        return text + ")"

    def _job_info(self, row: dict[str, Any]) -> dict[str, Any]:
        """A journal row as clients see it: live figures of a job running here,
        the pid of the process running it, and `interrupted` for a job whose
        process died (until the disk's next owner journals it)."""
        job = self.jobs.get(row["id"])
        info = dict(row)
        info.pop("collapse", None)
        info.pop("temp", None)
        token = info.pop("owner", None)
        info["owner_pid"] = None
        if recovery.settled(row):
            return info
        if job is not None:
            info.update(_stats(job))
            # done only once the journal says so: the dropped images are gone then
            info["state"] = "pivoting" if job.state is State.DONE else job.state.value
            info["error"] = job.error
            info["owner_pid"] = os.getpid()
        elif (holder := owner.owner_alive(self.dir, token)) is not None:
            info["owner_pid"] = holder.pid
        elif (state := recovery.verdict(self.catalog, row)) != "done":
            info["state"] = state
            info["error"] = recovery.why_interrupted(row)
        return info


def _stats(job: MirrorJob) -> dict[str, Any]:
    info = job.info()
    return {k: info[k] for k in ("copy_set_bytes", "bytes_copied", "bytes_mirrored", "passes",
                                 "time_to_ready_s", "duration_s", "pivot_pause_ms")}
