"""One disk of a datastore, served or worked on: its owner's service.

A DiskService is the disk's owner (owner.py) for its whole life: it takes
the disk's lock when it starts, settles what dead owners left (recovery.py),
opens the chain, and answers the disk's commands (docs/control.md): snapshot,
consolidate, backup-begin/end, job-*, query-disk, query-jobs, flush. It runs
inside the disk's nbdkit worker (behind its control socket) or, for a disk
that is not served, in the `vdisk` command's own process. Every change of the
disk's top goes through the catalog in one durable step before any request
reaches the new top.

Reading what other disks do (whether an image is in another disk's chain)
takes no lock: their chains are read from the image headers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from . import __version__, owner, recovery, snapshots
from .catalog import FINAL_STATES, IMAGES, Catalog
from .chain import chain_paths, chain_walk, open_disk
from .commands import Arg, Command, run
from .disk import Disk
from .errors import ImageError, RequestError
from .files import sweep_stale_temps
from .jobcommands import PIVOT_TIMEOUT_S, JobCommands
from .mirror import ACTIVE, MirrorJob, State
from .snapcommands import SnapshotCommands

Event = dict[str, Any]


class DiskService(JobCommands, SnapshotCommands):
    def __init__(self, directory: str, name: str, *, readonly: bool = False,
                 concurrent_reads: bool = False, what: str | None = None) -> None:
        self.catalog = Catalog(directory)
        try:
            self.dir = self.catalog.dir
            self.name = name
            self.readonly = readonly
            self.concurrent_reads = concurrent_reads
            self.what = what or owner.describe_self()
            self.jobs: dict[int, MirrorJob] = {}
            self.listeners: list[Callable[[Event], None]] = []
            self.clients = 0                    # NBD connections open on the disk
            self.writers = 0                    # ... of them that wrote (or zeroed, trimmed)
            self._lock = threading.RLock()
            self._journal = threading.Condition()
            self._disk: Disk | None = None
            self._owner: owner.Owner | None = None
            self.catalog.disk(name)             # it exists
            self._disk_lock = owner.own_disk(self.dir, name, self.what)
        except BaseException:
            self.catalog.close()
            raise
        try:
            if not self.catalog.readonly:       # what dead commands left in the datastore
                sweep_stale_temps(self.catalog.abspath(IMAGES))
                owner.sweep_owners(self.dir)
            self.settle()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel this process's jobs (a pivot under way is let finish, bounded),
        close the disk, give up its ownership."""
        with self._lock:
            for job_id, job in list(self.jobs.items()):
                if job.state in ACTIVE:
                    try:
                        job.cancel()
                    except RequestError:
                        pass                    # it moved on to its pivot meanwhile
                if job.wait((State.DONE,), PIVOT_TIMEOUT_S) is State.DONE:
                    with self._journal:         # and its pivot's end is journalled
                        self._journal.wait_for(lambda i=job_id: self.catalog.job(i)["state"]
                                               in FINAL_STATES, PIVOT_TIMEOUT_S)
            if self._disk is not None:
                self._disk.close()
                self._disk = None
            if self._disk_lock is not None:
                self._disk_lock.close()
                self._disk_lock = None
            if self._owner is not None:
                self._owner.close()
                self._owner = None
            self.catalog.close()

    def __enter__(self) -> DiskService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ownership and the disk ---------------------------------------------------------

    @property
    def token(self) -> str:
        """This process's owner token, under which its jobs are journalled."""
        with self._lock:
            if self._owner is None:
                self._owner = owner.Owner(self.dir, self.what)
            return self._owner.token

    def settle(self) -> None:
        """Settle the disk's jobs whose process died (idempotent)."""
        for job_id in recovery.recover_disk(self.catalog, self.name, set(self.jobs)):
            self._announce(job_id, "done")

    def disk(self, name: str | None = None) -> Disk:
        """The open Disk (opened on first use); ``name`` must be this disk's."""
        if name is not None and name != self.name:
            raise RequestError(self.dir, f"this service runs disk {self.name!r}, not {name!r}")
        with self._lock:
            if self._disk is None:
                top = self.catalog.abspath(self.catalog.disk(self.name)["top"])
                self._disk = open_disk(top, readonly=self.readonly)
                self._disk.concurrent_reads = self.concurrent_reads
            return self._disk

    def is_top(self, path: str) -> bool:
        """Whether the catalog names path as the disk's top (a durable record)."""
        return bool(self.catalog.disk(self.name)["top"] == self.catalog.relpath(path))

    def users(self, path: str) -> list[str]:
        """What else reads path (from the headers): the other disks whose chain
        contains it, and the named snapshots off this disk's chain (of any disk)
        whose chain does."""
        path = os.path.realpath(path)
        chain = {os.path.realpath(f.path) for f in self._disk.layers} \
            if self._disk is not None else set()
        out = []
        for r in self.catalog.disks():
            if r["name"] != self.name and path in _real_chain(self.catalog.abspath(r["top"])):
                out.append(f"disk {r['name']!r}")
        for snap in snapshots.all_rows(self.catalog):
            image = os.path.realpath(self.catalog.abspath(snap["image"]))
            if image not in chain and path in _real_chain(image):
                out.append(f"snapshot {snap['name']!r} of disk {snap['disk']!r}")
        return out

    def snapshot_images(self) -> dict[str, str]:
        """{real path of an image a named snapshot records: 'snapshot S of disk D'}."""
        return {os.path.realpath(self.catalog.abspath(s["image"])):
                f"snapshot {s['name']!r} of disk {s['disk']!r}"
                for s in snapshots.all_rows(self.catalog)}

    # -- commands -------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return run(_COMMANDS, self, command, arguments)

    def greeting(self) -> dict[str, Any]:
        return {"version": __version__, "datastore": self.dir, "disk": self.name}

    def query_disk(self, disk: str | None = None) -> dict[str, Any]:
        """The disk as its owner sees it; a chain that cannot open says why in
        ``error`` (with ``chain`` read from the headers as far as they go)."""
        error = None
        try:
            d = self.disk(disk)
        except (ImageError, OSError) as e:
            if isinstance(e, RequestError):
                raise
            error = open_error(e)
        row = self.catalog.disk(self.name)
        job = self.catalog.active_job(self.name)
        chain = [f.path for f in d.layers] if error is None else \
            chain_paths(self.catalog.abspath(row["top"]), partial=True)
        return {"name": self.name, "top": row["top"], "size": d.size if error is None else None,
                "chain": [self.catalog.relpath(p) for p in chain],
                "open": error is None, "clients": self.clients, "error": error,
                "job": self._info(job) if job else None,
                "owner": {"pid": os.getpid(), "what": self.what}}

    def flush(self, disk: str | None = None) -> dict[str, Any]:
        """What the disk acknowledged is on disk, as an NBD flush would make it."""
        with self._lock:
            d = self._disk
        if disk is not None and disk != self.name:
            raise RequestError(self.dir, f"this service runs disk {self.name!r}, not {disk!r}")
        if d is not None:
            d.flush()
        return {"flushed": int(d is not None)}

    def _emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            listener(event)


def _real_chain(top: str) -> set[str]:
    """(Through images the driver refuses: a chain QEMU's repair mends reads them.)"""
    return {os.path.realpath(p) for p in chain_walk(top)[0]}


def open_error(e: BaseException) -> str:
    """The one line that says why a disk cannot be served."""
    return str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"


_S, _I, _B = Arg(str), Arg(int), Arg(bool)
_DISK = {"disk": Arg(str, True)}
_ID = {"id": Arg(int, True)}
_COMMANDS: dict[str, Command] = {
    "query-disk": Command(DiskService.query_disk, {"disk": _S}),
    "snapshot": Command(DiskService.snapshot, {**_DISK, "name": _S}),
    "snapshot-list": Command(DiskService.snapshot_list, _DISK),
    "snapshot-revert": Command(DiskService.snapshot_revert, {**_DISK, "name": Arg(str, True),
                                                             "force": _B}),
    "snapshot-delete": Command(DiskService.snapshot_delete, {**_DISK, "name": Arg(str, True)}),
    "resize": Command(DiskService.resize, {**_DISK, "size": Arg(int, True), "shrink": _B}),
    "consolidate": Command(DiskService.consolidate, {**_DISK, "into": _S, "to": _S,
                                                     "pivot": _B}),
    "backup-begin": Command(DiskService.backup_begin, {**_DISK, "owner": Arg(str, True),
                                                       "output": Arg(str, True), "temp": _S}),
    "backup-end": Command(DiskService.backup_end, {**_ID, "owner": Arg(str, True),
                                                   "error": _S, "bytes": _I}),
    "job-complete": Command(DiskService.job_complete, _ID),
    "job-cancel": Command(DiskService.job_cancel, _ID),
    "job-resume": Command(DiskService.job_resume, _ID),
    "query-jobs": Command(DiskService.query_jobs, {"disk": _S, "id": _I}),
    "flush": Command(DiskService.flush, {"disk": _S}),
}
COMMAND_NAMES = tuple(_COMMANDS)
