"""The guest of the consolidation benchmark: verifiable 64 KiB blocks over NBD.

Every block written carries a header (block number, generation) and a filler
byte derived from the generation, so after a job each block shows which write
landed last. The delta's own contents are generation 0 (:func:`fill`); the
load's writes count up from 1, and the writer never has two writes to one
block in flight, so the last completed write of a block is its content
(:func:`verify`): a stale copy landing on newer data, a lost mirrored write
or a torn cluster all show up as a mismatch.

As a script it is the write load, run in its own process so that the
benchmark's clock and monitors never compete with it for the GIL:

    python bench/guest_writer.py --uri URI --range BYTES --out LOG.json
                                 [--qd 8] [--rate MIBPS] [--seed N] [--max-seconds S]

(:class:`WriterProcess` owns that process.) It writes random 64 KiB blocks in
[0, range) at queue depth ``qd`` (as fast as the server takes them, or paced at
``rate`` MiB/s), prints ``running`` once connected, and on SIGTERM (or after
``max-seconds``) drains, flushes and writes LOG.json: every write's submit and
completion time (``time.time()``), the last generation of every block it wrote,
and the writes that failed (a guest would see an I/O error; the load goes on).
"""

from __future__ import annotations

import argparse
import json
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import nbd

BLOCK = 64 << 10
_HEADER = struct.Struct("<QQ")
_FILLERS = [bytes([1 + k]) * (BLOCK - _HEADER.size) for k in range(255)]


def block_bytes(block: int, gen: int) -> bytearray:
    """The contents of ``block`` as written by generation ``gen``."""
    buf = bytearray(BLOCK)
    put_block(buf, 0, block, gen)
    return buf


def put_block(buf: bytearray, at: int, block: int, gen: int) -> None:
    """Write ``block``'s generation ``gen`` contents into ``buf`` at ``at``."""
    _HEADER.pack_into(buf, at, block, gen)
    buf[at + _HEADER.size:at + BLOCK] = _FILLERS[gen % 255]


class BufferPool:
    """``count`` reusable bytearrays for libnbd's aio calls.

    Not ``nbd.Buffer``: the Python bindings of libnbd 1.14 never free an
    ``nbd.Buffer`` passed to ``aio_pwrite``/``aio_pread`` (a 1 GiB fill leaked
    1 GiB), while a plain bytearray passed to them is released. A buffer is
    taken for one command and given back when it completes, never changed
    while in flight.
    """

    def __init__(self, count: int, size: int) -> None:
        self.bufs = [bytearray(size) for _ in range(count)]
        self.free = list(range(count))


def _drain(h: nbd.NBD, inflight: dict[int, object], on_done: Callable[[object, str | None],
           None], timeout_ms: int = -1, raise_errors: bool = False) -> None:
    """Poll once (up to ``timeout_ms``), then retire every completed command:
    ``on_done(item, error)`` with ``error`` None or libnbd's message (with
    ``raise_errors`` a failed command raises nbd.Error instead)."""
    h.poll(timeout_ms)
    while inflight:
        cookie = h.aio_peek_command_completed()
        if cookie <= 0:
            return
        error = None
        item = inflight.pop(cookie)
        try:
            h.aio_command_completed(cookie)
        except nbd.Error as e:
            if raise_errors:
                raise
            error = str(e)
        on_done(item, error)


def fill(uri: str, length: int, qd: int = 8, request: int = 1 << 20) -> float:
    """Write generation 0 of every block in [0, length) (sequential 1 MiB writes,
    ``qd`` in flight), then flush; return seconds."""
    per = request // BLOCK
    nblocks = length // BLOCK
    pool = BufferPool(qd, request)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        t0 = time.perf_counter()
        inflight: dict[int, object] = {}

        def done(slot: object, _error: str | None) -> None:
            pool.free.append(slot)  # type: ignore[arg-type]

        for first in range(0, nblocks, per):
            while not pool.free:
                _drain(h, inflight, done, raise_errors=True)
            slot = pool.free.pop()
            count = min(per, nblocks - first)
            buf = pool.bufs[slot]
            for k in range(count):
                put_block(buf, k * BLOCK, first + k, 0)
            data = buf if count == per else memoryview(buf)[:count * BLOCK]
            inflight[h.aio_pwrite(data, first * BLOCK)] = slot
        while inflight:
            _drain(h, inflight, done, raise_errors=True)
        h.flush()
        return time.perf_counter() - t0
    finally:
        h.shutdown()


def verify(uri: str, length: int, final: dict[int, int], qd: int = 16,
           limit: int = 5) -> list[str]:
    """Read every block in [0, length); return up to ``limit`` mismatches (empty: all
    blocks hold their last generation, 0 for blocks the load never wrote)."""
    pool = BufferPool(qd, BLOCK)
    bad: list[str] = []

    def check(item: object, error: str | None) -> None:
        block, slot = item  # type: ignore[misc]
        buf = pool.bufs[slot]
        pool.free.append(slot)
        want_gen = final.get(block, 0)
        if error is not None:
            if len(bad) < limit:
                bad.append(f"block {block}: read failed: {error}")
        elif want_gen >= 0 and buf != block_bytes(block, want_gen) and len(bad) < limit:
            b, g = _HEADER.unpack_from(buf)     # want_gen < 0: its last write failed
            bad.append(f"block {block} (offset {block * BLOCK}): expected generation "
                       f"{want_gen}, found header ({b}, {g})"
                       + (", torn" if (b, g) == (block, want_gen) else ""))

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        inflight: dict[int, object] = {}
        for block in range(length // BLOCK):
            while not pool.free:
                _drain(h, inflight, check)
            slot = pool.free.pop()
            inflight[h.aio_pread(pool.bufs[slot], block * BLOCK)] = (block, slot)
        while inflight:
            _drain(h, inflight, check)
    finally:
        h.shutdown()
    return bad


@dataclass
class WriterLog:
    """What one load run did: per write (submit, complete) times, the last generation
    of every block written (-1: its last write failed), and the failed writes."""

    submit: list[float] = field(default_factory=list)
    complete: list[float] = field(default_factory=list)
    final: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[float, str]] = field(default_factory=list)   # (time, message)

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Throughput and latency of the writes that completed in [t0, t1]."""
        lat = sorted(c - s for s, c in zip(self.submit, self.complete, strict=True)
                     if t0 <= c <= t1)
        span = max(t1 - t0, 1e-9)
        if not lat:
            return {"mib_s": 0.0, "writes": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        return {"mib_s": len(lat) * BLOCK / span / (1 << 20), "writes": len(lat),
                "p50_ms": 1000 * lat[len(lat) // 2],
                "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "max_ms": 1000 * lat[-1]}

    def longest(self, t0: float, t1: float) -> tuple[float, float]:
        """(submit, complete) of the longest write in flight at some time in [t0, t1]
        ((0, 0) if none was)."""
        return max(((s, c) for s, c in zip(self.submit, self.complete, strict=True)
                    if s <= t1 and c >= t0), key=lambda sc: sc[1] - sc[0], default=(0.0, 0.0))

    def stalls(self) -> list[tuple[float, float]]:
        """The intervals in which writes were outstanding and none completed::

            write A  |s=====c|
            write B      |s=========================c|
            write C                |s===============c|
                             ^ A done   (stall)      ^ B, C done
                                        |<--------->| from max(A's completion,
                                                     the oldest pending submit)
        """
        pairs = sorted(zip(self.complete, self.submit, strict=True))
        out: list[tuple[float, float]] = []
        oldest = float("inf")
        suffix = [0.0] * len(pairs)                 # oldest submit among writes i..end
        for i in range(len(pairs) - 1, -1, -1):
            oldest = min(oldest, pairs[i][1])
            suffix[i] = oldest
        previous = float("-inf")
        for i, (c, _s) in enumerate(pairs):
            start = max(previous, suffix[i])
            if c > start:
                out.append((start, c))
            previous = c
        return out

    def stall_ms(self, t0: float, t1: float) -> float:
        """The longest stall (see :meth:`stalls`) that overlaps [t0, t1], in ms."""
        return 1000 * max((e - b for b, e in self.stalls() if b <= t1 and e >= t0),
                          default=0.0)


def run_load(uri: str, length: int, qd: int, rate_mib: float | None, seed: int,
             max_seconds: float, out: str) -> int:
    """The write load (see the module docstring); a failed write is recorded, and the
    load goes on as a guest would. Returns 1 if the connection itself failed."""
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(seed)
    nblocks = length // BLOCK
    record = WriterLog()
    fatal: str | None = None
    h = nbd.NBD()
    h.connect_uri(uri)
    busy: set[int] = set()
    inflight: dict[int, object] = {}
    gen = 0
    interval = BLOCK / (rate_mib * (1 << 20)) if rate_mib else 0.0

    pool = BufferPool(qd, BLOCK)

    def done(item: object, error: str | None) -> None:
        block, g, t_submit, slot = item  # type: ignore[misc]
        now = time.time()
        busy.discard(block)
        pool.free.append(slot)
        if error is not None:
            record.failures.append((now, error))
            record.final[block] = -1
            return
        record.submit.append(t_submit)
        record.complete.append(now)
        record.final[block] = g

    print("running", flush=True)
    start = time.time()
    next_t = start
    try:
        while not stop and time.time() - start < max_seconds:
            now = time.time()
            if rate_mib and next_t < now - 1.0:
                next_t = now - 1.0          # bounded catch-up after a stall
            while pool.free and len(busy) < nblocks and (not rate_mib or now >= next_t):
                block = rng.randrange(nblocks)
                while block in busy:
                    block = rng.randrange(nblocks)
                gen += 1
                slot = pool.free.pop()
                put_block(pool.bufs[slot], 0, block, gen)
                inflight[h.aio_pwrite(pool.bufs[slot], block * BLOCK)] = (block, gen, now, slot)
                busy.add(block)
                next_t += interval
                now = time.time()
            if inflight:
                wait = -1
                if rate_mib and len(inflight) < qd:
                    wait = max(0, min(100, int((next_t - time.time()) * 1000)))
                _drain(h, inflight, done, wait)
            elif rate_mib:
                time.sleep(max(0.0, min(0.1, next_t - time.time())))
        while inflight:
            _drain(h, inflight, done)
        h.flush()
    except nbd.Error as e:
        fatal = str(e)
    finally:
        try:
            h.shutdown()
        except nbd.Error:
            pass
        with open(out, "w") as f:
            json.dump({"submit": record.submit, "complete": record.complete,
                       "final": sorted(record.final.items()), "failures": record.failures,
                       "fatal": fatal}, f)
    return 0 if fatal is None else 1


def load_log(path: Path) -> WriterLog:
    with open(path) as f:
        doc = json.load(f)
    record = WriterLog(doc["submit"], doc["complete"], {b: g for b, g in doc["final"]},
                       [(t, m) for t, m in doc["failures"]])
    if doc["fatal"]:
        record.failures.append((record.complete[-1] if record.complete else 0.0,
                                f"the load stopped: {doc['fatal']}"))
    return record


class WriterProcess:
    """The load as a process of its own: started on enter (waiting, with a deadline,
    until it is connected), stopped by :meth:`stop`, and killed on exit whatever
    happened."""

    def __init__(self, uri: str, length: int, out: Path, *, qd: int, seed: int,
                 rate_mib: float | None, max_seconds: float) -> None:
        self.out = out
        self.argv = [sys.executable, __file__, "--uri", uri, "--range", str(length),
                     "--out", str(out), "--qd", str(qd), "--seed", str(seed),
                     "--max-seconds", str(max_seconds)]
        if rate_mib:
            self.argv += ["--rate", str(rate_mib)]
        self.errlog = out.with_suffix(".log")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WriterProcess:
        with open(self.errlog, "ab") as err:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=err)
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], 30)
        line = self._proc.stdout.readline() if ready else b""
        if line.strip() != b"running":
            self._kill()
            raise WriterError("did not start: "
                              + self.errlog.read_text(errors="replace").strip()[-300:])
        return self

    def stop(self) -> WriterLog:
        """SIGTERM; wait (bounded) for it to drain, flush and write its log; return it."""
        proc = self._proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self._kill()
                raise WriterError("did not stop within 30 s of SIGTERM") from None
        self._proc = None
        try:
            return load_log(self.out)
        except (OSError, ValueError, KeyError) as e:
            raise WriterError(f"exit {proc.returncode}, no log ({e}): "
                              + self.errlog.read_text(errors="replace").strip()[-300:]) from e

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._kill()


class WriterError(Exception):
    """The load process did not start, stop or leave its log."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", required=True)
    p.add_argument("--range", type=int, required=True, help="bytes: writes land in [0, range)")
    p.add_argument("--out", required=True)
    p.add_argument("--qd", type=int, default=8)
    p.add_argument("--rate", type=float, help="MiB/s (default: as fast as the server goes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=600.0)
    a = p.parse_args(argv)
    return run_load(a.uri, a.range, a.qd, a.rate, a.seed, a.max_seconds, a.out)


if __name__ == "__main__":
    sys.exit(main())
