"""Multi-connection NBD writers with an oracle of acknowledged requests.

Each connection runs in its own thread and keeps several asynchronous
requests in flight (libnbd aio). Requests in flight at the same time never
overlap, across all connections (a shared table of in-flight spans), so
applying acknowledged requests in the order they were acknowledged gives the
one content the server must show::

    conn 0   [write A 0..4k]----ack          [zero C 2k..6k]--ack
    conn 1        [write B 8k..9k]--ack   (C waits until A is acknowledged
                                           because they overlap)

The oracle records a request only once its success was seen. For crash tests
every record keeps when it was sent and acknowledged on one global clock, so
``durable()`` can tell what a flush made durable (a flush covers the requests
acknowledged, on any connection, before it was sent: the server advertises
multi-conn).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbd
from diskmodel import merge

KiB = 1024
MiB = 1024 * KiB
JOIN_DEADLINE = 30.0


def data_for(seed: int, length: int) -> bytes:
    """Position-dependent pseudo-random bytes: a misplaced write is always visible."""
    return random.Random(seed).randbytes(length)


@dataclass
class Record:
    kind: str          # write, zero, trim, flush
    offset: int
    length: int
    seed: int
    conn: int
    sent: int
    acked: int | None = None
    error: str | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


class Writers:
    """``nconn`` connections writing random verifiable data until ``stop()``.

    ``regions`` limits the requests to those byte ranges; ``kinds`` weighs
    write / zero / trim (trims cover whole clusters only: on a v3 top they
    read as zeros afterwards); a flush is sent every ``flush_every`` seconds.
    """

    def __init__(self, socket: Path, export: str, initial: bytes, *, seed: int,
                 nconn: int = 3, in_flight: int = 4, cluster: int = 64 * KiB,
                 regions: list[tuple[int, int]] | None = None,
                 kinds: tuple[float, float, float] = (0.75, 0.2, 0.05),
                 flush_every: float = 0.05) -> None:
        self.socket = str(socket)
        self.export = export
        self.size = len(initial)
        self.initial = bytes(initial)
        self.oracle = bytearray(initial)
        self.rng = random.Random(seed)
        self.nconn = nconn
        self.in_flight = in_flight
        self.cluster = cluster
        self.regions = regions or [(0, self.size)]
        self.kinds = kinds
        self.flush_every = flush_every
        self.records: list[Record] = []
        self.errors: list[str] = []
        self._spans: dict[int, Record] = {}        # id -> in-flight request
        self._clock = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_flush = time.monotonic()

    # -- life -----------------------------------------------------------------

    def start(self) -> Writers:
        handles = []
        try:
            for _ in range(self.nconn):
                h = nbd.NBD()
                h.set_export_name(self.export)
                h.connect_unix(self.socket)
                handles.append(h)
        except nbd.Error:
            for h in handles:
                with contextlib.suppress(nbd.Error):
                    h.shutdown()
            raise
        for i, h in enumerate(handles):
            t = threading.Thread(target=self._run, args=(i, h), name=f"nbd-writer-{i}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self, expect_errors: bool = False) -> None:
        """Stop sending, wait (bounded) for what is in flight, close the connections."""
        self._stop.set()
        for t in self._threads:
            t.join(JOIN_DEADLINE)
            assert not t.is_alive(), f"{t.name} did not stop in {JOIN_DEADLINE} s"
        if not expect_errors:
            assert not self.errors, f"NBD requests failed: {self.errors[:5]}"

    @property
    def acked(self) -> int:
        with self._lock:
            return sum(1 for r in self.records if r.acked is not None and r.kind != "flush")

    def wait_acked(self, more: int, deadline: float = 30.0) -> None:
        """Wait until ``more`` further requests have been acknowledged."""
        want = self.acked + more
        end = time.monotonic() + deadline
        while self.acked < want:
            assert not self.errors, f"NBD requests failed: {self.errors[:5]}"
            if time.monotonic() > end:
                raise TimeoutError(f"writers acknowledged {self.acked}/{want} in {deadline} s")
            time.sleep(0.01)

    # -- one connection ------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _choose(self, conn: int) -> Record | None:
        """A random request not overlapping anything in flight (caller holds the lock)."""
        now = time.monotonic()
        if conn == 0 and now - self._last_flush >= self.flush_every:
            self._last_flush = now
            return Record("flush", 0, 0, 0, conn, 0)
        rng, cs = self.rng, self.cluster
        lo, hi = rng.choice(self.regions)
        kind = rng.choices(("write", "zero", "trim"), weights=self.kinds)[0]
        shape = rng.random()
        if kind == "trim" or shape < 0.3:       # whole clusters
            first, last = -(-lo // cs), hi // cs
            if last <= first:
                return None
            c = rng.randrange(first, last)
            n = min(rng.randint(1, 4), last - c)
            offset, length = c * cs, n * cs
        elif shape < 0.7:                        # small, unaligned
            offset = rng.randrange(lo, hi)
            length = rng.randint(1, 8 * KiB)
        else:                                    # up to 256 KiB, unaligned
            offset = rng.randrange(lo, hi)
            length = rng.randint(1, 256 * KiB)
        length = min(length, hi - offset)
        for r in self._spans.values():
            if r.kind != "flush" and r.offset < offset + length and offset < r.end:
                return None
        return Record(kind, offset, length, rng.randrange(2**63), conn, 0)

    def _run(self, conn: int, h: nbd.NBD) -> None:
        mine: dict[int, tuple[Record, object]] = {}      # cookie -> (record, buffer)
        try:
            while mine or not self._stop.is_set():
                self._reap(h, mine)
                if not self._stop.is_set() and len(mine) < self.in_flight:
                    with self._lock:
                        rec = self._choose(conn)
                        if rec is not None:
                            rec.sent = self._tick()
                            self.records.append(rec)
                            self._spans[id(rec)] = rec
                    if rec is not None:
                        cookie, buf = self._send(h, rec)
                        mine[cookie] = (rec, buf)      # the buffer lives until the reply
                        continue
                h.poll(20 if mine else 5)
        except nbd.Error as e:               # the connection died (the server was killed)
            with self._lock:
                self.errors.append(f"conn {conn}: {e}")
                for rec, _buf in mine.values():
                    rec.error = rec.error or f"connection lost: {e}"
                    self._spans.pop(id(rec), None)
        finally:
            with contextlib.suppress(nbd.Error):
                if h.aio_is_ready():
                    h.shutdown()

    @staticmethod
    def _send(h: nbd.NBD, rec: Record) -> tuple[int, object]:
        if rec.kind == "write":
            buf = nbd.Buffer.from_bytearray(bytearray(data_for(rec.seed, rec.length)))
            return h.aio_pwrite(buf, rec.offset), buf
        if rec.kind == "zero":
            flags = nbd.CMD_FLAG_NO_HOLE if rec.seed & 1 else 0
            return h.aio_zero(rec.length, rec.offset, flags=flags), None
        if rec.kind == "trim":
            return h.aio_trim(rec.length, rec.offset), None
        return h.aio_flush(), None

    def _reap(self, h: nbd.NBD, mine: dict[int, tuple[Record, object]]) -> None:
        for cookie in list(mine):
            rec, _ = mine[cookie]
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as e:
                if not h.aio_is_ready() and not h.aio_is_processing():
                    raise                       # connection dead: handled by _run
                with self._lock:
                    rec.error = str(e)
                    self.errors.append(f"{rec.kind} [{rec.offset}, {rec.end}): {e}")
                    self._spans.pop(id(rec), None)
                del mine[cookie]
                continue
            if done:
                with self._lock:
                    rec.acked = self._tick()
                    self._apply(self.oracle, rec)
                    self._spans.pop(id(rec), None)
                del mine[cookie]

    def _apply(self, model: bytearray, rec: Record) -> None:
        if rec.kind == "write":
            model[rec.offset:rec.end] = data_for(rec.seed, rec.length)
        elif rec.kind in ("zero", "trim"):
            model[rec.offset:rec.end] = bytes(rec.length)

    # -- what a point in time promises -------------------------------------------

    def mark(self) -> int:
        """The current time on the writers' clock (for view_at)."""
        with self._lock:
            return self._tick()

    def view_at(self, acked_before: int, sent_before: int = 1 << 62
                ) -> tuple[bytes, list[tuple[int, int]]]:
        """The content at a point, and the byte ranges it does not promise.

        Requests acknowledged before ``acked_before`` are in; those sent from
        ``sent_before`` on are out; every other one (in flight at the point,
        failed, or never acknowledged) makes its range unknown.
        """
        with self._lock:
            model = bytearray(self.initial)
            unknown: list[tuple[int, int]] = []
            done = sorted((r for r in self.records if r.kind != "flush"),
                          key=lambda r: r.acked if r.acked is not None else 1 << 62)
            for r in done:
                if r.acked is not None and r.acked < acked_before:
                    self._apply(model, r)
                elif r.sent < sent_before:
                    unknown.append((r.offset, r.end))
        return bytes(model), merge(unknown)

    def durable(self) -> tuple[bytes, list[tuple[int, int]]]:
        """What a crash must keep: requests acknowledged before the last acknowledged
        flush was sent; any other request makes its range unknown."""
        with self._lock:
            cut = max((r.sent for r in self.records if r.kind == "flush" and r.acked is not None),
                      default=0)
        return self.view_at(cut)
