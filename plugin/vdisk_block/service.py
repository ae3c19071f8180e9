"""The commands of a datastore (docs/control.md): snapshot, consolidate, jobs.

One DatastoreService runs inside nbdkit for a served datastore (behind the
control socket) or in the `vdisk` command's own process for one that is not;
either way every change of a disk's top goes through the catalog in one
durable step before any request reaches the new top.

Crash recovery, when the service starts: a job the journal shows running died
with its server. If its pivot was recorded (the disk's top is the job's
target), the pivot is finished: the images it dropped are deleted. Otherwise
the job is `interrupted`: the disk still serves its old chain (whose data the
job never changed), and `job-resume` runs it again or `job-cancel` rolls it
back (removing a half-written new image).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import __version__
from . import header as hdr
from .catalog import FINAL_STATES, Catalog, CatalogError
from .chain import chain_paths, open_disk
from .chainops import snapshot
from .disk import Disk
from .errors import ImageError, RequestError
from .identity import format_id, rebind
from .identity import read as read_identity
from .mirror import MirrorJob, State

Event = dict[str, Any]


class DatastoreService:
    def __init__(self, directory: str, readonly: bool = False,
                 concurrent_reads: bool = False) -> None:
        self.catalog = Catalog(directory)
        self.dir = self.catalog.dir
        self.readonly = readonly
        self.concurrent_reads = concurrent_reads
        self.disks: dict[str, Disk] = {}
        self.jobs: dict[int, MirrorJob] = {}
        self.listeners: list[Callable[[Event], None]] = []
        self._lock = threading.RLock()
        self._recover()

    def close(self) -> None:
        with self._lock:
            for job in list(self.jobs.values()):
                if job.state in (State.COPYING, State.READY):
                    job.cancel()
            for d in self.disks.values():
                d.close()
            self.disks.clear()
            self.catalog.close()

    # -- disks --------------------------------------------------------------------

    def disk(self, name: str) -> Disk:
        """The open Disk of a catalog disk, opened on first use and shared."""
        with self._lock:
            d = self.disks.get(name)
            if d is None:
                top = self.catalog.abspath(self.catalog.disk(name)["top"])
                d = self.disks[name] = open_disk(top, readonly=self.readonly)
                d.concurrent_reads = self.concurrent_reads
            return d

    def _chain(self, name: str) -> list[str]:
        d = self.disks.get(name)
        if d is not None:
            return [f.path for f in d.layers]
        return chain_paths(self.catalog.abspath(self.catalog.disk(name)["top"]))

    def _users(self, path: str, besides: str) -> list[str]:
        """Other disks whose chain contains path."""
        path = os.path.realpath(path)
        return [r["name"] for r in self.catalog.disks() if r["name"] != besides and
                path in (os.path.realpath(p) for p in self._chain(r["name"]))]

    # -- commands -------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        handler = _COMMANDS.get(command)
        if handler is None:
            raise CommandNotFound(self.dir, f"unknown command {command!r}")
        args = dict(arguments or {})
        for name, value in args.items():
            want = _ARG_TYPES.get(name)
            if want is not None and (not isinstance(value, want) or
                                     (want is int and isinstance(value, bool))):
                raise RequestError(self.dir, f"{command}: argument {name!r} must be "
                                   f"{_TYPE_NAMES[want]}, not {type(value).__name__}")
        try:
            return handler(self, **args)
        except TypeError as e:
            if "argument" in str(e):
                raise RequestError(self.dir, f"{command}: {e}".replace(
                    f"{handler.__name__}() ", "")) from None
            raise

    def query_disks(self, disk: str | None = None) -> dict[str, Any]:
        rows = [self.catalog.disk(disk)] if disk else self.catalog.disks()
        out = []
        for r in rows:
            d = self.disks.get(r["name"])
            job = self.catalog.active_job(r["name"])
            info = {"name": r["name"], "top": r["top"], "chain": [], "size": None,
                    "open": d is not None, "job": self._job_info(job) if job else None,
                    "error": None}
            try:
                info["chain"] = [self.catalog.relpath(p) for p in self._chain(r["name"])]
                info["size"] = d.size if d else self._virtual_size(r["top"])
            except (ImageError, OSError) as e:
                if disk:                # asked for this one disk: say what is wrong
                    raise
                info["error"] = str(e)  # one broken chain does not hide the others
            out.append(info)
        return {"disks": out}

    def snapshot(self, disk: str) -> dict[str, Any]:
        d = self.disk(disk)
        with self._lock:
            if self.catalog.active_job(disk):
                raise RequestError(self.dir, f"disk {disk!r} has a job; finish it first")
            frozen = self.catalog.relpath(d.path)
            new = self.catalog.new_image_path(disk)
            snapshot(d, self.catalog.abspath(new), lambda _p: self.catalog.set_top(disk, new))
        return {"disk": disk, "top": new, "frozen": frozen}

    def consolidate(self, disk: str, into: str | None = None, to: str | None = None,
                    pivot: bool = True) -> dict[str, Any]:
        d = self.disk(disk)
        with self._lock:
            if self.catalog.active_job(disk):
                raise RequestError(self.dir, f"disk {disk!r} already has a job")
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
                top_before=self.catalog.relpath(d.path))
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
                self._finish_pivot(id, dropped, stats=_stats(job))
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

    def _finish_pivot(self, id: int, dropped: list[str], **fields: Any) -> None:  # noqa: A002
        for rel in dropped:
            try:
                os.unlink(self.catalog.abspath(rel))
            except FileNotFoundError:
                pass
        self.catalog.update_job(id, state="done", **fields)
        self._announce(id, self.catalog.job(id)["disk"], "done")

    def job_cancel(self, id: int) -> dict[str, Any]:   # noqa: A002
        row = self.catalog.job(id)
        if id in self.jobs:
            self.jobs[id].cancel()
        elif row["state"] == "interrupted":
            if row["new_image"] and os.path.exists(self.catalog.abspath(row["target"])):
                os.unlink(self.catalog.abspath(row["target"]))
            self.catalog.update_job(id, state="cancelled")
        else:
            raise RequestError(self.dir, f"job {id} is {row['state']}")
        return {"job": self._job_info(self.catalog.job(id))}

    def job_resume(self, id: int) -> dict[str, Any]:   # noqa: A002
        row = self.catalog.job(id)
        if row["state"] != "interrupted":
            raise RequestError(self.dir, f"job {id} is {row['state']}, not interrupted")
        d = self.disk(row["disk"])
        new_path = self.catalog.abspath(row["target"]) if row["new_image"] else None
        if new_path and os.path.exists(new_path):
            os.unlink(new_path)             # a half-written image from the dead run
        self.catalog.update_job(id, state="copying", error=None)
        return {"job": self._start(id, row["disk"], d, row["collapse"], new_path, True)}

    def flush(self, disk: str | None = None) -> dict[str, Any]:
        """Flush open disks (all of them, or one): what they acknowledged is on disk."""
        with self._lock:
            disks = [self.disk(disk)] if disk else list(self.disks.values())
        for d in disks:
            d.flush()
        return {"flushed": len(disks)}

    def query_jobs(self, disk: str | None = None, id: int | None = None) -> dict[str, Any]:  # noqa: A002
        return {"jobs": [self._job_info(r) for r in self.catalog.jobs(disk=disk, job=id)]}

    def disk_remove(self, disk: str) -> dict[str, Any]:
        with self._lock:
            if disk in self.disks:
                raise RequestError(self.dir, f"disk {disk!r} is open; stop serving it first")
            if self.catalog.active_job(disk):
                raise RequestError(self.dir, f"disk {disk!r} has a job")
            mine = {os.path.realpath(p) for p in self._chain(disk)}
            for r in self.catalog.disks():
                if r["name"] != disk:
                    mine -= {os.path.realpath(p) for p in self._chain(r["name"])}
            self.catalog.remove_disk(disk)
            for p in mine:
                os.unlink(p)
        return {}

    # -- helpers --------------------------------------------------------------------

    def _virtual_size(self, top: str) -> int:
        fd = os.open(self.catalog.abspath(top), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hdr.parse_header(fd, top).size
        finally:
            os.close(fd)

    def _live(self, id: int) -> tuple[MirrorJob, dict[str, Any]]:  # noqa: A002
        row = self.catalog.job(id)
        job = self.jobs.get(id)
        if job is None:
            hint = "; use job-resume or job-cancel" if row["state"] == "interrupted" else ""
            raise RequestError(self.dir, f"job {id} is {row['state']}{hint}")
        return job, row

    def _job_info(self, row: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.get(row["id"])
        info = dict(row)
        info.pop("collapse", None)
        if job is not None and row["state"] not in FINAL_STATES:
            info.update(_stats(job))
            # done only once the journal says so: the dropped images are gone then
            info["state"] = "pivoting" if job.state is State.DONE else job.state.value
            info["error"] = job.error
        return info

    def _emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            listener(event)

    def _recover(self) -> None:
        latest: dict[str, dict[str, Any]] = {}
        for row in self.catalog.jobs():             # newest first
            latest.setdefault(row["disk"], row)
            if row["state"] in FINAL_STATES or row["state"] == "interrupted":
                continue
            disk_top = self.catalog.disk(row["disk"])["top"]
            if row["state"] == "pivoting" and disk_top == row["top_after"]:
                self._finish_pivot(row["id"], row["dropped"])
            else:
                self.catalog.update_job(row["id"], state="interrupted",
                                        error="the server stopped while the job ran")
        for row in latest.values():
            self._rebind_target(row)

    def _rebind_target(self, row: dict[str, Any]) -> None:
        """A job into an image of the chain may have stopped (crash, failure)
        between giving the target the fresh content ID it journalled and
        recording that ID in the image above (mirror.py). If the target still
        has exactly that ID, record it: the chain reads the same through it.
        Any other ID means someone else wrote the target: the chain stays
        refused. Idempotent; run at every start for each disk's last job."""
        if row["new_image"] or not row.get("target_id") or row["state"] == "done":
            return
        try:
            chain = chain_paths(self.catalog.abspath(self.catalog.disk(row["disk"])["top"]))
            target = os.path.realpath(self.catalog.abspath(row["target"]))
            real = [os.path.realpath(p) for p in chain]
            if target not in real[1:]:
                return
            i = real.index(target)
            if format_id(read_identity(chain[i])[1].content_id) == row["target_id"]:
                rebind(chain[i - 1], chain[i])
        except (ImageError, OSError):
            pass            # opening the disk reports what is wrong


class CommandNotFound(CatalogError):
    pass


def _stats(job: MirrorJob) -> dict[str, Any]:
    info = job.info()
    return {k: info[k] for k in ("copy_set_bytes", "bytes_copied", "bytes_mirrored", "passes",
                                 "time_to_ready_s", "duration_s", "pivot_pause_ms")}


_ARG_TYPES: dict[str, type] = {"disk": str, "into": str, "to": str, "id": int, "pivot": bool}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}

_COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "query-disks": DatastoreService.query_disks,
    "snapshot": DatastoreService.snapshot,
    "consolidate": DatastoreService.consolidate,
    "job-complete": DatastoreService.job_complete,
    "job-cancel": DatastoreService.job_cancel,
    "job-resume": DatastoreService.job_resume,
    "query-jobs": DatastoreService.query_jobs,
    "disk-remove": DatastoreService.disk_remove,
    "flush": DatastoreService.flush,
}

__all__ = ["DatastoreService", "__version__"]
