"""A disk's worker killed under a client attached with QEMU's ``reconnect-delay``.

``vdisk serve`` restarts a worker that dies, on the same endpoint, which it
keeps bound meanwhile (docs/serve.md). QEMU's NBD client with
``reconnect-delay=N`` (docs/attach.md) reconnects and sends the requests it
held meanwhile again:

- qemu-io (QEMU's block layer and NBD client, driven command by command): a
  write issued while the worker is down completes once the new worker
  serves; without ``reconnect-delay`` it fails at once. And an acknowledged
  write that allocated a cluster, killed before its flush, reads back after
  the flush QEMU sends to the new worker (a new cluster's L2 entry is in the
  file before the write is acknowledged: docs/block-driver.md).
- a booted guest (marker ``boot``): the test guest imported into a
  datastore and served by ``vdisk serve``, QEMU booted with ``-blockdev
  driver=nbd,...,reconnect-delay=10``, running the ``writer`` workload
  (checksummed records, each written with O_DIRECT and fsync). Mid-run, at a
  random instant of its write and flush cycle, the disk's worker gets
  SIGKILL; the supervisor restarts it; the writer goes on and finishes.
  Then: no I/O error on the guest's console or in QMP, every record verifies
  through the export and in the image after the server stopped, and
  ``qemu-img check`` finds no corruption. The writer's region starts
  unallocated in the top image, so the kill can land on writes that
  allocate clusters as well as on ones that overwrite.
"""

from __future__ import annotations

import logging
import os
import random
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from guestharness import BOOT_TIMEOUT, EXIT_TIMEOUT

from vdisk import attach, process, qemu_img
from vdisk.lab import guest, records
from vdisk.lab.machine import Machine
from vdisk.lab.vdiskrun import VdiskServer, nbd_reader, vdisk
from vdisk.lab.writer import WriterConsole

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DISK = "vm"
DELAY = attach.EXAMPLE_RECONNECT_DELAY  # seconds QEMU holds requests while reconnecting
RESTART_TIMEOUT = 30.0  # a worker restarts in 0.3-1.5 s here
PROGRESS = 10  # the writer reports every PROGRESS records
REGION = 16 * MiB  # the writer's region
IO_ERROR = re.compile(r"I/O error|blk_update_request")  # the guest kernel's complaints


# --- the worker ------------------------------------------------------------------------


def worker(datastore: Path, disk: str) -> dict[str, Any]:
    """The disk's worker, as ``vdisk serve status`` shows it."""
    status = vdisk("serve", "status", "-d", datastore)
    return dict(next(w for w in status["workers"] if w["disk"] == disk))


def kill_worker(datastore: Path, disk: str, timeout: float = 15.0) -> dict[str, Any]:
    """SIGKILL the disk's worker; return once its supervisor has reaped it."""
    before = worker(datastore, disk)
    assert before["state"] == "running", before
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(before["pid"], 0)
        except ProcessLookupError:
            return before
        assert time.monotonic() < deadline, f"worker pid {before['pid']} survived SIGKILL"
        time.sleep(0.01)


def wait_restarted(datastore: Path, disk: str, killed: dict[str, Any]) -> dict[str, Any]:
    """Wait until a new worker serves the disk; check it serves the same endpoint."""
    deadline = time.monotonic() + RESTART_TIMEOUT
    while (w := worker(datastore, disk))["state"] != "running" or w["pid"] == killed["pid"]:
        assert time.monotonic() < deadline, f"not restarted within {RESTART_TIMEOUT:g} s: {w}"
        time.sleep(0.05)
    assert (w["uri"], w["socket"]) == (killed["uri"], killed["socket"])
    assert w["restarts"] == killed["restarts"] + 1
    return w


@pytest.fixture
def datastore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wr")  # short: the Unix sockets live in here
    vdisk("datastore", "init", path)
    return path


# --- qemu-io against a served disk -----------------------------------------------------------


class QemuIo:
    """``qemu-io -t writeback --image-opts OPTS``, driven command by command on its
    stdin: :meth:`run` returns a command's output once qemu-io prompts again.
    Writes are acknowledged without a flush; ``flush`` is a command."""

    PROMPT = b"qemu-io> "

    def __init__(self, image_opts: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.cmd = ["qemu-io", "-t", "writeback", "--image-opts", image_opts]
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> QemuIo:
        self._proc = subprocess.Popen(
            [*process.dies_with_us(), *self.cmd],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._output()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(b"quit\n")
            self._proc.stdin.close()
            self._proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            process.stop(self._proc, 10, log=log, name="qemu-io")

    def _output(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        out = b""
        deadline = time.monotonic() + self.timeout
        while not out.endswith(self.PROMPT):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"qemu-io: no prompt within {self.timeout:g} s: {out!r}"
            ready, _, _ = select.select([self._proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(self._proc.stdout.fileno(), 65536)
                assert chunk, f"qemu-io exited ({self._proc.wait(5)}): {out!r}"
                out += chunk
        return out[: -len(self.PROMPT)].decode(errors="replace")

    def run(self, command: str) -> str:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(command.encode() + b"\n")
        self._proc.stdin.flush()
        return self._output()

    def ok(self, command: str) -> str:
        """Run a command that must succeed (a failed I/O or pattern check fails the test)."""
        out = self.run(command)
        assert not re.search(r"failed|error", out, re.I), f"{command}: {out}"
        return out


def served_disk(datastore: Path, tmp_path: Path) -> VdiskServer:
    """An empty 16 MiB disk, served (start it with ``with``)."""
    vdisk("disk", "create", DISK, "--size", "16M", "-d", datastore)
    return VdiskServer(datastore, datastore / "run", log_path=tmp_path / "serve.log")


def node(server: VdiskServer, reconnect_delay: int | None) -> str:
    socket = attach.disk_socket(server.rundir, DISK)
    return attach.nbd_node(socket=socket, export=DISK, reconnect_delay=reconnect_delay)


@pytest.mark.crash
def test_a_write_during_a_worker_restart_waits_for_the_new_worker(
    datastore: Path, tmp_path: Path
) -> None:
    with served_disk(datastore, tmp_path) as server:
        with QemuIo(node(server, DELAY)) as io:
            io.ok("write -P 0x11 0 64k")
            io.ok("flush")
            killed = kill_worker(datastore, DISK)
            io.ok("write -P 0x22 1M 64k")  # held until the new worker serves, then sent again
            wait_restarted(datastore, DISK, killed)
            io.ok("flush")
            io.ok("read -P 0x11 0 64k")
            io.ok("read -P 0x22 1M 64k")
            io.ok("read -P 0 64k 960k")
        assert server.stop() == 0  # after qemu-io: it would wait reconnect-delay to quit
    qemu_img.check_clean(datastore / vdisk("disk", "info", DISK, "-d", datastore)["top"])


@pytest.mark.crash
def test_without_reconnect_delay_a_write_during_a_worker_restart_fails(
    datastore: Path, tmp_path: Path
) -> None:
    """What ``reconnect-delay`` changes: without it, QEMU fails the request at once."""
    with served_disk(datastore, tmp_path) as server:
        with QemuIo(node(server, None)) as io:
            io.ok("write -P 0x11 0 64k")
            killed = kill_worker(datastore, DISK)
            assert io.run("write -P 0x22 1M 64k").strip() == "write failed: Input/output error"
            wait_restarted(datastore, DISK, killed)
        assert server.stop() == 0


@pytest.mark.crash
def test_an_acknowledged_write_survives_a_worker_restart(
    datastore: Path, tmp_path: Path
) -> None:  # fmt: skip
    with served_disk(datastore, tmp_path) as server, QemuIo(node(server, DELAY)) as io:
        io.ok("write -P 0x33 2M 64k")  # acknowledged; allocates a cluster; not flushed
        killed = kill_worker(datastore, DISK)
        io.ok("flush")  # held until the new worker serves; it succeeds
        wait_restarted(datastore, DISK, killed)
        io.ok("read -P 0x33 2M 64k")


# --- a booted guest --------------------------------------------------------------------------


@pytest.mark.boot
def test_guest_rides_through_a_worker_restart(
    guest_image: guest.GuestImage, datastore: Path, tmp_path: Path
) -> None:
    vdisk("disk", "import", DISK, guest_image.path, "-d", datastore)
    config = guest.config_text(
        "writer", seconds=0, progress=PROGRESS, offset=guest_image.data_offset, length=REGION
    )
    with VdiskServer(datastore, datastore / "run", log_path=tmp_path / "serve.log") as server:
        args = attach.qemu_blockdev_args(
            socket=attach.disk_socket(server.rundir, DISK), export=DISK, reconnect_delay=DELAY
        )
        with Machine(tmp_path, args=args, fw_cfg={guest.FW_CFG_NAME: config}) as vm:
            writer = WriterConsole(vm)
            layout = writer.started(BOOT_TIMEOUT)
            writer.wait_records(3 * PROGRESS)
            time.sleep(random.uniform(0.0, 0.05))  # anywhere in a record's write and fsync
            seq_at_kill = writer.seq()
            killed = kill_worker(datastore, DISK)
            wait_restarted(datastore, DISK, killed)
            writer.wait_records(3 * PROGRESS)  # the guest goes on
            vm.qmp.execute("query-status")  # reads the events QEMU sent so far
            io_errors = [e for e in vm.qmp.events if e["event"] == "BLOCK_IO_ERROR"]
            done = writer.stop()
            assert vm.wait(EXIT_TIMEOUT) == 0
        assert io_errors == []
        assert [line for line in vm.console_lines if IO_ERROR.search(line)] == []
        assert (done.run, done.offset, done.length) == (layout.run, layout.offset, layout.length)
        assert done.records >= seq_at_kill + 3 * PROGRESS

        with nbd_reader(server.uri(DISK)) as read:
            report = records.verify(read, done)
        assert report.records_found == done.records
        assert server.stop() == 0

    top = datastore / vdisk("disk", "info", DISK, "-d", datastore)["top"]
    qemu_img.check_clean(top)  # no corruption; the killed worker may have leaked clusters
    assert records.verify_image(top, done).records_found == done.records
