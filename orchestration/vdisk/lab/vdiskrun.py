"""Drive the ``vdisk`` command and ``vdisk serve`` from Python, and read what a guest wrote.

    info = vdisk("disk", "info", "vm", "-d", ds)        # vdisk ... --json, parsed
    with VdiskServer(ds, ds / "run", log_path=log) as server, nbd_reader(server.uri("vm")) as read:
        data = read(0, 4096)

:func:`vdisk` runs one command to completion and returns its JSON object
(:class:`VdiskCommandError` with its one-line error otherwise);
:class:`VdiskServer` owns a ``vdisk serve`` in the foreground, and
:func:`doc_server` one run as docs/attach.md shows it (a Unix socket per
disk, or a free TCP port);
:func:`disk_chain` asks a served datastore for a disk's chain;
:func:`nbd_reader` and :func:`image_reader` give a ``read(offset, length)``
on an export or an image, for :mod:`vdisk.lab.records`. The demos and the
boot tests use them.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import attach, process, qemu_img
from ..errors import CommandError, Error
from .records import Reader

log = logging.getLogger(__name__)

CLI = [sys.executable, "-m", "vdisk.cli"]
COMMAND_TIMEOUT = 120.0


class VdiskCommandError(CommandError):
    """A ``vdisk`` command failed; ``detail`` is its one-line error."""

    msg = "{self.command} failed (exit code {self.returncode}): {self.detail}"

    @property
    def command(self) -> str:
        return "vdisk " + shlex.join(self.cmd[len(CLI) :])


def vdisk(*args: str | os.PathLike[str], timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
    """Run ``vdisk ARGS --json`` to completion; return the JSON object it printed."""
    cmd = [*CLI, *(os.fspath(a) for a in args), "--json"]
    cp = process.run(cmd, VdiskCommandError, log=log, timeout=timeout)
    lines = cp.stdout.splitlines()
    try:
        result = json.loads(lines[0]) if len(lines) == 1 else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise VdiskCommandError(cmd, cp.returncode, f"expected one JSON object, got {cp.stdout!r}")
    return result


class ServeError(Error):
    msg = "vdisk serve did not start: {self.reason}"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VdiskServer(process.ProcessOwner):
    """``vdisk serve -d DIR --unix-dir RUNDIR --json`` in the foreground, as a
    process we own: one nbdkit worker per disk, on RUNDIR/NAME.sock.

    :meth:`start` returns once the command printed its JSON line (every worker
    serves or has said why not), within ``start_timeout``; :meth:`stop` sends
    SIGTERM to that process (which stops its workers), waits, and SIGKILLs it
    if need be. Its stderr goes to ``log_path``.
    """

    def __init__(
        self,
        datastore: str | os.PathLike[str],
        rundir: str | os.PathLike[str],
        *,
        log_path: str | os.PathLike[str],
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(Path(log_path))
        self.datastore = Path(datastore).absolute()
        self.rundir = Path(rundir).absolute()
        self.start_timeout = start_timeout
        self.info: dict[str, Any] = {}
        self.cmd = [*CLI, "serve", "-d", str(self.datastore), "--unix-dir", str(self.rundir),
                    "--json"]  # fmt: skip

    def __repr__(self) -> str:
        return f"<VdiskServer {self.datastore} pid={self.pid}>"

    @property
    def control(self) -> Path:
        return Path(self.info["control"])

    @property
    def exports(self) -> list[str]:
        return [d["disk"] for d in self.info["disks"]]

    def worker_pid(self, export: str) -> int:
        """The pid of the disk's worker when the server started."""
        return int(next(d["pid"] for d in self.info["disks"] if d["disk"] == export))

    def uri(self, export: str) -> str:
        return attach.unix_uri(self.rundir / f"{export}.sock", export)

    def start(self) -> None:
        self._require_not_started()
        log.debug("Running %s", shlex.join(self.cmd))
        with open(self._output_path, "wb") as err:
            proc = subprocess.Popen(
                # SIGTERM, not SIGKILL, if we die: vdisk serve then stops its workers
                [*process.dies_with_us(signal.SIGTERM), *self.cmd],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        self._proc = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        try:
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServeError(f"no answer within {self.start_timeout:g} s")
                ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    line += chunk
                elif proc.poll() is not None:
                    break
            if not line.endswith(b"\n"):
                proc.wait(10)
                reason = self.stderr_text().strip().splitlines()
                raise ServeError(f"exit code {proc.returncode}: "
                                 f"{reason[-1] if reason else '(no output)'}")  # fmt: skip
            self.info = json.loads(line)
        except BaseException:
            self.stop()
            raise
        log.debug("vdisk serve pid %d serves %s", proc.pid, self.info)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, a bounded wait, SIGKILL; the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            rc = process.stop(proc, timeout, log=log, name="vdisk serve")
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
        return rc

    def _stop_on_exit(self) -> None:
        self.stop()


def disk_chain(control: str | os.PathLike[str], disk: str) -> list[str]:
    """The disk's chain (top first) as the server sees it, over the control socket."""
    from ..control import ControlClient

    with ControlClient.connect(control) as client:
        chain: list[str] = client.execute("query-disks", {"disk": disk})["disks"][0]["chain"]
    return chain


def leftover_images(datastore: Path, chain: Sequence[str]) -> list[str]:
    """Files in the datastore's ``images/`` that are not in ``chain``, hidden ones included."""
    keep = {Path(p).name for p in chain}
    return sorted(p.name for p in (datastore / "images").iterdir() if p.name not in keep)



def free_tcp_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on now (another process may take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DocServer(VdiskServer):
    """``vdisk serve`` run as docs/attach.md shows it (:func:`attach.serve_args`: a
    Unix socket per disk in DIR/run, or ``ports``), with ``--json`` so that it says
    when it serves."""

    def __init__(self, datastore: Path, log_path: Path, **options: Any) -> None:
        super().__init__(datastore, datastore / "run", log_path=log_path)
        self.cmd = [*CLI, *attach.serve_args(self.datastore, **options)[1:], "--json"]

    def endpoint(self, disk: str) -> dict[str, Any]:
        """The disk's worker, as ``vdisk serve --json`` printed it: uri, socket, port..."""
        return dict(next(d for d in self.info["disks"] if d["disk"] == disk))


@contextmanager
def doc_server(datastore: Path, log_path: Path, *, tcp: bool = False,
               **options: Any) -> Iterator[DocServer]:  # fmt: skip
    """Serve the datastore: a Unix socket per disk, or (``tcp``) a free TCP port
    of 127.0.0.1 (one disk)."""
    for _ in range(5):  # another process may take the free port before vdisk binds it
        ports = (port := free_tcp_port(), port) if tcp else None
        server = DocServer(datastore, log_path, ports=ports, **options)
        try:
            server.start()
        except ServeError as e:
            if tcp and "in use" in str(e):
                continue
            raise
        try:
            yield server
        finally:
            server.stop()
        return
    raise AssertionError("no free TCP port on 127.0.0.1 after 5 attempts")


@contextmanager
def nbd_reader(uri: str) -> Iterator[Reader]:
    """read(offset, length) on an NBD export, with libnbd."""
    import nbd  # Debian's python3-libnbd, in the system site-packages

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield lambda offset, length: bytes(h.pread(length, offset))
    finally:
        h.shutdown()


@contextmanager
def image_reader(image: str | os.PathLike[str]) -> Iterator[Reader]:
    """read(offset, length) on a disk image, read by QEMU (qemu-nbd, read-only, through
    libnbd's socket activation: the qemu-nbd process ends with the connection)."""
    import nbd

    fmt = qemu_img.info(image, force_share=True)["format"]
    h = nbd.NBD()
    h.connect_systemd_socket_activation(["qemu-nbd", "-r", "-f", fmt, os.fspath(image)])
    try:
        yield lambda offset, length: bytes(h.pread(length, offset))
    finally:
        h.shutdown()
