"""A guest for the job tests: writer and reader threads, and the model they keep.

Each writer thread owns one region of the disk and is the only one to change
it, so the model stays exact however the threads interleave: a request's
effect enters the model when its completion is seen, and nobody else writes
there meanwhile. Every request is journalled with the ticks of one clock at
which it was sent and acknowledged, so :meth:`Journal.view_at` tells what the
disk held at a point in time (a snapshot) and :meth:`Journal.durable` what a
crash must keep (requests acknowledged before the last acknowledged flush was
sent)::

    writer 0   region [0, a)       write, zero, trim, flush, read back
    writer 1   region [a, b)       ...
    readers    region [b, size)    never written: every read is checked

Trims have two valid outcomes per cluster (unchanged or zero, depending on the
top's cluster size and version, which a pivot changes): the writer reads the
range back, checks that every sector is the old data or zeros, and records
what it read. The same thread API drives the engine (``Disk``) and NBD
(a libnbd handle per thread) through :class:`Port`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from diskmodel import gaps, merge

KiB = 1024
SECTOR = 512
JOIN_DEADLINE = 30.0
FOREVER = 1 << 62


class Port(Protocol):
    """One thread's way to the disk."""

    def write(self, data: bytes, offset: int) -> None: ...

    def zero(self, length: int, offset: int, may_trim: bool) -> None: ...

    def trim(self, length: int, offset: int) -> None: ...

    def flush(self) -> None: ...

    def read(self, length: int, offset: int) -> bytes: ...


def guest_data(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


@dataclass
class Record:
    kind: str                   # write, zero, trim, flush
    offset: int
    length: int
    sent: int
    seed: int = 0
    may_trim: bool = False      # zero: without NBD's NO_HOLE flag
    result: bytes | None = None  # trim: what the range read afterwards
    acked: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    def apply(self, model: bytearray) -> None:
        if self.kind == "write":
            model[self.offset:self.end] = guest_data(self.seed, self.length)
        elif self.kind == "zero":
            model[self.offset:self.end] = bytes(self.length)
        elif self.kind == "trim":
            assert self.result is not None
            model[self.offset:self.end] = self.result


class Journal:
    """The model (what the guest must read now) and the requests that made it."""

    def __init__(self, initial: bytes) -> None:
        self.initial = bytes(initial)
        self.model = bytearray(initial)
        self.records: list[Record] = []
        self._clock = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.initial)

    def mark(self) -> int:
        with self._lock:
            self._clock += 1
            return self._clock

    def send(self, kind: str, offset: int = 0, length: int = 0, seed: int = 0) -> Record:
        with self._lock:
            self._clock += 1
            rec = Record(kind, offset, length, self._clock, seed)
            self.records.append(rec)
            return rec

    def ack(self, rec: Record) -> None:
        with self._lock:
            self._clock += 1
            rec.acked = self._clock
            rec.apply(self.model)

    def snapshot(self) -> bytes:
        with self._lock:
            return bytes(self.model)

    def view_at(self, acked_before: int, sent_before: int = FOREVER
                ) -> tuple[bytes, list[tuple[int, int]]]:
        """The content at a point, and the ranges it does not promise: requests
        acknowledged before ``acked_before`` are in, those sent from
        ``sent_before`` on are out, any other one makes its range unknown."""
        with self._lock:
            model = bytearray(self.initial)
            unknown: list[tuple[int, int]] = []
            done = sorted((r for r in self.records if r.kind != "flush"),
                          key=lambda r: r.acked if r.acked is not None else FOREVER)
            for r in done:
                if r.acked is not None and r.acked < acked_before:
                    r.apply(model)
                elif r.sent < sent_before:
                    unknown.append((r.offset, r.end))
        return bytes(model), merge(unknown)

    def durable(self) -> tuple[bytes, list[tuple[int, int]]]:
        """What a crash now must keep (a flush covers what was acknowledged before it
        was sent), and the ranges of requests it does not cover."""
        with self._lock:
            cut = max((r.sent for r in self.records if r.kind == "flush" and r.acked),
                      default=0)
        return self.view_at(cut)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for r in self.records:
                if r.acked is not None:
                    out[r.kind] = out.get(r.kind, 0) + 1
            return out


def first_difference(got: bytes, want: bytes, base: int = 0) -> str | None:
    """None if equal, else where they first differ (and how much differs from there)."""
    if got == want:
        return None
    if len(got) != len(want):
        return f"lengths differ: {len(got)} != {len(want)}"
    step = 4096
    for i in range(0, len(got), step):
        if got[i:i + step] != want[i:i + step]:
            j = next(k for k in range(i, min(i + step, len(got))) if got[k] != want[k])
            end = j
            while end < len(got) and got[end] != want[end] and end - j < 1 << 20:
                end += 1
            return (f"first difference at byte {base + j} ({got[j]:#04x} != {want[j]:#04x}, "
                    f"~{end - j} bytes from there)")
    return "differ"


def check_outside(got: bytes, want: bytes, unknown: list[tuple[int, int]], where: str) -> None:
    for lo, hi in gaps(unknown, len(want)):
        diff = first_difference(got[lo:hi], want[lo:hi], lo)
        assert diff is None, f"{where}: {diff}"


class Guest:
    """Writer threads (one region each) and, optionally, reader threads (the rest)."""

    def __init__(self, journal: Journal, ports: Callable[[], Port], *, writers: int,
                 readers: int = 0, seed: int, max_len: int = 96 * KiB,
                 flush_weight: float = 0.05, trim_weight: float = 0.1,
                 read_len: int = 4 * KiB, label: str = "") -> None:
        size = journal.size
        self.journal = journal
        self.seed = seed
        self.max_len = max_len
        self.weights = (1.0, 0.3, trim_weight, flush_weight)
        self.read_len = read_len
        parts = writers + (1 if readers else 0)
        cut = [size * i // parts // SECTOR * SECTOR for i in range(parts)] + [size]
        self.regions = [(cut[i], cut[i + 1]) for i in range(writers)]
        self.stable = (cut[writers], size) if readers else None
        self.errors: list[str] = []
        self.reads = 0
        self.label = label          # names the case in failure messages
        self.phase = "start"        # what the case does meanwhile (set by the case)
        self._ports = ports
        self._want_pause = False
        self._parked = 0
        self._stop = False
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._nwriters = writers
        self._nreaders = readers

    # -- life ----------------------------------------------------------------------

    def start(self) -> Guest:
        for i in range(self._nwriters):
            self._spawn(self._write_loop, i, f"guest-writer-{i}")
        for i in range(self._nreaders):
            self._spawn(self._read_loop, i, f"guest-reader-{i}")
        return self

    def _spawn(self, fn: Callable[[int, Port], None], i: int, name: str) -> None:
        port = self._ports()
        t = threading.Thread(target=self._guard, args=(fn, i, port), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, fn: Callable[[int, Port], None], i: int, port: Port) -> None:
        try:
            fn(i, port)
        except Exception as e:  # noqa: BLE001 - reported by check_errors()
            with self._cond:
                self.errors.append(f"{threading.current_thread().name} during "
                                   f"{self.phase}: {type(e).__name__}: {e}")
                self._stop = True
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._want_pause = False
            self._cond.notify_all()
        for t in self._threads:
            t.join(JOIN_DEADLINE)
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"guest threads did not stop in {JOIN_DEADLINE} s: {stuck}"
        self.check_errors()

    def check_errors(self) -> None:
        assert not self.errors, f"{self.label}: guest requests failed: {self.errors[:3]}"

    def _checkpoint(self) -> bool:
        """Park while paused; False once stopped."""
        with self._cond:
            if self._want_pause and not self._stop:
                self._parked += 1
                self._cond.notify_all()
                while self._want_pause and not self._stop:
                    self._cond.wait(1.0)
                self._parked -= 1
            return not self._stop

    def pause(self, deadline: float = 30.0) -> None:
        """Wait (bounded) until every thread is parked between two requests."""
        end = time.monotonic() + deadline
        with self._cond:
            self._want_pause = True
            alive = sum(t.is_alive() for t in self._threads)
            while self._parked < alive and not self._stop:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest threads not idle after {deadline} s: a "
                                       "request hangs")
                self._cond.wait(min(left, 0.5))
                alive = sum(t.is_alive() for t in self._threads)
        self.check_errors()

    def resume(self) -> None:
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()

    def run_ops(self, n: int, deadline: float = 30.0) -> None:
        """Wait until n more writer requests were acknowledged."""
        want = len(self.journal.records) + n
        end = time.monotonic() + deadline
        while len(self.journal.records) < want:
            self.check_errors()
            if time.monotonic() > end:
                raise TimeoutError(f"the guest made {n} requests in less than {deadline} s")
            time.sleep(0.002)
        self.check_errors()

    # -- writers -----------------------------------------------------------------------

    def _write_loop(self, i: int, port: Port) -> None:
        rng = random.Random(self.seed * 1000 + i)
        lo, hi = self.regions[i]
        while self._checkpoint():
            kind = rng.choices(("write", "zero", "trim", "flush"), self.weights)[0]
            if kind == "flush":
                rec = self.journal.send("flush")
                port.flush()
                self.journal.ack(rec)
                continue
            offset = rng.randrange(lo, hi)
            if rng.random() < 0.3:
                offset -= offset % SECTOR
            length = min(rng.choice((rng.randint(1, 4 * KiB), rng.randint(1, self.max_len))),
                         hi - offset)
            rec = self.journal.send(kind, offset, length, rng.randrange(1 << 32))
            if kind == "write":
                port.write(guest_data(rec.seed, length), offset)
            elif kind == "zero":
                rec.may_trim = rng.random() < 0.5
                port.zero(length, offset, rec.may_trim)
            else:
                before = bytes(self.journal.model[offset:offset + length])
                port.trim(length, offset)
                rec.result = port.read(length, offset)
                _check_trim(before, rec.result, offset)
            self.journal.ack(rec)
            if rng.random() < 0.3:           # read back, a little around it
                a, b = max(lo, offset - 700), min(hi, offset + length + 700)
                got = port.read(b - a, a)
                diff = first_difference(got, bytes(self.journal.model[a:b]), a)
                assert diff is None, f"read back after {kind} [{offset}, +{length}): {diff}"

    # -- readers -----------------------------------------------------------------------

    def _read_loop(self, i: int, port: Port) -> None:
        assert self.stable is not None
        rng = random.Random(self.seed * 1000 + 500 + i)
        lo, hi = self.stable
        want = self.journal.initial
        while self._checkpoint():
            offset = rng.randrange(lo, hi)
            length = min(rng.randint(1, self.read_len), hi - offset)
            got = port.read(length, offset)
            diff = first_difference(got, want[offset:offset + length], offset)
            assert diff is None, f"read [{offset}, +{length}) of a region nobody writes: {diff}"
            self.reads += 1


def _check_trim(before: bytes, after: bytes, offset: int) -> None:
    """Every sector of a trimmed range reads as before or as zeros."""
    zeros = bytes(SECTOR)
    first = -offset % SECTOR
    for a in range(first, len(after) - SECTOR + 1, SECTOR):
        got = after[a:a + SECTOR]
        assert got in (before[a:a + SECTOR], zeros), \
            f"trim [{offset}, +{len(after)}): sector at {offset + a} is neither old data nor zeros"
    head, tail = after[:first], after[first + (len(after) - first) // SECTOR * SECTOR:]
    for part, old in ((head, before[:first]), (tail, before[len(before) - len(tail):])):
        assert part == old, f"trim [{offset}, +{len(after)}) changed a partial sector"
