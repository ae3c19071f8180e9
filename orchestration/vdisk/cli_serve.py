"""``vdisk serve``: a supervisor of one nbdkit worker per disk (docs/serve.md).

    vdisk serve -d DIR [--unix-dir RUNDIR | --ports FIRST-LAST [--address ADDR]]
                [--tls-psk FILE] [--socket-mode MODE] [--socket-group GROUP]
                [--detach [--pidfile FILE] [--log FILE]] [--json]
    vdisk serve status -d DIR [--json]

Each disk is served by its own nbdkit worker on its own endpoint: a Unix
socket RUNDIR/NAME.sock (RUNDIR defaults to DIR/run) or a TCP port of the
range; the export name is the disk's name. The command prints ``serving ...``
(foreground) or returns (detached) once every worker serves or has said why
it cannot, within ``--timeout``. SIGTERM and SIGINT stop every worker within
``--stop-timeout`` (after that, a worker whose clients stay attached is
flushed and killed) and remove the endpoints.
"""

from __future__ import annotations

import argparse
import grp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

# blockpath makes vdisk_block (the block engine beside the plugin) importable
from . import blockpath  # noqa: F401
from .cli_common import (
    CliError,
    datastore_dir,
    datastore_options,
    emit,
    one_line,
    output_options,
)
from .control import ControlClient
from .endpoint import EndpointError, parse_ports
from .errors import Error
from .supervisor import Options, Supervisor

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PIDFILE = "serve.pid"
LOGFILE = "serve.log"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", parents=[output_options(), datastore_options()],
                       help="serve every disk of a datastore over NBD, one worker per disk",
                       description="Serve every disk of a datastore, each from its own nbdkit "
                       "worker on its own endpoint; 'vdisk serve status' shows the workers.")
    p.add_argument("action", nargs="?", choices=["status"],
                   help="'status': show the workers of the running server")
    listen = p.add_mutually_exclusive_group()
    listen.add_argument("--unix-dir", metavar="RUNDIR",
                        help="one Unix socket per disk, RUNDIR/NAME.sock (the default, with "
                             "RUNDIR = DIR/run)")
    listen.add_argument("--ports", metavar="FIRST-LAST", type=_port_range,
                        help="one TCP port per disk from this range (control sockets and logs "
                             "go to DIR/run)")
    p.add_argument("--address", metavar="ADDR",
                   help="the address to bind with --ports (default 127.0.0.1)")
    p.add_argument("--tls-psk", metavar="FILE",
                   help="every worker requires TLS with the pre-shared keys in FILE")
    p.add_argument("--socket-mode", metavar="MODE", default="0600",
                   help="mode of the Unix sockets, in octal (default 0600)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group of the Unix sockets (e.g. libvirt-qemu, with --socket-mode 0660)")
    p.add_argument("--threads", choices=["serialize", "parallel"],
                   help="the workers' nbdkit thread model (default serialize, the faster "
                        "here: docs/benchmarks.md)")
    p.add_argument("--detach", action="store_true",
                   help=f"run in the background (pid file RUNDIR/{PIDFILE} unless --pidfile)")
    p.add_argument("--pidfile", metavar="FILE", help="write the server's pid here")
    p.add_argument("--log", metavar="FILE",
                   help=f"the server's log when detached (default RUNDIR/{LOGFILE})")
    p.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="after SIGTERM, how long clients may stay attached before a disk is "
                        "flushed and its worker killed (default 10)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the workers to serve (default 30)")
    p.set_defaults(func=cmd_serve)


def _port_range(text: str) -> tuple[int, int]:
    try:
        return parse_ports(text)
    except EndpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _options(args: argparse.Namespace, directory: str) -> Options:
    if args.address and not args.ports:
        raise CliError("--address goes with --ports")
    rundir = os.path.abspath(args.unix_dir or os.path.join(directory, "run"))
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise CliError(f"--socket-mode {args.socket_mode!r}: expected octal, e.g. 0660") from None
    if not 0 <= mode <= 0o777:
        raise CliError(f"--socket-mode {args.socket_mode!r}: expected 0000-0777")
    gid = None
    if args.socket_group:
        try:
            gid = grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            raise CliError(f"--socket-group {args.socket_group}: no such group") from None
    psk = None
    if args.tls_psk:
        psk = os.path.abspath(args.tls_psk)
        if not os.access(psk, os.R_OK):
            raise CliError(f"{args.tls_psk}: cannot read the TLS pre-shared key file")
    return Options(rundir=rundir, ports=args.ports, address=args.address or "127.0.0.1",
                   tls_psk=psk, socket_mode=mode, socket_gid=gid,
                   stop_timeout=args.stop_timeout, start_timeout=args.timeout,
                   threads=args.threads,
                   say=lambda line: _say(line))


def _say(line: str) -> None:
    sys.stderr.write(f"vdisk: {line}\n")
    sys.stderr.flush()


# --- the command ----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    directory = datastore_dir(args)
    if args.action == "status":
        return _status(args, directory)
    opts = _options(args, directory)
    if args.detach:
        return _serve_detached(args, directory, opts)
    return _serve_foreground(args, directory, opts)


def _serve_foreground(args: argparse.Namespace, directory: str, opts: Options) -> int:
    stop: list[int] = []
    sup: Supervisor | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)
        if sup is not None:
            sup.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    pidfile = os.path.abspath(args.pidfile) if args.pidfile else None
    try:
        try:
            sup = Supervisor(directory, opts)
        except Error as e:
            raise CliError(str(e)) from None
        try:
            sup.start()
            if pidfile:
                _write_pidfile(pidfile, os.getpid())
            # a disk that is not served has said why on stderr (Supervisor's say)
            _report(args, sup.server_status(), detached=False)
            if not stop:
                sup.serve()
        finally:
            sup.close()
            if pidfile:
                _unlink_if(pidfile, lambda: _read_pid(pidfile) == os.getpid())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _report(args: argparse.Namespace, status: dict[str, Any], *, detached: bool,
            log: str | None = None) -> None:
    workers = status.pop("workers")
    obj = {**status, "detached": detached, "disks": workers}
    if log is not None:
        obj["log"] = log
    lines = [f"serving {status['datastore']}: {len(obj['disks'])} disk(s), control "
             f"{status['control']}, pid {status['pid']}"]
    for w in obj["disks"]:
        lines.append(f"  {w['disk']:20} {w['state']:10} {w['uri']}")
    emit(args, obj, "\n".join(lines))


def _status(args: argparse.Namespace, directory: str) -> int:
    from .routing import open_service

    with open_service(directory) as svc:
        if not svc.served:
            raise CliError(f"datastore {directory} is not served")
        status = svc.execute("server-status", {})
    lines = [f"server pid {status['pid']}, control {status['control']}",
             f"{'DISK':20} {'PID':>7} {'STATE':10} {'UPTIME':>9} {'RESTARTS':>8}  ENDPOINT"]
    for w in status["workers"]:
        up = f"{w['uptime_s']:.0f}s" if w["uptime_s"] is not None else "-"
        lines.append(f"{w['disk']:20} {w['pid'] or '-':>7} {w['state']:10} {up:>9} "
                     f"{w['restarts']:>8}  {w['uri']}"
                     + (f"  ({w['error']})" if w["error"] else ""))
    emit(args, status, "\n".join(lines))
    return 0


# --- detached -----------------------------------------------------------------------------


def _serve_detached(args: argparse.Namespace, directory: str, opts: Options) -> int:
    """Run ``vdisk serve`` (foreground) in its own session, logging to a file;
    return once it wrote its pid file (after its workers started)."""
    from vdisk_block.endpoints import server

    live = server(directory)
    if live is not None:
        raise CliError(f"datastore {directory} is already served by {live}")
    os.makedirs(opts.rundir, mode=0o755, exist_ok=True)
    log = os.path.abspath(args.log or os.path.join(opts.rundir, LOGFILE))
    pidfile = os.path.abspath(args.pidfile or os.path.join(opts.rundir, PIDFILE))
    _unlink_if(pidfile, lambda: True)          # a live server was refused above
    cmd = [sys.executable, "-m", "vdisk.cli", "serve", "-d", directory, "--pidfile", pidfile,
           "--timeout", str(args.timeout), "--stop-timeout", str(args.stop_timeout),
           "--socket-mode", args.socket_mode]
    cmd += ["--ports", "{}-{}".format(*args.ports)] + \
        (["--address", args.address] if args.address else []) if args.ports else \
        ["--unix-dir", opts.rundir]
    if args.tls_psk:
        cmd += ["--tls-psk", os.path.abspath(args.tls_psk)]
    if args.socket_group:
        cmd += ["--socket-group", args.socket_group]
    if args.threads:
        cmd += ["--threads", args.threads]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with open(log, "ab") as logfile:
        start = logfile.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=logfile, start_new_session=True, env=env, cwd="/")

    def last_error() -> str:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        errors = [line for line in text.splitlines() if line.startswith("vdisk: error: ")]
        return errors[-1][len("vdisk: error: "):] if errors else text

    deadline = time.monotonic() + args.timeout + 10.0
    try:
        while _read_pid(pidfile) != proc.pid:
            rc = proc.poll()
            if rc is not None:
                raise CliError(f"the server exited with code {rc}: {one_line(last_error())}")
            if time.monotonic() >= deadline:
                raise CliError(f"the server did not start within {args.timeout:g} s: "
                               f"{one_line(last_error())}")
            time.sleep(0.05)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(args.stop_timeout + 10)
        raise
    with ControlClient.connect(os.path.join(opts.rundir, "vdisk.ctl")) as client:
        status = client.execute("server-status", {})
    _report(args, status, detached=True, log=log)
    return 0


def _write_pidfile(path: str, pid: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.rename(tmp, path)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _unlink_if(path: str, condition: Any) -> None:
    try:
        if condition():
            os.unlink(path)
    except FileNotFoundError:
        pass
