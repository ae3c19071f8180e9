"""``vdisk serve``: run nbdkit with the plugin in datastore mode.

    nbdkit -f (-U SOCK | -i ADDR -p PORT) [--tls=require --tls-psk=FILE] \\
        python plugin/vdisk_nbdkit.py datastore=DIR control=CONTROL.sock

Every disk is an export of its name. The command returns (detached) or
prints ``serving ...`` (foreground) only once both the NBD address and the
control socket accept connections, within ``--timeout``; if nbdkit exits
first, the error is nbdkit's own reason on one line. In the foreground,
SIGTERM, SIGINT and SIGHUP are passed on to nbdkit, and ``vdisk serve``
exits with nbdkit's status; nbdkit dies with it (``--exit-with-parent``).
Detached, a foreground ``vdisk serve`` runs in its own session as nbdkit's
supervisor, logging to ``--log`` (default ``DIR/nbdkit.log``); nbdkit's pid
goes to ``--pidfile`` once it serves. A socket file left
behind by a server that is gone (nbdkit does not remove its Unix socket) is
removed first; one that still answers is refused.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import quote

# blockpath makes vdisk_block (the block engine beside the plugin) importable
from . import blockpath, nbdkit  # noqa: F401
from .cli_common import (
    CliError,
    datastore_dir,
    datastore_options,
    emit,
    one_line,
    output_options,
)
from .control import ControlClient
from .errors import Error

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def tcp_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1-65535")
    return port


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", parents=[output_options(), datastore_options()],
                       help="serve every disk of a datastore over NBD")
    listen = p.add_mutually_exclusive_group(required=True)
    listen.add_argument("--unix", metavar="SOCK", help="listen on this Unix socket")
    listen.add_argument("--port", type=tcp_port, help="listen on this TCP port")
    p.add_argument("--address", metavar="ADDR",
                   help="the address to bind with --port (default 127.0.0.1)")
    p.add_argument("--tls-psk", metavar="FILE",
                   help="require TLS with the pre-shared keys in FILE (nbdkit --tls-psk)")
    p.add_argument("--control", metavar="SOCK",
                   help="the control socket (default DIR/control.sock)")
    p.add_argument("--detach", action="store_true", help="run in the background")
    p.add_argument("--pidfile", metavar="FILE", help="write nbdkit's pid here")
    p.add_argument("--log", metavar="FILE",
                   help="nbdkit's log when detached (default DIR/nbdkit.log)")
    p.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="after SIGTERM, how long clients may stay attached before the "
                        "disks are flushed and nbdkit is killed (default 10)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the server to accept connections (default 30)")
    p.set_defaults(func=cmd_serve)


# --- sockets ----------------------------------------------------------------------------


def _prepare_socket(path: str, what: str) -> None:
    """Remove a stale socket file; refuse a live one or anything that is not a socket."""
    if len(path.encode()) > nbdkit.SUN_PATH_MAX:
        raise CliError(f"{what} path {path} is longer than {nbdkit.SUN_PATH_MAX} bytes")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CliError(f"{path} exists and is not a socket")
    if nbdkit.accepts_connections(path):
        raise CliError(f"{path} is in use by another server")
    os.unlink(path)


def _probe_tcp(host: str, port: int) -> bool:
    if ":" not in host:
        return nbdkit.accepts_connections((host, port))
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def _control_answers(path: str) -> bool:
    try:
        ControlClient.connect(path, timeout=2.0).close()
    except (Error, OSError):    # nobody there, or no greeting yet
        return False
    return True


class Plan:
    """The nbdkit command line and the addresses to wait for."""

    def __init__(self, args: argparse.Namespace, directory: str) -> None:
        self.directory = directory
        self.control = os.path.abspath(args.control or os.path.join(directory, "control.sock"))
        self.socket: str | None = None
        scheme = "nbds" if args.tls_psk else "nbd"
        if args.unix:
            if args.address:
                raise CliError("--address goes with --port, not --unix")
            self.socket = os.path.abspath(args.unix)
            listen = ["-U", self.socket]
            self.uri = f"{scheme}+unix:///?socket={quote(self.socket, safe='/')}"
        else:
            self.host = args.address or "127.0.0.1"
            self.port = int(args.port)
            listen = ["-i", self.host, "-p", str(self.port)]
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.uri = f"{scheme}://{host}:{self.port}/"
        tls: list[str] = []
        if args.tls_psk:
            psk = os.path.abspath(args.tls_psk)
            if not os.access(psk, os.R_OK):
                raise CliError(f"{args.tls_psk}: cannot read the TLS pre-shared key file")
            tls = ["--tls=require", f"--tls-psk={psk}"]
        self.tls = bool(tls)
        # --exit-with-parent: a `vdisk serve` killed with SIGKILL takes nbdkit with it
        self.cmd = [nbdkit.binary(), "-f", *listen, *tls, "--exit-with-parent",
                    "python", str(nbdkit.PLUGIN), f"datastore={directory}",
                    f"control={self.control}"]

    def probe_host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    def nbd_answers(self) -> bool:
        if self.socket is not None:
            return nbdkit.accepts_connections(self.socket)
        return _probe_tcp(self.probe_host(), self.port)

    def prepare(self) -> None:
        if self.socket is not None:
            _prepare_socket(self.socket, "the NBD socket")
        elif _probe_tcp(self.probe_host(), self.port):
            raise CliError(f"{self.host}:{self.port} is in use by another server")
        _prepare_socket(self.control, "the control socket")


def _check_not_served(directory: str) -> list[str]:
    """The disk names; refuse a datastore that a live server already serves."""
    from vdisk_block.catalog import Catalog

    c = Catalog(directory)
    try:
        recorded = c.get_meta("control")
        names = [row["name"] for row in c.disks()]
    finally:
        c.close()
    if recorded:
        path = os.path.join(directory, recorded)
        if _control_answers(path):
            raise CliError(f"datastore {directory} is already served (control socket {path})")
    return names


def _wait_until_serving(plan: Plan, proc: subprocess.Popen[bytes], timeout: float,
                        stderr_text: Any) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        rc = proc.poll()
        if rc is not None:
            raise CliError(f"nbdkit exited with code {rc} before serving: "
                           f"{one_line(stderr_text())}")
        if plan.nbd_answers() and _control_answers(plan.control):
            return
        if time.monotonic() >= deadline:
            raise CliError(f"nbdkit did not serve {plan.uri} and {plan.control} within "
                           f"{timeout:g} s: {one_line(stderr_text())}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _wait_for_exit(proc: subprocess.Popen[bytes], plan: Plan, stop_asked: list[float],
                   grace: float) -> int:
    """Wait for nbdkit; after a stop request, bound the wait.

    nbdkit 1.32 with a Python plugin does not exit on SIGTERM while a client
    stays connected. After `grace` seconds every open disk is flushed through
    the control socket and nbdkit is killed: what clients wrote and flushed is
    on disk, and the images stay consistent (the block driver is crash-safe).
    """
    while True:
        try:
            return proc.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
        if stop_asked and time.monotonic() - stop_asked[0] > grace:
            try:
                with ControlClient.connect(plan.control, timeout=5.0) as client:
                    client.execute("flush", {})
                flushed = "flushed every disk"
            except (Error, OSError) as e:
                flushed = f"could not flush the disks ({one_line(str(e))})"
            print(f"vdisk: clients still attached {grace:g} s after the stop request; "
                  f"{flushed} and stopped nbdkit", file=sys.stderr)
            proc.kill()
            return proc.wait()


def _write_pidfile(path: str, pid: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.rename(tmp, path)


def _report(args: argparse.Namespace, plan: Plan, pid: int, names: list[str],
            log: str | None) -> None:
    obj: dict[str, Any] = {"datastore": plan.directory, "pid": pid, "uri": plan.uri,
                           "control": plan.control, "exports": names, "tls": plan.tls,
                           "detached": bool(args.detach)}
    if plan.socket is not None:
        obj["socket"] = plan.socket
    else:
        obj["address"], obj["port"] = plan.host, plan.port
    if log is not None:
        obj["log"] = log
    exports = ", ".join(names) if names else "none yet"
    emit(args, obj, f"serving {plan.directory} on {plan.uri} (exports: {exports}; "
                    f"control {plan.control}; nbdkit pid {pid})")


# --- the command ------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    if args.detach and not args.pidfile:
        raise CliError("--detach needs --pidfile FILE")
    directory = datastore_dir(args)
    names = _check_not_served(directory)
    plan = Plan(args, directory)
    plan.prepare()
    if args.detach:
        return _serve_detached(args, plan, names)
    return _serve_foreground(args, plan, names)


def _serve_detached(args: argparse.Namespace, plan: Plan, names: list[str]) -> int:
    """Run ``vdisk serve`` (foreground) in its own session as nbdkit's supervisor.

    nbdkit 1.32 dies with the process that started it (it sets a parent-death
    signal even without --exit-with-parent), so the detached server is this
    command in the foreground, in a new session, logging to a file. It writes
    nbdkit's pid to the pid file once both sockets answer; that is what we wait
    for. SIGTERM to either process stops both cleanly.
    """
    log = os.path.abspath(args.log or os.path.join(plan.directory, "nbdkit.log"))
    pidfile = os.path.abspath(args.pidfile)
    _unlink_if(pidfile, lambda: True)          # a live server was refused above
    cmd = [sys.executable, "-m", "vdisk.cli", "serve", "-d", plan.directory,
           "--control", plan.control, "--pidfile", pidfile, "--timeout", str(args.timeout)]
    if plan.socket is not None:
        cmd += ["--unix", plan.socket]
    else:
        cmd += ["--port", str(plan.port), "--address", plan.host]
    if args.tls_psk:
        cmd += ["--tls-psk", os.path.abspath(args.tls_psk)]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with open(log, "ab") as logfile:
        start = logfile.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                start_new_session=True, env=env, cwd="/")

    def stderr_text() -> str:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        errors = [line for line in text.splitlines() if line.startswith("vdisk: error: ")]
        return errors[-1][len("vdisk: error: "):] if errors else text

    deadline = time.monotonic() + args.timeout + 10.0
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                raise CliError(f"the server exited with code {rc}: {one_line(stderr_text())}")
            pid = _read_pid(pidfile)
            if pid is not None:
                break
            if time.monotonic() >= deadline:
                raise CliError(f"the server did not start within {args.timeout:g} s: "
                               f"{one_line(stderr_text())}")
            time.sleep(0.05)
    except BaseException:
        _stop(proc)
        raise
    _report(args, plan, pid, names, log)
    return 0


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


class _Relay:
    """Collects nbdkit's output until it serves, then passes it on to our stderr."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.pipe = pipe
        self.lines: list[bytes] = []
        self.passing = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="nbdkit-stderr", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for line in iter(self.pipe.readline, b""):
            with self.lock:
                if self.passing:
                    _write_stderr(line)
                else:
                    self.lines.append(line)

    def text(self) -> str:
        with self.lock:
            return b"".join(self.lines).decode(errors="replace")

    def pass_on(self) -> None:
        with self.lock:
            for line in self.lines:
                _write_stderr(line)
            self.lines.clear()
            self.passing = True


def _write_stderr(line: bytes) -> None:
    sys.stderr.buffer.write(line)
    sys.stderr.buffer.flush()


def _serve_foreground(args: argparse.Namespace, plan: Plan, names: list[str]) -> int:
    try:
        proc = subprocess.Popen(plan.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except OSError as e:
        raise CliError(f"cannot run {plan.cmd[0]}: {e.strerror or e}") from None
    assert proc.stdout is not None
    relay = _Relay(proc.stdout)

    stop_asked: list[float] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)
            if signum != signal.SIGHUP and not stop_asked:
                stop_asked.append(time.monotonic())

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    pidfile = os.path.abspath(args.pidfile) if args.pidfile else None
    socket_id: tuple[int, int] | None = None
    try:
        try:
            _wait_until_serving(plan, proc, args.timeout, relay.text)
        except BaseException:
            _stop(proc)
            raise
        if plan.socket is not None:
            st = os.stat(plan.socket)
            socket_id = (st.st_dev, st.st_ino)
        if pidfile:
            _write_pidfile(pidfile, proc.pid)
        relay.pass_on()
        _report(args, plan, proc.pid, names, None)
        rc = _wait_for_exit(proc, plan, stop_asked, args.stop_timeout)
        relay.thread.join(5.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pidfile:
            _unlink_if(pidfile, lambda: _read_pid(pidfile) == proc.pid)
        if plan.socket is not None and socket_id is not None:
            sock = plan.socket
            _unlink_if(sock, lambda: (os.stat(sock).st_dev, os.stat(sock).st_ino) == socket_id)
    return rc if rc >= 0 else 128 - rc


def _unlink_if(path: str, condition: Any) -> None:
    try:
        if condition():
            os.unlink(path)
    except FileNotFoundError:
        pass
