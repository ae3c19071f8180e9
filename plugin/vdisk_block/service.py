"""The commands of a datastore (docs/control.md): snapshot, consolidate, backup, jobs.

One DatastoreService runs inside nbdkit for a served datastore (behind the
control socket) or in the `vdisk` command's own process for one that is not.
Either way it changes a disk only as the disk's owner (owner.py): it takes
the disk's lock before its first change and keeps it until close, and a disk
that another live process owns is refused with that process's pid. Becoming
a disk's owner settles what its dead owners left (recovery.py); a job that a
live process runs is never touched from another. Every change of a disk's top
goes through the catalog in one durable step before any request reaches the
new top.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from . import __version__, owner, recovery
from . import header as hdr
from .catalog import IMAGES, Catalog, CatalogError
from .chain import chain_paths, open_disk
from .chainops import snapshot
from .disk import Disk
from .errors import ImageError, RequestError
from .files import sweep_stale_temps
from .jobcommands import JobCommands
from .mirror import ACTIVE, MirrorJob

Event = dict[str, Any]


class DatastoreService(JobCommands):
    def __init__(self, directory: str, readonly: bool = False,
                 concurrent_reads: bool = False, what: str | None = None) -> None:
        self.catalog = Catalog(directory)
        self.dir = self.catalog.dir
        self.readonly = readonly
        self.concurrent_reads = concurrent_reads
        self.what = what or owner.describe_self()
        self.disks: dict[str, Disk] = {}
        self.jobs: dict[int, MirrorJob] = {}
        self.listeners: list[Callable[[Event], None]] = []
        self._lock = threading.RLock()
        self._owned: dict[str, owner.Lock] = {}
        self._owner: owner.Owner | None = None

    def close(self) -> None:
        with self._lock:
            for job in list(self.jobs.values()):
                if job.state in ACTIVE:
                    job.cancel()
            for d in self.disks.values():
                d.close()
            self.disks.clear()
            for lock in self._owned.values():
                lock.close()
            self._owned.clear()
            if self._owner is not None:
                self._owner.close()
                self._owner = None
            self.catalog.close()

    # -- ownership ----------------------------------------------------------------

    @property
    def token(self) -> str:
        """This process's owner token, under which its jobs are journalled."""
        with self._lock:
            if self._owner is None:
                self._owner = owner.Owner(self.dir, self.what)
            return self._owner.token

    def own(self, name: str, settle: bool = False) -> None:
        """Become the owner of disk name (until close), settling what its dead
        owners left; owner.Busy, naming the owner, if a live process owns it.
        With ``settle``, settle again the jobs that died since (a backup whose
        command was killed while this process owned the disk)."""
        with self._lock:
            new = name not in self._owned
            if new:
                self.catalog.disk(name)             # it exists
                lock = owner.own_disk(self.dir, name, self.what)
                if not self._owned and not self.catalog.readonly:
                    # once a process owns something: what dead commands left
                    sweep_stale_temps(self.catalog.abspath(IMAGES))
                    owner.sweep_owners(self.dir)
            try:
                finished = recovery.recover_disk(self.catalog, name, set(self.jobs)) \
                    if new or settle else []
            except BaseException:
                if new:
                    lock.close()
                raise
            if new:
                self._owned[name] = lock
        for job_id in finished:
            self._announce(job_id, name, "done")

    def own_all(self) -> dict[str, str]:
        """Own every disk no other process owns; {disk: why not} for the others."""
        busy = {}
        for r in self.catalog.disks():
            try:
                self.own(r["name"])
            except owner.Busy as e:
                busy[r["name"]] = str(e)
        return busy

    # -- disks --------------------------------------------------------------------

    def disk(self, name: str) -> Disk:
        """The open Disk of a catalog disk, opened (and owned) on first use and shared."""
        with self._lock:
            d = self.disks.get(name)
            if d is None:
                self.own(name)
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
            holder = self._disk_owner(r["name"])
            info = {"name": r["name"], "top": r["top"], "chain": [], "size": None,
                    "open": d is not None, "job": self._job_info(job) if job else None,
                    "owner": {"pid": holder.pid, "what": holder.what} if holder else None,
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

    def _disk_owner(self, name: str) -> owner.Holder | None:
        if name in self._owned:
            return owner.Holder(os.getpid(), self.what)
        return owner.disk_owner(self.dir, name)

    def snapshot(self, disk: str) -> dict[str, Any]:
        d = self.disk(disk)
        with self._lock:
            self._refuse_active(disk)
            frozen = self.catalog.relpath(d.path)
            new = self.catalog.new_image_path(disk)
            snapshot(d, self.catalog.abspath(new), lambda _p: self.catalog.set_top(disk, new))
        return {"disk": disk, "top": new, "frozen": frozen}

    def flush(self, disk: str | None = None) -> dict[str, Any]:
        """Flush open disks (all of them, or one): what they acknowledged is on disk."""
        with self._lock:
            disks = [self.disk(disk)] if disk else list(self.disks.values())
        for d in disks:
            d.flush()
        return {"flushed": len(disks)}

    def disk_remove(self, disk: str, keep_images: bool = False) -> dict[str, Any]:
        """Forget a disk; delete the images of its chain that no other disk uses
        (all of them kept with keep_images). A disk whose chain is broken can be
        removed: what can be read of each chain counts."""
        with self._lock:
            if disk in self.disks:
                raise RequestError(self.dir, f"disk {disk!r} is open; stop serving it first")
            self.own(disk)
            self._refuse_active(disk)
            chain = self._readable_chain(disk)
            mine = {os.path.realpath(p) for p in chain}
            for r in self.catalog.disks():
                if r["name"] != disk:
                    mine -= {os.path.realpath(p) for p in self._readable_chain(r["name"])}
            self.catalog.remove_disk(disk)
            self._owned.pop(disk).close()
            deleted = []
            if not keep_images:
                for p in sorted(mine):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        continue
                    deleted.append(self.catalog.relpath(p))
        kept = [self.catalog.relpath(p) for p in chain if os.path.exists(p)]
        return {"disk": disk, "deleted": deleted, "kept": kept}

    def _readable_chain(self, name: str) -> list[str]:
        return chain_paths(self.catalog.abspath(self.catalog.disk(name)["top"]), partial=True)

    # -- helpers --------------------------------------------------------------------

    def _virtual_size(self, top: str) -> int:
        fd = os.open(self.catalog.abspath(top), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hdr.parse_header(fd, top).size
        finally:
            os.close(fd)

    def _emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            listener(event)


class CommandNotFound(CatalogError):
    pass


_ARG_TYPES: dict[str, type] = {"disk": str, "into": str, "to": str, "id": int, "pivot": bool,
                               "keep_images": bool, "owner": str, "output": str, "temp": str,
                               "error": str, "bytes": int}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}

_COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "query-disks": DatastoreService.query_disks,
    "snapshot": DatastoreService.snapshot,
    "consolidate": DatastoreService.consolidate,
    "backup-begin": DatastoreService.backup_begin,
    "backup-end": DatastoreService.backup_end,
    "job-complete": DatastoreService.job_complete,
    "job-cancel": DatastoreService.job_cancel,
    "job-resume": DatastoreService.job_resume,
    "query-jobs": DatastoreService.query_jobs,
    "disk-remove": DatastoreService.disk_remove,
    "flush": DatastoreService.flush,
}

__all__ = ["DatastoreService", "__version__"]
