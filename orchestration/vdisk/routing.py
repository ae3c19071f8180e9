"""Where a command of docs/control.md runs: the way in for every ``vdisk`` command.

    with open_service(datastore) as service:          # served or not
        top = service.execute("snapshot", {"disk": "vm1"})["top"]

A served datastore has a supervisor (datastore-level commands) and one
worker per disk (that disk's commands), each with a control socket. Offline,
the same commands run in this process on the files: a disk's commands in the
block engine's DiskService, which owns the disk for as long as this command
runs, and listing and removal in its DatastoreView. Either way the commands,
arguments and replies are the same:

- a disk's commands (snapshot, consolidate, backup-begin/end, job-complete,
  job-cancel, job-resume, query-disk, flush of one disk) go to the disk's
  worker or DiskService; the disk of a job command is the job's;
- query-jobs of one unsettled job asks the disk's worker, for live figures;
- everything else (query-disks, query-jobs, disk-remove, disk-added,
  server-status, flush) goes to the supervisor, or to the DatastoreView.

A served datastore never gets an in-process service for a disk its worker
owns: ownership is the disk's lock (vdisk_block.owner), so such a command
would be refused anyway, naming the worker.
"""

from __future__ import annotations

import logging
import os
import time
from types import TracebackType
from typing import Any

from . import blockpath  # noqa: F401  (vdisk_block importable)
from .control import (
    ControlClient,
    ControlError,
    ControlProtocolError,
    ControlTimeout,
    ControlUnavailable,
    Service,
)
from .errors import Error

log = logging.getLogger(__name__)

DISK_COMMANDS = frozenset({"snapshot", "consolidate", "backup-begin", "backup-end",
                           "job-complete", "job-cancel", "job-resume", "query-disk",
                           "snapshot-list", "snapshot-revert", "snapshot-delete", "resize"})
WORKER_RESTART_S = 10.0     # how long a command waits for a restarting worker
# what may run again after its worker restarted mid-command (it changes nothing, or
# refuses a second time: backup-end of a journalled backup, owned by the caller)
RETRYABLE = frozenset({"query-jobs", "query-disk", "snapshot-list", "backup-end", "flush"})


class NotServed(Error):
    msg = "{self.reason}"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DatastoreClient:
    def __init__(self, directory: str, supervisor: ControlClient | None) -> None:
        self.dir = directory
        self.supervisor = supervisor
        self._disks: dict[str, Any] = {}       # disk -> ControlClient or DiskService
        self._view: Any = None

    @property
    def served(self) -> bool:
        return self.supervisor is not None

    def close(self) -> None:
        for svc in self._disks.values():
            svc.close()
        self._disks.clear()
        if self._view is not None:
            self._view.close()
            self._view = None
        if self.supervisor is not None:
            self.supervisor.close()

    def __enter__(self) -> DatastoreClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        args = dict(arguments or {})
        if command in DISK_COMMANDS or (command == "flush" and args.get("disk")):
            return self._on_disk(self._disk_of(args), command, args)
        if command == "query-jobs" and args.get("id") is not None and self.served:
            row = self._local_view().catalog.job(args["id"])
            if row["state"] not in ("done", "cancelled", "failed", "interrupted") and \
                    self._worker_running(row["disk"]):
                return self._on_disk(row["disk"], command, args)
        if self.supervisor is not None:
            return self.supervisor.execute(command, args)
        return self._offline(command, args)

    # -- a disk's service -----------------------------------------------------------------

    def _on_disk(self, name: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run a command in the disk's service. A worker that went away meanwhile
        (a restart) is reconnected to: a command that can run twice runs again
        there; any other fails, saying so (a job it ran is interrupted)."""
        try:
            return self.disk(name).execute(command, args)
        except ControlProtocolError as e:
            if not self.served:
                raise
            self._disks.pop(name).close()
            if isinstance(e, ControlTimeout):
                raise NotServed(f"disk {name!r}: its worker did not answer {command} in "
                                f"time ({e}); it may still be running it: see 'vdisk disk "
                                f"info {name}' and 'vdisk job list'") from None
            if command not in RETRYABLE:
                raise NotServed(f"disk {name!r}: its worker stopped during {command} ({e}); "
                                "a job it ran is interrupted ('vdisk job list')") from None
            log.debug("disk %s: worker restarted; %s again", name, command)
            return self.disk(name).execute(command, args)

    def disk(self, name: str) -> Any:
        """The disk's worker (a ControlClient) when served, else its DiskService here."""
        svc = self._disks.get(name)
        if svc is None:
            svc = self._disks[name] = self._connect_worker(name) if self.served else \
                self._disk_service(name)
        return svc

    def _disk_of(self, args: dict[str, Any]) -> str:
        if args.get("disk"):
            return str(args["disk"])
        if args.get("id") is not None:
            from vdisk_block.jobinfo import refuse_elsewhere

            catalog = self._local_view().catalog
            row = catalog.job(args["id"])
            if not self.served and row["disk"] not in self._disks:
                # a job another process runs: say so, rather than that its disk is in use
                refuse_elsewhere(catalog, row, here=False)
            return str(row["disk"])
        raise NotServed("the command names no disk")

    def _disk_service(self, name: str) -> Any:
        from vdisk_block.diskservice import DiskService

        return DiskService(self.dir, name)

    def _worker_running(self, name: str) -> bool:
        from vdisk_block import endpoints

        return name in endpoints.current(self._local_view().catalog)

    def _connect_worker(self, name: str) -> ControlClient:
        """The disk's worker; a worker that is restarting is waited for (bounded)."""
        from vdisk_block import endpoints

        view = self._local_view()
        view.catalog.disk(name)                         # it exists
        deadline = time.monotonic() + WORKER_RESTART_S
        while True:
            ep = endpoints.current(view.catalog).get(name)
            if ep is None:
                raise NotServed(f"disk {name!r} has no endpoint on the server of {self.dir}; "
                                "it is being added or removed")
            try:
                client = ControlClient.connect(ep["control"])
            except ControlUnavailable as e:
                if time.monotonic() >= deadline:
                    raise NotServed(f"disk {name!r} is not being served: "
                                    f"{self._worker_state(name) or e}") from None
                time.sleep(0.1)
                continue
            if client.greeting.get("disk") != name:
                client.close()
                raise ControlUnavailable(ep["control"], f"is not the worker of disk {name!r}")
            return client

    def _worker_state(self, name: str) -> str | None:
        assert self.supervisor is not None
        try:
            workers = self.supervisor.execute("server-status", {})["workers"]
        except (Error, OSError):
            return None
        for w in workers:
            if w["disk"] == name:
                return f"its worker is {w['state']}" + (f" ({w['error']})" if w["error"] else "")
        return None

    # -- offline ------------------------------------------------------------------------------

    def _local_view(self) -> Any:
        from vdisk_block.datastore import DatastoreView

        if self._view is None:
            self._view = DatastoreView(self.dir)
        return self._view

    def _offline(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        from vdisk_block.commands import Arg, Command, run

        s = Arg(str)
        view = self._local_view()
        table = {
            "query-disks": Command(lambda _v, **a: view.query_disks(**a), {"disk": s}),
            "query-jobs": Command(lambda _v, **a: view.query_jobs(**a),
                                  {"disk": s, "id": Arg(int)}),
            "disk-remove": Command(lambda _v, **a: view.disk_remove(**a),
                                   {"disk": Arg(str, True), "keep_images": Arg(bool)}),
            "disk-rename": Command(lambda _v, **a: {**view.disk_rename(**a), "worker": None},
                                   {"disk": Arg(str, True), "new": Arg(str, True)}),
            "disk-added": Command(lambda _v, **a: {"worker": None}, {"disk": Arg(str, True)}),
            "flush": Command(lambda _v, **a: {"flushed": 0}, {"disk": s}),
        }
        return run(table, view, command, args)


def open_service(datastore_dir: str | os.PathLike[str],
                 control_sock: str | os.PathLike[str] | None = None) -> DatastoreClient:
    """The datastore's commands, served (through its supervisor and workers) or not."""
    from vdisk_block.catalog import Catalog
    from vdisk_block.endpoints import server

    directory = os.path.abspath(datastore_dir)
    if control_sock is not None:
        client = ControlClient.connect(control_sock)
        _check_datastore(client, directory)
        return DatastoreClient(directory, client)
    live = server(directory)
    if live is None:
        log.debug("Datastore %s is not served: running commands in this process", directory)
        return DatastoreClient(directory, None)
    catalog = Catalog(directory)
    try:
        recorded = catalog.get_meta("control")
    finally:
        catalog.close()
    path = os.path.join(directory, recorded) if recorded else None
    deadline = time.monotonic() + WORKER_RESTART_S
    while True:                     # a server starting records its socket last
        try:
            if path is None:
                raise ControlUnavailable("?", "no control socket recorded yet")
            client = ControlClient.connect(path)
            break
        except ControlUnavailable as e:
            if time.monotonic() >= deadline or server(directory) is None:
                raise ControlUnavailable(path or "?", f"the datastore is served by {live} "
                                         f"but its control socket does not answer ({e.reason})"
                                         ) from None
            time.sleep(0.1)
            catalog = Catalog(directory)
            try:
                recorded = catalog.get_meta("control")
            finally:
                catalog.close()
            path = os.path.join(directory, recorded) if recorded else None
    _check_datastore(client, directory)
    return DatastoreClient(directory, client)


def _check_datastore(client: ControlClient, directory: str) -> None:
    served = client.datastore
    if served is not None and os.path.realpath(served) != os.path.realpath(directory):
        client.close()
        raise ControlUnavailable(client.path, f"serves datastore {served}, not {directory}")


def is_served(service: Service) -> bool:
    return bool(getattr(service, "served", False))


__all__ = ["ControlError", "DatastoreClient", "NotServed", "is_served", "open_service"]
