"""Owners for the NBD server processes the benchmark compares.

Every server listens on a Unix socket in a scratch directory, is waited for
with a deadline, and is stopped (terminate, wait, kill) when its ``with``
block ends, whatever happened inside it.

Servers (all started the way a user would start them, default options):

- ``vdisk``: ``nbdkit -f -U SOCK [-r] python plugin/vdisk_nbdkit.py image=PATH``
  (through ``vdisk.nbdkit.NbdkitServer`` when that package is installed);
- ``qemu-nbd``: ``qemu-nbd -f qcow2 -k SOCK -t --shared=16 [-r] PATH`` with its
  defaults ``--cache=writeback --aio=threads``, ``--discard=ignore``,
  ``--detect-zeroes=off``;
- ``nbdkit-file``: ``nbdkit -f -U SOCK [-r] file file=PATH`` on a raw image;
- ``py-floor``: ``nbdkit -f -U SOCK -r python bench/floor_plugin.py file=PATH`` on
  the same raw image: one ``os.preadv`` per read, vdisk's thread model, so the
  most any nbdkit Python plugin can do here (read workloads only).

Binaries are overridable by ``$NBDKIT`` and ``$QEMU_NBD``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol

from vdisk import process
from vdisk.process import ProcessOwner

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin" / "vdisk_nbdkit.py"

VDISK = "vdisk"
QEMU_NBD = "qemu-nbd"
NBDKIT_FILE = "nbdkit-file"
PY_FLOOR = "py-floor"
ALL_SERVERS = (VDISK, QEMU_NBD, NBDKIT_FILE, PY_FLOOR)
RAW_SERVERS = (NBDKIT_FILE, PY_FLOOR)          # served the raw equivalent of the image
FLOOR_PLUGIN = REPO / "bench" / "floor_plugin.py"


class ServerError(Exception):
    """A server did not come up (exited early or missed its deadline)."""

    template = "{name} did not start: {reason}"

    def __init__(self, name: str, reason: str, cmd: list[str] | None = None) -> None:
        self.name = name
        self.reason = reason
        self.cmd = cmd or []
        super().__init__(self.template.format(name=name, reason=reason))


class Server(Protocol):
    """What a benchmark needs from a running server."""

    name: str
    uri: str
    startup_s: float
    pid: int

    def __enter__(self) -> Server: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes], timeout: float, name: str, log_path: Path
) -> None:
    """Wait until ``path`` accepts connections, ``proc`` exits, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise ServerError(name, f"exited with {rc}: {_last_line(text)}",
                              [str(a) for a in proc.args])
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise ServerError(name, f"no socket after {timeout:.0f} s")
        time.sleep(0.005)


class ServerProcess(ProcessOwner):
    """One server process on a Unix socket: started on enter, always stopped on exit."""

    def __init__(
        self, name: str, argv: list[str], sock: Path, log_path: Path, start_timeout: float
    ) -> None:
        super().__init__(log_path)
        self.name = name
        self.argv = argv
        self.sock = sock
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.uri = f"nbd+unix:///?socket={sock}"
        self.startup_s = 0.0

    def start(self) -> None:
        self._require_not_started()
        self.sock.unlink(missing_ok=True)  # nbdkit leaves its socket behind
        log.debug("starting %s: %s", self.name, " ".join(self.argv))
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as logf:
            # (dies with the benchmark, however it stops: a killed run leaves no server)
            self._proc = subprocess.Popen(
                [*process.dies_with_us(), *self.argv], stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT
            )
        try:
            wait_for_socket(self.sock, self._proc, self.start_timeout, self.name, self.log_path)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0

    def _stop_on_exit(self) -> None:
        self.stop()

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            process.stop(proc, 10, log=log, name=self.name)
        finally:
            self._proc = None
            self.sock.unlink(missing_ok=True)


class ProjectNbdkitServer:
    """Adapter giving ``vdisk.nbdkit.NbdkitServer`` the ``Server`` shape."""

    name = VDISK

    def __init__(self, image: Path, workdir: Path, readonly: bool, start_timeout: float) -> None:
        from vdisk.nbdkit import NbdkitServer  # noqa: PLC0415 - optional dependency

        self._server = NbdkitServer(
            [f"image={image}"],
            workdir,
            readonly=readonly,
            extra_args=["--exit-with-parent"],
            start_timeout=start_timeout,
        )
        self.uri = ""
        self.startup_s = 0.0
        self.pid = 0

    def __enter__(self) -> ProjectNbdkitServer:
        t0 = time.perf_counter()
        try:
            self._server.__enter__()
        except Exception as e:
            raise ServerError(self.name, _last_line(str(e))) from e
        self.startup_s = time.perf_counter() - t0
        self.uri = self._server.uri
        self.pid = self._server.pid
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.__exit__(exc_type, exc, tb)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def project_server_available() -> bool:
    try:
        from vdisk.nbdkit import NbdkitServer  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def make_server(
    name: str, image: Path, workdir: Path, *, readonly: bool, start_timeout: float = 60.0,
    project_owner: bool = True,
) -> Server:
    """A server of kind ``name`` for ``image`` (qcow2, or raw for nbdkit-file).

    With ``project_owner`` the vdisk server is run by ``vdisk.nbdkit.NbdkitServer``
    when the package is installed, else by the same small owner as the peers.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / f"{name}.sock"
    log_path = workdir / f"{name}.log"
    nbdkit = os.environ.get("NBDKIT", "nbdkit")
    ro = ["-r"] if readonly else []
    if name == VDISK:
        if project_owner and project_server_available():
            return ProjectNbdkitServer(image, workdir, readonly, start_timeout)
        argv = [nbdkit, "-f", "--exit-with-parent", "-U", str(sock), *ro,
                "python", str(PLUGIN), f"image={image}"]
    elif name == QEMU_NBD:
        argv = [os.environ.get("QEMU_NBD", "qemu-nbd"), "-f", "qcow2", "-k", str(sock),
                "-t", "--shared=16", *(["--read-only"] if readonly else []), str(image)]
    elif name == NBDKIT_FILE:
        argv = [nbdkit, "-f", "--exit-with-parent", "-U", str(sock), *ro,
                "file", f"file={image}"]
    elif name == PY_FLOOR:
        if not readonly:
            raise ValueError("py-floor serves reads only")
        argv = [nbdkit, "-f", "--exit-with-parent", "-U", str(sock), "-r",
                "python", str(FLOOR_PLUGIN), f"file={image}"]
    else:
        raise ValueError(f"unknown server {name!r}")
    return ServerProcess(name, argv, sock, log_path, start_timeout)
