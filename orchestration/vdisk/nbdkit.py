"""Run nbdkit serving the vdisk plugin (or any other plugin) as an owned process.

    with NbdkitServer([f"image={top}"], tmp_path) as server:
        h = nbd.NBD()
        h.connect_uri(server.uri)

The server listens on a Unix socket in ``workdir`` (or on 127.0.0.1:PORT),
logs to a file in ``workdir``, and is always stopped on exit: SIGTERM, a
bounded wait, then SIGKILL. Starting waits, with a deadline, until the
socket actually accepts connections; if nbdkit exits first (a bad image, a
bad argument) it raises :class:`~vdisk.errors.NbdkitError` with nbdkit's
stderr. nbdkit leaves its Unix socket behind when it exits, so a stale
socket file is removed before starting.

The binary is ``$NBDKIT`` if set, else ``nbdkit`` from ``$PATH``.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from . import process
from .blockpath import REPO_ROOT
from .errors import AddressInUse, NbdkitError, NbdkitTimeout, SocketPathTooLong

log = logging.getLogger(__name__)

# orchestration/vdisk/nbdkit.py -> the repository checkout (the package is
# installed in editable mode from the checkout).
PLUGIN = REPO_ROOT / "plugin" / "vdisk_nbdkit.py"

# sizeof(sockaddr_un.sun_path) is 108 on Linux, including the terminating NUL.
SUN_PATH_MAX = 107

# NBD newstyle handshake, used to leave a probe connection politely.
_NBD_GREETING_SIZE = 18  # "NBDMAGIC" "IHAVEOPT" u16 handshake flags
_NBD_FLAG_C_FIXED_NEWSTYLE = 1
_NBD_OPT_ABORT = 2


def binary() -> str:
    return os.environ.get("NBDKIT", "nbdkit")


def _connect(address: str | tuple[str, int], timeout: float) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _abort_handshake(sock: socket.socket) -> None:
    """Read the server's greeting and send NBD_OPT_ABORT, so nbdkit logs no error.

    Best effort: the connection has already proved that the server listens.
    """
    try:
        greeting = b""
        while len(greeting) < _NBD_GREETING_SIZE:
            chunk = sock.recv(_NBD_GREETING_SIZE - len(greeting))
            if not chunk:
                return
            greeting += chunk
        if greeting[8:16] != b"IHAVEOPT":
            return
        sock.sendall(
            struct.pack(">I", _NBD_FLAG_C_FIXED_NEWSTYLE)
            + b"IHAVEOPT"
            + struct.pack(">II", _NBD_OPT_ABORT, 0)
        )
        sock.recv(64)  # the server's ACK; then it closes
    except OSError:
        pass


def accepts_connections(address: str | tuple[str, int], timeout: float = 1.0) -> bool:
    """True if something accepts connections at a Unix socket path or (host, port)."""
    try:
        sock = _connect(address, timeout)
    except OSError:
        return False
    with sock:
        _abort_handshake(sock)
    return True


def _file_identity(path: Path) -> tuple[int, int, int]:
    """Identifies a file beyond its name (an inode number alone is soon reused)."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class NbdkitServer(process.ProcessOwner):
    """An nbdkit process serving ``plugin`` (default: the vdisk plugin).

    ``plugin_args`` are the plugin's ``key=value`` parameters; ``plugin``
    replaces ``["python", PLUGIN]`` (e.g. ``["memory"]``) to run another
    plugin; ``extra_args`` are nbdkit options placed before the plugin
    (``-t 4``, ``--filter=...``). ``name`` names the socket and log files in
    ``workdir``, so several servers can share one directory.

    ``exit_with_parent`` makes nbdkit die with the thread that started it, so
    a killed test run leaves no server behind; start from a long-lived thread.

    ``listen`` hands nbdkit a socket its owner has bound and listens on
    (socket activation, LISTEN_FDS): nbdkit serves it but never creates nor
    removes it, so it outlives the process, and connections arriving while
    no nbdkit runs wait in its queue. Then ``uri`` names it and ``ready``
    says when nbdkit serves (an NBD connection to it succeeds at once).
    """

    def __init__(
        self,
        plugin_args: Sequence[str],
        workdir: str | os.PathLike[str],
        *,
        readonly: bool = False,
        tcp_port: int | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 20.0,
        plugin: Sequence[str] | None = None,
        name: str = "nbdkit",
        exit_with_parent: bool = True,
        listen: socket.socket | None = None,
        uri: str | None = None,
        ready: Callable[[], bool] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.readonly = readonly
        self.tcp_port = tcp_port
        self.start_timeout = start_timeout
        self.log_path = self.workdir / f"{name}.log"
        super().__init__(self.log_path)
        self.socket: Path | None
        self._listen = listen
        self._ready = ready
        self._env = env
        listen_args: list[str]
        if listen is not None:
            if uri is None or ready is None:
                raise ValueError("a listening socket goes with uri and ready")
            self.socket = None
            listen_args = []
            self.uri = uri
            self.address = f"fd {listen.fileno()}"
        elif tcp_port is None:
            self.socket = self.workdir / f"{name}.sock"
            listen_args = ["-U", str(self.socket)]
            self.uri = f"nbd+unix:///?socket={quote(str(self.socket), safe='/')}"
            self.address = str(self.socket)
        else:
            self.socket = None
            listen_args = ["-i", "127.0.0.1", "-p", str(tcp_port)]
            self.uri = f"nbd://127.0.0.1:{tcp_port}/"
            self.address = f"127.0.0.1:{tcp_port}"
        if plugin is None:
            plugin = ["python", str(PLUGIN)]
        self.cmd: list[str] = [binary(), "-f", *listen_args]
        if readonly:
            self.cmd.append("-r")
        if exit_with_parent and "--exit-with-parent" not in extra_args:
            self.cmd.append("--exit-with-parent")
        self.cmd += [*extra_args, *plugin, *plugin_args]
        self._killed = False
        self._socket_identity: tuple[int, int, int] | None = None
        self._deadline = 0.0

    def __repr__(self) -> str:
        return f"<NbdkitServer {self.address} pid={self.pid} {shlex.join(self.cmd)!r}>"

    def _probe_address(self) -> str | tuple[str, int]:
        if self.socket is not None:
            return str(self.socket)
        assert self.tcp_port is not None
        return ("127.0.0.1", self.tcp_port)

    def _prepare_address(self) -> None:
        if self._listen is not None:
            return
        if self.socket is None:
            if accepts_connections(self._probe_address()):
                raise AddressInUse(self.address)
            return
        if len(str(self.socket).encode()) > SUN_PATH_MAX:
            raise SocketPathTooLong(self.socket, SUN_PATH_MAX)
        try:
            mode = self.socket.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            return  # not ours to delete; nbdkit will report it cannot bind
        if accepts_connections(str(self.socket)):
            raise AddressInUse(self.address)
        log.debug("Removing stale socket %s", self.socket)
        self.socket.unlink(missing_ok=True)

    def start(self) -> None:
        """Start nbdkit and wait until it accepts connections."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start nbdkit without waiting (then :meth:`wait_ready` or :meth:`poll_ready`)."""
        self._require_not_started()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare_address()
        log.debug("Running %s", shlex.join(self.cmd))
        cmd, fds = self.cmd, ()
        env = None if self._env is None else {**os.environ, **self._env}
        if self._listen is not None:
            # socket activation: nbdkit checks LISTEN_PID against its own pid, which
            # the shell knows before it execs nbdkit; the socket must be fd 3
            fd = self._listen.fileno()
            dup = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
            cmd = ["bash", "-c", dup + 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "nbdkit",
                   *[a for a in self.cmd if a != "-f"]]
            fds = (fd,)
        with open(self.log_path, "wb") as logfile:
            try:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                    pass_fds=fds, env=env
                )
            except OSError as e:
                log.warning("Cannot run %s: %s", self.cmd[0], e)
                raise NbdkitError(self.cmd, None, f"cannot run {self.cmd[0]}: {e}") from e
        self._deadline = time.monotonic() + self.start_timeout

    def wait_ready(self) -> None:
        """Wait until nbdkit serves, within start_timeout of its spawn; if it exits
        or times out first, stop it and raise NbdkitError / NbdkitTimeout."""
        delay = 0.01
        while not self.poll_ready():
            time.sleep(min(delay, max(0.0, self._deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)

    def poll_ready(self) -> bool:
        """Whether nbdkit serves now (without waiting); raises as wait_ready does."""
        proc = self._require_proc()
        try:
            returncode = proc.poll()
            if returncode is not None:
                stderr = self.stderr_text()
                log.warning("nbdkit exited with code %d at start: %s", returncode, stderr)
                raise NbdkitError(self.cmd, returncode, stderr)
            if self._ready() if self._ready is not None else \
                    accepts_connections(self._probe_address()):
                if self.socket is not None:
                    self._socket_identity = _file_identity(self.socket)
                log.debug("nbdkit pid %d serving on %s", proc.pid, self.address)
                return True
            if time.monotonic() >= self._deadline:
                stderr = self.stderr_text()
                log.warning("nbdkit did not start serving on %s: %s", self.address, stderr)
                raise NbdkitTimeout(
                    self.cmd, stderr, address=self.address, timeout=self.start_timeout
                )
        except BaseException:
            process.stop(proc, 10.0, log=log, name="nbdkit")
            raise
        return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop nbdkit (SIGTERM, wait, SIGKILL) and remove its socket; return its exit code.

        Safe to call more than once, and after :meth:`kill`.
        """
        if self._proc is None:
            return None
        process.stop(self._proc, timeout, log=log, name="nbdkit")
        if not self._killed and self._proc.returncode not in (0, -signal.SIGTERM):
            log.warning(
                "nbdkit pid %d exited with code %s: %s",
                self._proc.pid,
                self._proc.returncode,
                self.stderr_text(),
            )
        self._remove_socket()
        return self._proc.returncode

    def _remove_socket(self) -> None:
        """Remove our socket file, unless another server has replaced it since."""
        if self.socket is None or self._socket_identity is None:
            return
        try:
            if _file_identity(self.socket) == self._socket_identity:
                self.socket.unlink()
        except FileNotFoundError:
            pass
        self._socket_identity = None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL nbdkit, as a crash would, and reap it. The socket file stays behind."""
        proc = self._require_proc()
        log.debug("Killing nbdkit pid %d", proc.pid)
        self._killed = True
        proc.kill()  # does nothing if it has already exited
        proc.wait(timeout)

    def _stop_on_exit(self) -> None:
        self.stop()
