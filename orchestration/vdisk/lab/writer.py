"""The guest's ``writer`` workload, followed on its console and checked in its records.

:class:`WriterConsole` waits for the writer's ``VDISK-WRITER:`` lines (start,
progress, done) and stops it; :class:`ConsoleEcho` shows a guest's ``VDISK-``
lines as they come, only every n-th of the writer's progress reports;
:func:`verify_prefix` checks that a copy of the disk holds records 1..k of a
run and none after (a disk taken at one instant).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time

from . import guest, records
from .demokit import BOOT_TIMEOUT, DemoFailure, field, say
from .machine import Machine

RECORD_TIMEOUT = 60.0  # for the writer to write the records we wait for

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
