"""Processes for the multi-process and kill tests: ``vdisk`` commands, gates, leftovers.

* :func:`vdisk` runs one command to completion (through :mod:`slowvdisk`, so
  it can be slowed by environment); :class:`Background` starts one in its own
  process group and owns it: :meth:`Background.cleanup` kills whatever is
  left of the group (the command and anything it started) by its id.
* :class:`ConvertGate` is a ``$QEMU_IMG`` that holds every ``qemu-img
  convert`` until the test releases it: the copy of a backup is caught
  while it runs.
* :func:`group_alive` lists what still runs in a process group (orphans of a
  killed command); :func:`leftovers` the temporary files a command left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cliharness import Result

from vdisk_block.catalog import Catalog

HERE = Path(__file__).resolve().parent
SLOW = [sys.executable, str(HERE / "slowvdisk.py")]
COMMAND_TIMEOUT = 120.0
TEMPORARY = (".tmp", ".creating", ".partial")


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    return env


def vdisk(*args: str | os.PathLike[str], env: Mapping[str, str] | None = None,
          timeout: float = COMMAND_TIMEOUT) -> Result:
    cp = subprocess.run([*SLOW, *map(os.fspath, args)], stdin=subprocess.DEVNULL,
                        capture_output=True, text=True, timeout=timeout, env=_env(env),
                        check=False)
    return Result(cp.returncode, cp.stdout, cp.stderr)


def ok(result: Result, what: str) -> Result:
    assert result.returncode == 0, f"{what}: exit {result.returncode}: {result.stderr}"
    return result


def refusal(result: Result, what: str) -> str:
    """A failed command's reason: exactly one line ``vdisk: error: ...`` on stderr."""
    assert result.returncode != 0, f"{what} succeeded: {result.stdout}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: error: "), \
        f"{what}: not one clear error line: {result.stderr!r}"
    return lines[0]


class Background:
    """A ``vdisk`` command running in its own process group, owned by the test."""

    def __init__(self, args: Iterable[str | os.PathLike[str]], logdir: Path, *,
                 env: Mapping[str, str] | None = None, name: str = "bg") -> None:
        self.out = logdir / f"{name}.out"
        self.err = logdir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([*SLOW, *map(os.fspath, args)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=_env(env), start_new_session=True)
        self.pgid = self.proc.pid

    def wait(self, timeout: float = COMMAND_TIMEOUT) -> Result:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"vdisk command still running after {timeout} s: "
                                 f"{self.err.read_text()}") from None
        return Result(self.proc.returncode, self.out.read_text(), self.err.read_text())

    def signal(self, sig: int, release: Path | None = None) -> None:
        """Signal the command itself (not what it started); then end its holds."""
        self.proc.send_signal(sig)
        if release is not None:
            release.touch()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"vdisk did not end within 30 s of signal {sig}") from None

    def cleanup(self) -> None:
        """Kill anything left of the command's process group (by its id)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)


def group_alive(pgid: int) -> list[str]:
    """Processes (not zombies) still in a process group: 'pid command'."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(f"{entry.name} {cmd}")
    return out


def wait_group_gone(pgid: int, deadline: float = 2.0) -> list[str]:
    """Give a killed command's children a moment to go; return those that stay."""
    end = time.monotonic() + deadline
    while (alive := group_alive(pgid)) and time.monotonic() < end:
        time.sleep(0.05)
    return alive


def leftovers(*dirs: Path) -> list[str]:
    found = []
    for d in dirs:
        for dirpath, _dirs, files in os.walk(d):
            found += [os.path.join(dirpath, f) for f in files if f.endswith(TEMPORARY)]
    return found


class ConvertGate:
    """A ``$QEMU_IMG`` that holds ``qemu-img convert`` until released (bounded)."""

    def __init__(self, workdir: Path, hold: float = 30.0) -> None:
        self.started = workdir / "convert.started"
        self.go = workdir / "convert.go"
        self.script = workdir / "qemu-img-gate"
        real = shutil.which("qemu-img")
        assert real, "qemu-img not found"
        loops = int(hold / 0.05)
        self.script.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = convert ]; then\n'
            f'  : > "{self.started}"\n'
            "  i=0\n"
            f'  while [ ! -e "{self.go}" ] && [ $i -lt {loops} ]; do sleep 0.05; i=$((i+1)); done\n'
            "fi\n"
            f'exec "{real}" "$@"\n')
        self.script.chmod(0o755)
        self.env = {"QEMU_IMG": str(self.script)}

    def wait_started(self, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while not self.started.exists():
            assert time.monotonic() < end, f"no qemu-img convert within {deadline} s"
            time.sleep(0.02)

    def release(self) -> None:
        self.go.touch()


def catalog_jobs(ds: Path) -> list[dict[str, Any]]:
    """The job journal as the catalog holds it (read without any recovery)."""
    cat = Catalog(str(ds))
    try:
        return cat.jobs()
    finally:
        cat.close()


def catalog_top(ds: Path, disk: str) -> Path:
    cat = Catalog(str(ds))
    try:
        return ds / cat.disk(disk)["top"]
    finally:
        cat.close()


def wait_phase(ds: Path, phase: str, bg: Background, deadline: float = 60.0
               ) -> dict[str, Any]:
    """Wait until the newest job of the journal is in ``phase``; return it."""
    end = time.monotonic() + deadline
    while True:
        jobs = catalog_jobs(ds)
        if jobs and jobs[0]["state"] == phase:
            return jobs[0]
        if bg.proc.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"no job {phase} within {deadline} s (jobs "
                                 f"{[(j['id'], j['state']) for j in jobs]}; command exit "
                                 f"{bg.proc.returncode}: {bg.err.read_text()[-500:]})")
        time.sleep(0.01)
