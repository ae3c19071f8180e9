"""The life of a running disk: snapshot, live backup, online consolidation, pivot, replica.

    python -m vdisk.lab.lifedemo [--workdir DIR] [--guest-dir DIR] [--verbose]

1. Builds the test guest with vm-images/build (cached) and imports it into a
   fresh datastore as disk ``vm`` (``vdisk datastore init``, ``vdisk disk import``).
2. Serves the datastore with ``vdisk serve`` on a Unix socket and boots the
   guest from the export ``vm``, running the ``writer`` workload: numbered,
   checksummed 4 KiB records, each written with O_DIRECT and fsync. The
   guest's console lines that matter are shown as they come.
3. While the writer runs: ``vdisk backup`` (snapshot, copy of the frozen
   layers, consolidation back and pivot), then ``vdisk snapshot`` and, once
   the writer has filled the new delta for a while, ``vdisk consolidate
   --no-pivot``: one copy pass, then the job stays ready, mirroring every
   guest write into the target, until ``vdisk job complete`` pivots. The
   jobs' figures are shown.
4. Stops the writer from the console; the guest powers off. Checks: every
   record verifies, through the export and in the image after the server
   stopped; the backup holds exactly the records 1..k of the run, each
   intact (the disk at the snapshot); the disk is one image again, with no
   leftover delta; ``qemu-img check`` finds the backup and the disk clean.
5. Replicates the disk and a linked clone of it to a second datastore and
   boots the guest from there (:mod:`vdisk.lab.replicatedemo`): ``vdisk
   snapshot``, ``vdisk disk create vm-clone --backing FROZEN``, ``vdisk
   replicate`` of both (the clone's run copies its own top and links the
   frozen image to vm's copy), ``vdisk serve`` of the target and the
   ``selftest`` booted from its export ``vm-clone``; the writer's records
   verify in both disks there.

Exit code 0 on success; otherwise 1 with a one-line reason on stderr.

The pieces that drive the ``vdisk`` command line, ``vdisk serve``, the
writer's console and the record checks are also used by the boot tests
(tests/boot/test_lifecycle.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import attach, process, qemu_img
from ..errors import CommandError, Error
from ..progress import human_bytes
from . import guest, records
from .bootdemo import DemoFailure, demo_main, field
from .machine import Machine, detect_accel

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CLI = [sys.executable, "-m", "vdisk.cli"]
COMMAND_TIMEOUT = 120.0
BOOT_TIMEOUT = 180.0  # boot to the writer's START: ~7 s under TCG here
RECORD_TIMEOUT = 60.0  # for the writer to write the records we wait for
EXIT_TIMEOUT = 30.0
DISK = "vm"
REGION = 64 * MiB  # the writer's region: the start of the guest's data partition


# --- the vdisk command line ---------------------------------------------------------


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


# --- the writer on the guest's console ---------------------------------------------------

_WRITER_LINE = re.compile(r"^VDISK-WRITER: (?:PROGRESS seq=(\d+)|(DONE .*|FAIL.*))$")
_PROGRESS = re.compile(r"^VDISK-WRITER: PROGRESS seq=(\d+)$")


class WriterConsole:
    """Follows the ``writer`` workload on a Machine's console."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm

    def started(self, timeout: float = BOOT_TIMEOUT) -> records.WriterSummary:
        """Wait for ``START``; the run's layout as a summary of 0 records."""
        match = self.vm.wait_for_line(r"^VDISK-WRITER: (START .*|FAIL.*)$", timeout)
        if not match.group(1).startswith("START"):
            raise DemoFailure(f"the writer failed: {match.group(0)}")
        fields = guest.marker_fields(match.group(1))
        return records.WriterSummary.from_fields({**fields, "records": "0"})

    def seq(self) -> int:
        """The last sequence number the console reported (0 before the first report)."""
        for line in reversed(self.vm.console_lines):
            m = _PROGRESS.match(line)
            if m:
                return int(m.group(1))
        return 0

    def wait_seq(self, target: int, timeout: float = RECORD_TIMEOUT) -> int:
        """Wait until the console reports record ``target`` or later; return that number."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.vm.wait_for_line(_WRITER_LINE, max(0.0, deadline - time.monotonic()))
            if m.group(2):
                raise DemoFailure(f"the writer ended early: {m.group(0)}")
            if int(m.group(1)) >= target:
                return int(m.group(1))

    def wait_records(self, n: int, timeout: float = RECORD_TIMEOUT) -> int:
        """Wait for ``n`` more records than the console reported so far."""
        return self.wait_seq(self.seq() + n, timeout)

    def first_seq_since(self, index: int, timeout: float = RECORD_TIMEOUT) -> int:
        """The first sequence number reported on console line ``index`` or later."""
        m = self.vm.wait_for_line(_WRITER_LINE, timeout, since=index)
        if m.group(2):
            raise DemoFailure(f"the writer ended early: {m.group(0)}")
        return int(m.group(1))

    def stop(self, timeout: float = RECORD_TIMEOUT) -> records.WriterSummary:
        """Type ``stop`` on the console; the summary of the ``DONE`` line."""
        self.vm.console_write("stop\n")
        m = self.vm.wait_for_line(r"^VDISK-WRITER: (DONE .*|FAIL.*)$", timeout)
        if not m.group(1).startswith("DONE"):
            raise DemoFailure(f"the writer failed: {m.group(0)}")
        fields = field([m.group(0)], "VDISK-WRITER: DONE ")
        if fields.get("stopped_by") != "stop":
            raise DemoFailure(f"the writer stopped by {fields.get('stopped_by')}, not by us")
        return records.WriterSummary.from_fields(fields)


# --- reading the records -----------------------------------------------------------------


@contextmanager
def nbd_reader(uri: str) -> Iterator[records.Reader]:
    """read(offset, length) on an NBD export, with libnbd."""
    import nbd  # Debian's python3-libnbd, in the system site-packages

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield lambda offset, length: bytes(h.pread(length, offset))
    finally:
        h.shutdown()


@contextmanager
def image_reader(image: str | os.PathLike[str]) -> Iterator[records.Reader]:
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


_RUN_SEQ = re.compile(rb"^VDISKREC 1 run=([0-9a-f]+) seq=(\d+) ")


def highest_seq(read: records.Reader, layout: records.WriterSummary) -> int:
    """The highest sequence number of the run found in the region (0 if none)."""
    top = 0
    for _slot, data in records.iter_slots(read, layout):
        m = _RUN_SEQ.match(data)
        if m and m.group(1).decode() == layout.run:
            top = max(top, int(m.group(2)))
    return top


def verify_prefix(
    read: records.Reader, layout: records.WriterSummary
) -> tuple[records.WriterSummary, records.Report]:
    """Check that the region holds exactly records 1..k of the run, k the highest found.

    The writer writes its records one at a time, each flushed before the next,
    so a copy of the disk taken at any instant (a snapshot) must hold a prefix
    of the run: every record up to some k intact, none after it. Raises
    RecordsInvalid otherwise.
    """
    summary = dataclasses.replace(layout, records=highest_seq(read, layout))
    return summary, records.verify(read, summary)


# --- the demo ----------------------------------------------------------------------------

_out = threading.Lock()


def say(text: str = "") -> None:
    with _out:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def cli(*args: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`vdisk`, the command shown first."""
    say("$ vdisk " + shlex.join(os.fspath(a) for a in args))
    return vdisk(*args)


class ConsoleEcho:
    """Prints the guest's ``VDISK-`` console lines as they come, from a thread.

    Of the writer's progress reports only every ``every``-th record is shown.
    """

    def __init__(self, vm: Machine, t0: float, every: int = 100) -> None:
        self.vm, self.t0, self.every = vm, t0, every
        self._shown = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-echo", daemon=True)

    def __enter__(self) -> ConsoleEcho:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._echo()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._echo()

    def _echo(self) -> None:
        lines = self.vm.console_lines
        for line in lines[self._shown :]:
            if not line.startswith("VDISK-"):
                continue
            m = _PROGRESS.match(line)
            if m and int(m.group(1)) % self.every:
                continue
            say(f"  [{time.monotonic() - self.t0:6.2f}s] {line}")
        self._shown = len(lines)


def job_lines(job: dict[str, Any]) -> list[str]:
    copy_set = int(job.get("copy_set_bytes") or 0)
    mirrored = int(job.get("bytes_mirrored") or 0)
    writes = mirrored // records.RECORD_SIZE
    return [
        f"job {job['id']}: {job['state']}, {job['top_before']} -> {job['top_after']}",
        f"  copy set        {human_bytes(copy_set)}",
        f"  bytes copied    {human_bytes(int(job.get('bytes_copied') or 0))} "
        f"in {job.get('passes')} pass(es)",
        f"  bytes mirrored  {human_bytes(mirrored)} "
        f"({writes} guest write{'' if writes == 1 else 's'} of 4 KiB during the job)",
        f"  time to ready   {float(job.get('time_to_ready_s') or 0):.3f} s",
        f"  duration        {float(job.get('duration_s') or 0):.3f} s",
        f"  pivot pause     {float(job.get('pivot_pause_ms') or 0):.1f} ms",
    ]


def check_job(job: dict[str, Any]) -> None:
    if job.get("state") != "done":
        raise DemoFailure(f"job {job.get('id')} is {job.get('state')}: {job.get('error')}")
    if job.get("passes") != 1:
        raise DemoFailure(f"job {job['id']} took {job.get('passes')} passes, not one")
    if int(job["bytes_copied"]) > int(job["copy_set_bytes"]):
        raise DemoFailure(f"job {job['id']} copied {job['bytes_copied']} bytes of a "
                          f"{job['copy_set_bytes']}-byte copy set")  # fmt: skip


def run(workdir: Path, guest_dir: Path | None) -> list[tuple[str, str]]:
    summary: list[tuple[str, str]] = []
    t = time.monotonic()
    image = guest.build(guest_dir)
    summary.append(("guest image", f"{image.path} ({time.monotonic() - t:.1f} s to build/check)"))
    accel = detect_accel()
    summary.append(("accelerator", f"{accel.name} ({accel.reason})"))

    ds = workdir / "ds"
    say("\n--- a datastore with the guest's disk in it")
    cli("datastore", "init", ds)
    imported = cli("disk", "import", DISK, image.path, "-d", ds)
    chain_before = imported["chain"]
    say(f"  disk {DISK}: {human_bytes(imported['size'])}, chain {chain_before}")

    rundir = ds / "run"
    say(f"$ vdisk serve -d {ds} --unix-dir {rundir}")
    with VdiskServer(ds, rundir, log_path=workdir / "serve.log") as server:
        say(f"  serving {', '.join(server.exports)}: one worker per disk ({DISK}: pid "
            f"{server.worker_pid(DISK)}), control {server.control}")  # fmt: skip
        uri = server.uri(DISK)
        config = guest.config_text(
            "writer", seconds=0, progress=25, offset=image.data_offset, length=REGION
        )
        say(f"\n--- boot the guest from {uri}, running the writer")
        t0 = time.monotonic()
        with (
            Machine(workdir, args=attach.qemu_drive_args(uri),
                    fw_cfg={guest.FW_CFG_NAME: config}, name="writer") as vm,
            ConsoleEcho(vm, t0),
        ):  # fmt: skip
            writer = WriterConsole(vm)
            layout = writer.started()
            writer.wait_records(50)

            say("\n--- live backup, the writer running")
            backup_path = workdir / "backup.qcow2"
            seq_at_backup = writer.seq()
            backup = cli("backup", DISK, "--to", backup_path, "-d", ds)
            snap, job = backup["snapshot"], backup["consolidate"]
            say(f"  snapshot: froze {snap['frozen']}, new top {snap['top']}")
            say(f"  backup: {backup_path} ({human_bytes(backup['bytes'])}), "
                f"{backup['duration_s']:.2f} s in all; consolidated back:")  # fmt: skip
            for line in job_lines(job):
                say("    " + line)
            check_job(job)
            writer.wait_records(25)

            say("\n--- snapshot; the writer fills the new delta")
            snap = cli("snapshot", DISK, "-d", ds)
            say(f"  new top {snap['top']} on {snap['frozen']}")
            seq = writer.seq()
            writer.wait_records(150)
            say(f"  the writer's records after {seq} (its last report before the snapshot) "
                f"up to {writer.seq()} and on went to the new delta")

            say("\n--- online consolidation, the writer running: copy, then mirror until the pivot")
            ready = cli("consolidate", DISK, "--no-pivot", "-d", ds)
            if ready["state"] != "ready":
                raise DemoFailure(f"job {ready['id']} is {ready['state']}, not ready")
            say(f"  job {ready['id']}: ready after one pass: copied "
                f"{human_bytes(ready['bytes_copied'])} of a {human_bytes(ready['copy_set_bytes'])} "
                f"copy set in {ready['time_to_ready_s']:.3f} s; {ready['target']} now follows "
                "every guest write")  # fmt: skip
            writer.wait_records(50)
            job = cli("job", "complete", str(ready["id"]), "-d", ds)
            for line in job_lines(job):
                say("  " + line)
            check_job(job)
            figures = job
            if job["top_after"] != snap["frozen"]:
                raise DemoFailure(f"the disk's top is {job['top_after']}, not {snap['frozen']}")
            if not job["bytes_mirrored"]:
                raise DemoFailure(f"job {job['id']} mirrored nothing while the guest wrote")
            writer.wait_records(25)

            say("\n--- stop the writer")
            say('  (typing "stop" on the guest\'s console)')
            done = writer.stop()
            rc = vm.wait(EXIT_TIMEOUT)
            if rc != 0:
                raise DemoFailure(f"QEMU exited with code {rc}")
        summary.append(("writer", f"{done.records} records in "
                                  f"{time.monotonic() - t0:.1f} s of guest life"))  # fmt: skip

        say("\n--- checks")
        with nbd_reader(uri) as read:
            report = records.verify(read, done)
        say(f"  every record verifies through the export: {report.records_found} records "
            f"in {report.slots_checked} slots")  # fmt: skip
        chain = disk_chain(server.control, DISK)
        rc = server.stop()
        if rc != 0:
            raise DemoFailure(f"vdisk serve exited with code {rc}")
    say("  vdisk serve stopped (exit code 0)")

    info = cli("disk", "info", DISK, "-d", ds)
    top = ds / info["top"]
    if len(info["chain"]) != len(chain_before) or info["chain"] != chain:
        raise DemoFailure(f"the disk's chain is {info['chain']}, not one image")
    leftovers = leftover_images(ds, info["chain"])
    if leftovers:
        raise DemoFailure(f"leftover images in {ds / 'images'}: {', '.join(leftovers)}")
    qemu_img.check_clean(top, allow_leaks=False)
    say(f"  the disk is one image again: {info['top']}; no other file in images/; "
        "qemu-img check clean")  # fmt: skip
    summary.append(("disk", f"one image again ({info['top']}), no leftover delta, clean"))

    report = records.verify_image(top, done)
    say(f"  and in the image, read by qemu-img: {report.records_found} records verify")
    summary.append(("records", f"all {report.records_found} verify (export and image)"))

    qemu_img.check_clean(backup_path, allow_leaks=False)
    with image_reader(backup_path) as read:
        at_snapshot, report = verify_prefix(read, layout)
    if at_snapshot.records == 0:
        raise DemoFailure("the backup holds no record of the run")
    say(f"  the backup holds records 1..{at_snapshot.records} of run {layout.run}, every one "
        f"intact, and none later: the disk at the snapshot (the writer had reported record "
        f"{seq_at_backup} when vdisk backup started); qemu-img check clean")  # fmt: skip
    summary.append(("backup", f"records 1..{at_snapshot.records}, intact, standalone, clean"))
    summary.append((
        "consolidation",
        f"{human_bytes(figures['copy_set_bytes'])} copy set, "
        f"{human_bytes(figures['bytes_copied'])} copied in {figures['passes']} pass, "
        f"{human_bytes(figures['bytes_mirrored'])} mirrored, "
        f"{figures['duration_s']:.2f} s, pivot pause {figures['pivot_pause_ms']:.1f} ms",
    ))  # fmt: skip

    from .replicatedemo import run_replication  # it builds on this module's pieces

    summary += run_replication(ds, workdir, image, done)
    return summary


def main(argv: list[str] | None = None) -> int:
    return demo_main("lifedemo", __doc__ or "", run, argv,
                     workdir_help="keep the datastore, backup and logs here (default: "
                                  "temporary)", logs="*.log")


if __name__ == "__main__":
    sys.exit(main())
