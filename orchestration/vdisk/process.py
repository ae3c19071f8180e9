"""Running the external commands vdisk uses, and owning the processes it starts.

:func:`run` runs a command to completion (qemu-img, qemu-io, the guest
builder): an argument list, logged at debug before it runs, its stderr logged
when it fails, and the caller's :class:`~vdisk.errors.CommandError` subclass
raised with the command, exit code, stderr and stdout. :func:`stop` ends a
process we started (SIGTERM, a bounded wait, SIGKILL, a bounded wait), and
:class:`ProcessOwner` is the base of the classes that own one long-lived
process (:class:`~vdisk.nbdkit.NbdkitServer`, :class:`~vdisk.lab.machine.Machine`).
"""

from __future__ import annotations

import functools
import logging
import shlex
import shutil
import signal
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import CommandError


def run(
    cmd: Sequence[str],
    error: type[CommandError],
    *,
    log: logging.Logger,
    ok_codes: Collection[int] = (0,),
    timeout: float | None = None,
    log_stdout: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; raise ``error`` unless it exits with a code in ``ok_codes``.

    ``error`` gets ``returncode=None`` when the command cannot be run or runs
    longer than ``timeout`` seconds. Messages go to ``log``, the caller's
    logger; ``log_stdout`` adds stdout to the failure message, for tools that
    report errors there.
    """
    cmd = list(cmd)
    log.debug("Running %s", shlex.join(cmd))
    if shutil.which(cmd[0]) is None:
        log.warning("Cannot run %s: not found", cmd[0])
        raise error(cmd, None, f"cannot run {cmd[0]}: not found")
    try:
        cp = subprocess.run(
            [*dies_with_us(), *cmd],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        log.warning("Command %s timed out after %g s", shlex.join(cmd), timeout)
        raise error(cmd, None, f"timed out after {timeout:g} s") from e
    except OSError as e:
        log.warning("Cannot run %s: %s", cmd[0], e)
        raise error(cmd, None, f"cannot run {cmd[0]}: {e}") from e
    if cp.returncode not in ok_codes:
        if log_stdout:
            log.warning(
                "Command %s failed with exit code %d: stderr: %s stdout: %s",
                shlex.join(cmd),
                cp.returncode,
                cp.stderr,
                cp.stdout,
            )
        else:
            log.warning(
                "Command %s failed with exit code %d: %s", shlex.join(cmd), cp.returncode, cp.stderr
            )
        raise error(cmd, cp.returncode, cp.stderr, cp.stdout)
    return cp


@functools.cache
def dies_with_us(sig: signal.Signals = signal.SIGKILL) -> list[str]:
    """A prefix for a command line that makes the command die with the thread
    that started it (``sig`` on its death, however it dies): ``setpriv
    --pdeathsig SIG --`` from util-linux, where it is installed. A copy that
    outlives a killed ``vdisk backup`` would go on writing a file nobody
    removes. SIGTERM instead of SIGKILL lets a command that owns processes of
    its own (``vdisk serve`` and its workers) stop them on the way out."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", sig.name.removeprefix("SIG"), "--"] if setpriv else []


def stop(proc: subprocess.Popen[bytes], timeout: float, *, log: logging.Logger, name: str) -> int:
    """Stop a process we started: SIGTERM, wait up to ``timeout``, then SIGKILL and wait again.

    Returns the exit code, at once if the process has already exited. Raises
    subprocess.TimeoutExpired if even SIGKILL does not end it within ``timeout``.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s pid %d ignored SIGTERM for %g s; killing it", name, proc.pid, timeout)
            proc.kill()
    return proc.wait(timeout)


class ProcessOwner(ABC):
    """Base of the classes that own one long-lived process.

    The subclass starts ``self._proc`` with its stdout and stderr going to
    ``output_path`` (:meth:`start`) and stops it (:meth:`_stop_on_exit`, which
    leaving a ``with`` block always calls); this class answers what every
    owner can say about its process.
    """

    def __init__(self, output_path: Path) -> None:
        self._output_path = output_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited (negative: killed by that signal)."""
        return self._proc.poll() if self._proc is not None else None

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr (and stdout) so far."""
        try:
            return self._output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def _stop_on_exit(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_on_exit()

    def _require_not_started(self) -> None:
        if self._proc is not None:
            raise RuntimeError(f"{self!r} was already started")

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self!r} was not started")
        return self._proc
