"""Helpers shared by the NBD-level suites: served images, NBD I/O, file snapshots.

Everything here drives real processes (nbdkit with the vdisk plugin, qemu-img,
qemu-io) through the ``vdisk`` orchestration modules; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nbd
from diskmodel import Op

from vdisk.nbdkit import NbdkitServer

KiB = 1024
MiB = 1024 * KiB

# base:allocation flags (NBD protocol)
HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO

REQUEST_DEADLINE = 30.0  # seconds; a request slower than this means a hung server

# Randomised suites record how many examples/trials they ran: {what: count}.
# conftest.py prints this table at the end of the session.
EXAMPLES_RUN: dict[str, int] = {}


class Served:
    """One running nbdkit serving one image, and the handles connected to it."""

    def __init__(self, image: Path, server: NbdkitServer, readonly: bool) -> None:
        self.image = image
        self.server = server
        self.readonly = readonly
        self.handles: list[nbd.NBD] = []
        self.stopped = False

    @property
    def uri(self) -> str:
        return self.server.uri

    def connect(self, *, meta: bool = True, export: str | None = None) -> nbd.NBD:
        """A libnbd handle connected to the default export (base:allocation requested)."""
        h = nbd.NBD()
        if meta:
            h.add_meta_context("base:allocation")
        if export is None:
            h.connect_uri(self.uri)
        else:
            h.set_export_name(export)
            h.connect_unix(str(self.server.socket))
        self.handles.append(h)
        return h

    def alive(self) -> bool:
        """True if the nbdkit process exists and is not a zombie."""
        return process_alive(self.server.pid)

    def close_handles(self) -> None:
        for h in self.handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        self.handles.clear()

    def stop(self) -> None:
        """Disconnect every handle, then stop nbdkit (terminate, wait, kill)."""
        if self.stopped:
            return
        self.close_handles()
        self.stopped = True
        self.server.stop()

    def kill(self) -> None:
        """SIGKILL nbdkit (crash tests); handles are dropped without a clean shutdown."""
        self.server.kill()
        self.stopped = True
        self.handles.clear()

    def stderr(self) -> str:
        return self.server.stderr_text()


class ServerFactory:
    """Starts servers on demand and stops all of them in :meth:`close_all`."""

    def __init__(self, new_workdir: Callable[[], Path]) -> None:
        self._new_workdir = new_workdir
        self._stack = contextlib.ExitStack()
        self.served: list[Served] = []

    def __call__(
        self,
        image: Path | str,
        *,
        readonly: bool = False,
        extra_args: Iterable[str] = (),
    ) -> Served:
        """Start nbdkit on ``image``; raises vdisk.errors.NbdkitError if it refuses."""
        server = NbdkitServer(
            [f"image={image}"],
            self._new_workdir(),
            readonly=readonly,
            extra_args=list(extra_args),
        )
        self._stack.enter_context(server)
        served = Served(Path(image), server, readonly)
        self.served.append(served)
        return served

    def close_all(self) -> None:
        try:
            for served in self.served:
                served.close_handles()
        finally:
            self._stack.close()
            self.served.clear()


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


# --- NBD I/O ------------------------------------------------------------------


def read_all(h: nbd.NBD, size: int | None = None, chunk: int = 4 * MiB) -> bytes:
    """Every byte of the export (or its first ``size`` bytes), in chunks."""
    if size is None:
        size = h.get_size()
    out = bytearray()
    for offset in range(0, size, chunk):
        out += h.pread(min(chunk, size - offset), offset)
    return bytes(out)


def extents(h: nbd.NBD, offset: int = 0, length: int | None = None) -> list[tuple[int, int, int]]:
    """base:allocation extents covering [offset, offset+length), as (offset, length, flags).

    Loops because a server may answer with fewer extents than asked for; the
    last extent is clipped to the requested range.
    """
    if length is None:
        length = h.get_size() - offset
    end = offset + length
    result: list[tuple[int, int, int]] = []
    pos = offset
    while pos < end:
        got: list[tuple[int, int]] = []
        h.block_status(min(end - pos, 2**31), pos, collector(got))
        if not got:
            raise AssertionError(f"block_status at {pos} returned no base:allocation extents")
        for length_, flags in got:
            if pos >= end:
                break
            if length_ <= 0:
                raise AssertionError(f"block_status returned an empty extent at {pos}: {got}")
            take = min(length_, end - pos)
            result.append((pos, take, flags))
            pos += take
    return result


def collector(got: list[tuple[int, int]]) -> Callable[[str, int, list[int], int], int]:
    def callback(metacontext: str, offset: int, entries: list[int], err: int) -> int:
        if metacontext == "base:allocation":
            got.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    return callback


def wait_command(h: nbd.NBD, cookie: int, deadline: float = REQUEST_DEADLINE) -> None:
    """Wait for one aio command with a deadline; raises nbd.Error if it failed."""
    end = time.monotonic() + deadline
    while not h.aio_command_completed(cookie):
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"NBD command {cookie} did not complete in {deadline} s")
        h.poll(max(1, int(left * 1000)))


def pread_deadline(
    h: nbd.NBD, length: int, offset: int, deadline: float = REQUEST_DEADLINE
) -> bytes:
    """pread that fails with TimeoutError instead of hanging on a stuck server."""
    buf = nbd.Buffer(length)
    cookie = h.aio_pread(buf, offset)
    wait_command(h, cookie, deadline)
    return bytes(buf.to_bytearray())


def pwrite_deadline(
    h: nbd.NBD, data: bytes, offset: int, deadline: float = REQUEST_DEADLINE
) -> None:
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    cookie = h.aio_pwrite(buf, offset)
    wait_command(h, cookie, deadline)


def errno_of(exc: nbd.Error) -> int:
    return exc.errnum


def is_enotsup(exc: nbd.Error) -> bool:
    return exc.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP)


def pattern(seed: int, length: int) -> bytes:
    """Deterministic non-zero-ish data for writes: recognisable and incompressible enough."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    out = (block * (length // len(block) + 1))[:length]
    return bytes(b or 1 for b in out)


# --- asynchronous request streams -------------------------------------------------


@dataclass
class Issued:
    op: Op
    cookie: int
    seq: int  # when it was sent (event counter)
    acked: int | None = None  # when its success was seen
    buf: object = None  # keeps an aio write buffer alive
    acked_before_issue: frozenset[int] = field(default_factory=frozenset)  # flushes only


class AsyncStream:
    """Sends requests asynchronously and records what was acknowledged when.

    Requests in flight together never overlap (``issue`` waits for any
    overlapping one to finish first), so applying the acknowledged requests in
    the order they were sent gives a well-defined content.
    """

    def __init__(self, h: nbd.NBD) -> None:
        self.h = h
        self.clock = 0
        self.issued: list[Issued] = []
        self.in_flight: list[int] = []  # indexes into issued

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def reap(self) -> None:
        """Retire every completed command; raises nbd.Error if one failed."""
        self.h.poll(0)
        still = []
        for i in self.in_flight:
            if self.h.aio_command_completed(self.issued[i].cookie):
                self.issued[i].acked = self.tick()
            else:
                still.append(i)
        self.in_flight = still

    def _span(self, op: Op) -> tuple[int, int] | None:
        return (op.offset, op.end()) if op.kind != "flush" else None

    def _wait_for(self, pred: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while pred():
            if time.monotonic() > deadline:
                raise TimeoutError("requests did not complete in 30 s")
            self.h.poll(100)
            self.reap()

    def issue(self, op: Op, max_in_flight: int) -> Issued:
        span = self._span(op)

        def blocked() -> bool:
            if len(self.in_flight) >= max_in_flight:
                return True
            if span is None:
                return False
            for i in self.in_flight:
                other = self._span(self.issued[i].op)
                if other and other[0] < span[1] and span[0] < other[1]:
                    return True
            return False

        self.reap()
        self._wait_for(blocked)
        h, buf = self.h, None
        if op.kind == "write":
            buf = nbd.Buffer.from_bytearray(bytearray(pattern(op.seed, op.length)))
            flags = nbd.CMD_FLAG_FUA if op.fua else 0
            cookie = h.aio_pwrite(buf, op.offset, flags=flags)
        elif op.kind == "zero":
            cookie = h.aio_zero(
                op.length, op.offset, flags=0 if op.may_trim else nbd.CMD_FLAG_NO_HOLE
            )
        elif op.kind == "trim":
            cookie = h.aio_trim(op.length, op.offset)
        else:
            cookie = h.aio_flush()
        acked = frozenset(i for i, x in enumerate(self.issued) if x.acked is not None)
        item = Issued(op, cookie, self.tick(), buf=buf, acked_before_issue=acked)
        self.issued.append(item)
        self.in_flight.append(len(self.issued) - 1)
        return item

    def drain(self) -> None:
        self._wait_for(lambda: bool(self.in_flight))



# --- files ----------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def snapshot_tree(root: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every regular file under root."""
    snap: dict[str, tuple[int, str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                snap[str(path.relative_to(root))] = (path.stat().st_size, sha256_file(path))
    return snap


def first_difference(a: bytes, b: bytes) -> str:
    """A short description of where two byte strings first differ (for assertion messages)."""
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    for i in range(0, len(a), 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            for j in range(i, min(i + 4096, len(a))):
                if a[j] != b[j]:
                    return f"first difference at byte {j}: {a[j]:#04x} != {b[j]:#04x}"
    return "identical"
