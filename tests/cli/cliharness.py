"""Helpers for the ``vdisk`` command-line tests: run it as a process, serve a datastore.

``vdisk`` runs as ``python -m vdisk.cli`` with the test interpreter, so the
suite does not depend on the console script being installed.
:func:`start_serve` starts ``vdisk serve --json`` in the foreground, one Unix
socket per disk in the datastore's ``run/`` directory (paths kept short by the
fixtures), and returns once it printed its line, within a deadline;
:meth:`Served.stop` stops it by its pid (SIGTERM, bounded wait, SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd

from vdisk import qemu_img

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "vdisk.cli"]
COMMAND_TIMEOUT = 60
MiB = 1 << 20


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """The one JSON object the command printed (fails unless exactly one came back)."""
        lines = self.stdout.splitlines()
        assert len(lines) == 1, f"expected one JSON line, got {self.stdout!r}"
        obj = json.loads(lines[0])
        assert isinstance(obj, dict)
        return obj

    def error_line(self) -> str:
        """The one-line error of a failed command."""
        assert self.returncode != 0, f"command succeeded: {self.stdout!r}"
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"expected one error line, got {self.stderr!r}"
        assert lines[0].startswith("vdisk: error: "), lines[0]
        return lines[0][len("vdisk: error: "):]


def run_vdisk(*args: str | os.PathLike[str], check: bool = True,
              timeout: float = COMMAND_TIMEOUT, cwd: Path | None = None) -> Result:
    """``vdisk ARGS`` in ``cwd`` (default: the test's current directory)."""
    cp = subprocess.run([*CLI, *(os.fspath(a) for a in args)], stdin=subprocess.DEVNULL,
                        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    result = Result(cp.returncode, cp.stdout, cp.stderr)
    if check and cp.returncode != 0:
        raise AssertionError(f"vdisk {' '.join(map(str, args))} failed with "
                             f"{cp.returncode}: {cp.stderr}")
    return result


@dataclass
class Datastore:
    path: Path

    def vdisk(self, *args: str | os.PathLike[str], check: bool = True,
              cwd: Path | None = None) -> Result:
        """Run a vdisk command on this datastore (``-d DIR`` appended)."""
        return run_vdisk(*args, "-d", self.path, check=check, cwd=cwd)

    def json(self, *args: str | os.PathLike[str], cwd: Path | None = None) -> dict[str, Any]:
        return self.vdisk(*args, "--json", cwd=cwd).json()

    def create(self, name: str, size: str = "64M") -> str:
        return str(self.json("disk", "create", name, "--size", size)["top"])

    def disk(self, name: str) -> dict[str, Any]:
        return self.json("disk", "info", name)

    def top(self, name: str) -> Path:
        return self.path / self.disk(name)["top"]

    def images(self) -> list[str]:
        return sorted(p.name for p in (self.path / "images").iterdir())


@dataclass
class Served:
    proc: subprocess.Popen[str]
    info: dict[str, Any]
    rundir: Path

    @property
    def pid(self) -> int:
        """The supervisor's pid."""
        return self.proc.pid

    def worker(self, disk: str) -> dict[str, Any]:
        """The disk's worker as ``vdisk serve status`` shows it now."""
        status = run_vdisk("serve", "status", "-d", self.info["datastore"], "--json").json()
        return next(w for w in status["workers"] if w["disk"] == disk)

    def worker_pid(self, disk: str) -> int:
        pid = self.worker(disk)["pid"]
        assert pid, f"disk {disk} has no running worker"
        return int(pid)

    def socket(self, disk: str) -> Path:
        return self.rundir / f"{disk}.sock"

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket(export)}"

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode


def start_serve(ds: Datastore, *extra: str, timeout: float = 60.0) -> Served:
    """``vdisk serve --json`` in the foreground (one Unix socket per disk in
    DIR/run); returns once it printed its line."""
    log = ds.path / "serve.stderr"
    with open(log, "w") as stderr:       # a file: a pipe nobody reads would block
        proc = subprocess.Popen([*CLI, "serve", "-d", str(ds.path), "--json", *extra],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while not line:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"vdisk serve did not start (exit {proc.returncode}): "
                                 f"{log.read_text()}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            line = proc.stdout.readline()
    info = json.loads(line)
    return Served(proc, info, Path(info["rundir"]))


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still running after {timeout} s"
        time.sleep(0.05)


def chain_length(top: Path) -> int:
    return len(qemu_img.info(top, backing_chain=True, force_share=True))


Serve = Callable[..., Served]
"""The ``serve`` fixture: serves a datastore until the test ends."""


@contextlib.contextmanager
def connect(uri: str) -> Iterator[nbd.NBD]:
    """A libnbd handle on ``uri``, shut down when the block ends."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield h
    finally:
        h.shutdown()
