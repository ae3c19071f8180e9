"""A QEMU virtual machine as an owned process.

    with Machine(workdir, args=attach.qemu_drive_args(uri),
                 fw_cfg={guest.FW_CFG_NAME: guest.config_text("selftest")}) as vm:
        vm.wait_for_line(r"VDISK-SELFTEST: (PASS|FAIL.*)", timeout=120)
        vm.wait(timeout=30)                  # the guest powers off

The serial console is connected to a socket pair: a thread copies it to
``workdir/NAME.console.log`` and keeps its lines for :meth:`Machine.wait_for_line`;
:meth:`Machine.console_write` types into it. QMP runs on a second socket pair
(:attr:`Machine.qmp`, already past capabilities negotiation). No socket paths,
so nothing to wait for at start and nothing left behind. Every wait has a
deadline; leaving the ``with`` block always stops QEMU (QMP ``quit``, then
SIGTERM, then SIGKILL) and QEMU also dies with the thread that started it
(``setpriv --pdeathsig``), so an interrupted run leaves no guest behind.

Accelerator (:func:`detect_accel`): KVM only when it can really run guests,
that is when the host checks of :mod:`vdisk.lab.accel` find nothing against
it and QEMU started with ``-accel kvm`` reports KVM present and enabled over
QMP; else TCG. ``$VDISK_ACCEL`` (``kvm`` or ``tcg``) overrides the detection.
The binary is ``$QEMU`` if set, else ``qemu-system-x86_64``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import process
from ..errors import Error
from .accel import kvm_unusable_reason
from .qmp import QmpClient, QmpError

log = logging.getLogger(__name__)


def binary() -> str:
    return os.environ.get("QEMU", "qemu-system-x86_64")


# --- errors ----------------------------------------------------------------------


class MachineError(Error):
    """Base class of QEMU process failures."""


class MachineStartError(MachineError):
    """QEMU exited (or did not answer QMP) while starting."""

    msg = "QEMU did not start (exit code {self.returncode}): {self.stderr}"

    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr: str) -> None:
        super().__init__(cmd, returncode, stderr)
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr.strip() or "(no output)"


class MachineTimeout(MachineError):
    """A wait ran out of time; ``console_tail`` holds the last console lines."""

    msg = "{self.what} within {self.timeout:g} s; last console lines:\n{self.console_tail}"

    def __init__(self, what: str, timeout: float, console_tail: str) -> None:
        super().__init__(what, timeout, console_tail)
        self.what = what
        self.timeout = timeout
        self.console_tail = console_tail


class MachineExited(MachineError):
    """QEMU exited before the console line we waited for appeared."""

    msg = (
        "QEMU exited with code {self.returncode} before a console line matched "
        "{self.pattern!r}; stderr: {self.stderr}; last console lines:\n{self.console_tail}"
    )

    def __init__(self, pattern: str, returncode: int | None, stderr: str, console_tail: str):
        super().__init__(pattern, returncode, stderr, console_tail)
        self.pattern = pattern
        self.returncode = returncode
        self.stderr = stderr.strip() or "(none)"
        self.console_tail = console_tail


# --- the machine -------------------------------------------------------------------


class Machine(process.ProcessOwner):
    """A QEMU process with its serial console and QMP on socket pairs.

    ``args`` are extra QEMU options (disks: see :mod:`vdisk.attach`);
    ``fw_cfg`` maps fw_cfg file names (``opt/...``) to their text;
    ``network`` adds a virtio NIC on QEMU user networking (the guest reaches
    the host's 127.0.0.1 as 10.0.2.2); ``paused`` starts with ``-S``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        args: Sequence[str] = (),
        fw_cfg: Mapping[str, str] | None = None,
        memory_mb: int = 256,
        accel: str | None = None,
        network: bool = False,
        paused: bool = False,
        name: str = "guest",
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.name = name
        self.accel = accel or detect_accel().name
        self.console_log = self.workdir / f"{name}.console.log"
        self.stderr_log = self.workdir / f"{name}.stderr.log"
        super().__init__(self.stderr_log)
        self.start_timeout = start_timeout
        self._fw_cfg = dict(fw_cfg or {})
        self._base_cmd = [binary(), "-name", name, "-nodefaults", "-no-user-config"]
        self._base_cmd += ["-display", "none", "-no-reboot", "-m", str(memory_mb)]
        self._base_cmd += ["-accel", self.accel]
        if self.accel == "kvm":
            self._base_cmd += ["-cpu", "host"]
        if network:
            self._base_cmd += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
        if paused:
            self._base_cmd.append("-S")
        self._args = list(args)
        self.cmd: list[str] = []
        self._console: socket.socket | None = None
        self._qmp: QmpClient | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._console_closed = False
        self._cursor = 0

    def __repr__(self) -> str:
        return f"<Machine {self.name} pid={self.pid} accel={self.accel}>"

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise RuntimeError(f"{self!r} is not running")
        return self._qmp

    # --- start and stop ------------------------------------------------------------

    def start(self) -> None:
        self._require_not_started()
        self.workdir.mkdir(parents=True, exist_ok=True)
        fw_cfg_args: list[str] = []
        for i, (fw_name, text) in enumerate(sorted(self._fw_cfg.items())):
            path = self.workdir / f"{self.name}.fw_cfg{i}"
            path.write_text(text)
            fw_cfg_args += ["-fw_cfg", f"name={fw_name},file={str(path).replace(',', ',,')}"]
        console, console_child = socket.socketpair()
        qmp, qmp_child = socket.socketpair()
        self._console = console
        self._qmp = QmpClient(qmp)
        self.cmd = [
            *self._base_cmd,
            "-chardev", f"socket,id=console,fd={console_child.fileno()}",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=qmp,fd={qmp_child.fileno()}",
            "-mon", "chardev=qmp,mode=control",
            *fw_cfg_args,
            *self._args,
        ]  # fmt: skip
        log.debug("Running %s", shlex.join(self.cmd))
        if shutil.which(self.cmd[0]) is None:
            for sock in (console, qmp, console_child, qmp_child):
                sock.close()
            raise MachineStartError(self.cmd, None, f"cannot run {self.cmd[0]}: not found")
        try:
            with open(self.stderr_log, "wb") as err:
                self._proc = subprocess.Popen(
                    [*process.dies_with_us(), *self.cmd],  # setpriv execs QEMU: the pid is QEMU's
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    pass_fds=(console_child.fileno(), qmp_child.fileno()),
                )
        except OSError as e:
            console.close()
            qmp.close()
            raise MachineStartError(self.cmd, None, f"cannot run {self.cmd[0]}: {e}") from e
        finally:
            console_child.close()
            qmp_child.close()
        self._reader = threading.Thread(
            target=self._read_console, name=f"{self.name}-console", daemon=True
        )
        self._reader.start()
        try:
            self._qmp.handshake(timeout=self.start_timeout)
        except QmpError as e:
            self.kill()
            raise MachineStartError(self.cmd, self.returncode, self.stderr_text()) from e
        log.debug("QEMU pid %d started (%s)", self._proc.pid, self.accel)

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit (e.g. the guest powered off); return its exit code."""
        proc = self._require_proc()
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MachineTimeout("QEMU did not exit", timeout, self.console_tail()) from None
        self._join_reader(timeout=5.0)
        return returncode

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Stop QEMU: QMP quit, then SIGTERM, then SIGKILL, each with a bounded wait."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None and self._qmp is not None:
            try:
                self._qmp.execute("quit", timeout=timeout)
            except QmpError:
                pass  # QEMU may close the connection before it answers
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("QEMU pid %d still running %g s after quit; stopping it", proc.pid, timeout)
            try:
                process.stop(proc, timeout, log=log, name="QEMU")
            except subprocess.TimeoutExpired:
                log.warning("QEMU pid %d survived SIGKILL for %g s", proc.pid, timeout)
        self._close_sockets()
        self._join_reader(timeout=5.0)
        return proc.poll()

    def kill(self) -> None:
        """SIGKILL QEMU and reap it."""
        proc = self._require_proc()
        proc.kill()
        proc.wait(10.0)
        self._close_sockets()
        self._join_reader(timeout=5.0)

    def _close_sockets(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        if self._console is not None:
            try:
                self._console.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)
        if self._console is not None and (self._reader is None or not self._reader.is_alive()):
            self._console.close()

    def _stop_on_exit(self) -> None:
        self.shutdown()

    # --- serial console --------------------------------------------------------------

    def _read_console(self) -> None:
        assert self._console is not None
        partial = b""
        with open(self.console_log, "wb") as out:
            while True:
                try:
                    chunk = self._console.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                *complete, partial = (partial + chunk).split(b"\n")
                if complete:
                    with self._cond:
                        for raw in complete:
                            self._lines.append(raw.decode(errors="replace").rstrip("\r"))
                        self._cond.notify_all()
        with self._cond:
            if partial:
                self._lines.append(partial.decode(errors="replace").rstrip("\r"))
            self._console_closed = True
            self._cond.notify_all()

    @property
    def console_lines(self) -> list[str]:
        """The complete console lines received so far."""
        with self._cond:
            return list(self._lines)

    def console_tail(self, n: int = 25) -> str:
        return "\n".join(self.console_lines[-n:])

    def console_write(self, text: str) -> None:
        """Type ``text`` on the guest's serial console."""
        if self._console is None:
            raise RuntimeError(f"{self!r} is not running")
        self._console.sendall(text.encode())

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float, *, since: int | None = None
    ) -> re.Match[str]:
        """Wait for a console line that ``pattern`` matches (``re.search``).

        Searches from line ``since``, by default from the line after the
        previous match, so successive calls follow the console like expect.
        Raises MachineExited if the console ends (QEMU exited) first,
        MachineTimeout after ``timeout`` seconds.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            i = self._cursor if since is None else since
            while True:
                while i < len(self._lines):
                    match = regex.search(self._lines[i])
                    i += 1
                    if match:
                        self._cursor = i
                        return match
                if self._console_closed:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(self._lines[-25:])
                    raise MachineTimeout(
                        f"no console line matched {regex.pattern!r}", timeout, tail
                    )
                self._cond.wait(remaining)
        proc = self._require_proc()
        try:
            returncode = proc.wait(5.0)
        except subprocess.TimeoutExpired:
            returncode = None
        raise MachineExited(regex.pattern, returncode, self.stderr_text(), self.console_tail())


# --- the accelerator -----------------------------------------------------------------


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why this one


def probe_kvm(timeout: float = 20.0) -> str | None:
    """Start QEMU with ``-accel kvm`` (paused, no devices) and ask QMP ``query-kvm``.

    Returns why KVM is unusable, or None if QEMU reports it enabled.
    """
    with tempfile.TemporaryDirectory(prefix="vdisk-kvm-probe-") as tmp:
        try:
            with Machine(tmp, accel="kvm", paused=True, memory_mb=64, start_timeout=timeout) as vm:
                state = vm.qmp.execute("query-kvm", timeout=timeout)
        except MachineError as e:
            return f"QEMU cannot start with -accel kvm: {e}"
    if not (state.get("present") and state.get("enabled")):
        return f"QEMU reports KVM {state}"
    return None


@functools.cache
def detect_accel() -> Accel:
    """KVM if it can really run guests, else TCG (decided once per process)."""
    forced = os.environ.get("VDISK_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return Accel(forced, "VDISK_ACCEL")
    reason = kvm_unusable_reason() or probe_kvm()
    if reason:
        log.info("Using TCG: %s", reason)
        return Accel("tcg", reason)
    return Accel("kvm", "hardware virtualization available and enabled by QEMU")
