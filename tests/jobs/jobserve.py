"""Serving a datastore for the job tests, and the guest's way in through NBD.

:func:`serve_datastore` is the one place that decides how a datastore is
served (today: one nbdkit in datastore mode with a control socket, as
``vdisk serve`` runs it; ``threads=parallel`` for the parallel thread model).
Tests only use what :class:`ServedDatastore` offers: an NBD connection to a
disk, a control client, the catalog's view, stop and kill. When serving moves
to one worker per disk, this module changes and the tests do not.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
from cons_control import ControlClient
from nbdharness import pread_deadline, pwrite_deadline, wait_command

from vdisk.nbdkit import NbdkitServer
from vdisk_block.catalog import Catalog

START_DEADLINE = 60.0       # this 2-core machine is often busy


class ServedDatastore:
    """A datastore being served; owns the server process and every handle it gave."""

    def __init__(self, ds: Path, workdir: Path, *, parallel: bool, name: str) -> None:
        self.ds = ds
        self.parallel = parallel
        self.control_path = workdir / f"{name}-control.sock"
        args = [f"datastore={ds}", f"control={self.control_path}"]
        if parallel:
            args.append("threads=parallel")
        self.server = NbdkitServer(args, workdir, name=name, start_timeout=START_DEADLINE)
        self._handles: list[nbd.NBD] = []
        self._clients: list[ControlClient] = []

    def start(self) -> ServedDatastore:
        self.server.start()
        end = time.monotonic() + START_DEADLINE
        while True:
            try:
                ControlClient(self.control_path).close()
                return self
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > end or self.server.returncode is not None:
                    raise AssertionError(f"no control socket after {START_DEADLINE} s: "
                                         f"{self.log()}") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def connect(self, disk: str) -> nbd.NBD:
        h = nbd.NBD()
        h.set_export_name(disk)
        assert self.server.socket is not None
        h.connect_unix(str(self.server.socket))
        self._handles.append(h)
        return h

    def control(self) -> ControlClient:
        c = ControlClient(self.control_path)
        self._clients.append(c)
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
        for c in self._clients:
            c.close()
        self._clients.clear()

    def stop(self) -> int | None:
        """Disconnect, then stop the server (terminate, bounded wait, kill)."""
        self._drop_clients()
        return self.server.stop()

    def kill(self) -> None:
        self._handles.clear()        # dead connections: nothing to shut down
        for c in self._clients:
            c.close()
        self._clients.clear()
        self.server.kill()

    def log(self) -> str:
        return self.server.stderr_text()


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
