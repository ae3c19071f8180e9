"""Serving a datastore for the job tests, and the guest's way in through NBD.

:func:`serve_datastore` is the one place that decides how a datastore is
served: ``vdisk serve`` (one nbdkit worker per disk, their sockets in the
test's directory; ``--threads parallel`` for the parallel thread model).
Tests only use what :class:`ServedDatastore` offers: an NBD connection to a
disk, a control client (which sends each command to the right worker), the
catalog's view, stop and kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
from cons_control import ControlClient
from nbdharness import pread_deadline, pwrite_deadline, wait_command

from vdisk_block.catalog import Catalog

START_DEADLINE = 60.0       # this 2-core machine is often busy


class RoutedControl:
    """The control protocol of a served datastore, spoken to each disk's worker:
    a command goes to the worker of its ``disk``, or of the disk of its job ``id``."""

    def __init__(self, served: ServedDatastore) -> None:
        self.served = served
        self._clients: dict[str, ControlClient] = {}

    def _client(self, disk: str) -> ControlClient:
        if disk not in self._clients:
            self._clients[disk] = ControlClient(self.served.control_path(disk))
        return self._clients[disk]

    def _disk_of(self, arguments: dict[str, Any]) -> str:
        if "disk" in arguments:
            return str(arguments["disk"])
        cat = Catalog(str(self.served.ds))
        try:
            return str(cat.job(arguments["id"])["disk"])
        finally:
            cat.close()

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        return self._client(self._disk_of(arguments)).execute(command, **arguments)

    def job(self, job_id: int) -> dict[str, Any]:
        return self._client(self._disk_of({"id": job_id})).job(job_id)

    def wait_job(self, job_id: int, states: tuple[str, ...], deadline: float = 60.0
                 ) -> dict[str, Any]:
        return self._client(self._disk_of({"id": job_id})).wait_job(job_id, states, deadline)

    def disk(self, name: str) -> dict[str, Any]:
        return self._client(name).disk(name)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()


class ServedDatastore:
    """A datastore served by ``vdisk serve``; owns the process and every handle it gave."""

    def __init__(self, ds: Path, workdir: Path, *, parallel: bool, name: str) -> None:
        self.ds = ds
        self.parallel = parallel
        self.rundir = workdir / f"{name}-run"
        self.log_path = workdir / f"{name}-serve.log"
        self.cmd = [sys.executable, "-m", "vdisk.cli", "serve", "-d", str(ds), "--unix-dir",
                    str(self.rundir), "--json"]
        if parallel:
            self.cmd += ["--threads", "parallel"]
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self._handles: list[nbd.NBD] = []
        self._controls: list[RoutedControl] = []

    def start(self) -> ServedDatastore:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_DEADLINE)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill()
            raise AssertionError(f"vdisk serve did not start: {self.log()}")
        self.info = json.loads(line)
        return self

    @property
    def pid(self) -> int | None:
        """The pid of the first disk's worker (kill it to crash that disk's server)."""
        return next((d["pid"] for d in self.info.get("disks", []) if d["pid"]), None)

    def control_path(self, disk: str) -> Path:
        return self.rundir / f"{disk}.ctl"

    def connect(self, disk: str) -> nbd.NBD:
        h = nbd.NBD()
        h.set_export_name(disk)
        h.connect_unix(str(self.rundir / f"{disk}.sock"))
        self._handles.append(h)
        return h

    def control(self) -> RoutedControl:
        c = RoutedControl(self)
        self._controls.append(c)
        return c

    def top(self, disk: str) -> Path:
        """The disk's top as the catalog records it (what a restart would serve)."""
        cat = Catalog(str(self.ds))
        try:
            return self.ds / cat.disk(disk)["top"]
        finally:
            cat.close()

    def _drop_clients(self) -> None:
        for h in self._handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        self._handles.clear()
        for c in self._controls:
            c.close()
        self._controls.clear()

    def stop(self) -> int | None:
        """Disconnect, then stop the server (terminate, bounded wait, kill)."""
        self._drop_clients()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(START_DEADLINE)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the supervisor and its workers, as a crash of the host's server would."""
        self._handles.clear()        # dead connections: nothing to shut down
        for c in self._controls:
            c.close()
        self._controls.clear()
        if self.proc is None:
            return
        workers = [d["pid"] for d in self.info.get("disks", []) if d["pid"]]
        self.proc.kill()
        self.proc.wait(START_DEADLINE)
        for pid in workers:          # they die with the supervisor; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        logs = [self.log_path, *sorted(self.rundir.glob("*.log"))]
        return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())


@contextlib.contextmanager
def serve_datastore(ds: Path, workdir: Path, *, parallel: bool = False,
                    name: str = "nbdkit") -> Iterator[ServedDatastore]:
    """Serve the datastore at ds until the block ends (stopped whatever happens)."""
    served = ServedDatastore(ds, workdir, parallel=parallel, name=name)
    try:
        yield served.start()
    finally:
        served.stop()


class NbdPort:
    """One NBD connection as a guest thread's port (every request with a deadline)."""

    def __init__(self, h: nbd.NBD) -> None:
        self.h = h

    def write(self, data: bytes, offset: int) -> None:
        pwrite_deadline(self.h, data, offset)

    def zero(self, length: int, offset: int, may_trim: bool) -> None:
        flags = 0 if may_trim else nbd.CMD_FLAG_NO_HOLE
        wait_command(self.h, self.h.aio_zero(length, offset, flags=flags))

    def trim(self, length: int, offset: int) -> None:
        wait_command(self.h, self.h.aio_trim(length, offset))

    def flush(self) -> None:
        wait_command(self.h, self.h.aio_flush())

    def read(self, length: int, offset: int) -> bytes:
        return pread_deadline(self.h, length, offset)
