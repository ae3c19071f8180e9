"""NBD clients that generate the benchmark's load.

- sequential reads: ``nbdcopy --connections=1 --requests=N URI null:`` (nbdcopy
  asks for extents first, so holes and zero ranges cost no reads);
- random 4 KiB reads and writes: libnbd's asynchronous API from this process,
  a fixed number of commands kept in flight (the queue depth).

Each function returns the elapsed seconds of the measured part only:
connecting and disconnecting are outside the timing, the final flush of a
write workload is inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import time

import nbd

log = logging.getLogger(__name__)


class ClientError(Exception):
    """A load generator failed (the server returned an error or died)."""

    template = "{client}: {reason}"

    def __init__(self, client: str, reason: str) -> None:
        self.client = client
        self.reason = reason
        super().__init__(self.template.format(client=client, reason=reason))


def nbdcopy_read(uri: str, requests: int) -> float:
    """Copy the whole export to ``null:``; return seconds."""
    cmd = [os.environ.get("NBDCOPY", "nbdcopy"), f"--requests={requests}", "--connections=1",
           uri, "null:"]
    log.debug("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise ClientError("nbdcopy", f"exit {res.returncode}: {res.stderr.strip()}")
    return elapsed


def _connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def _close(h: nbd.NBD) -> None:
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def _drive(h: nbd.NBD, count: int, qd: int, submit: object, deadline: float | None) -> int:
    """Keep ``qd`` commands in flight until ``count`` completed or ``deadline``.

    ``submit(i, slot)`` issues command ``i`` using buffer ``slot`` and returns
    its cookie. Returns the number of commands completed.
    """
    free = list(range(qd))
    slot_of: dict[int, int] = {}
    issued = done = 0
    issue = submit  # local for speed
    while done < count:
        while free and issued < count:
            slot = free.pop()
            slot_of[issue(issued, slot)] = slot  # type: ignore[operator]
            issued += 1
        h.poll(-1)
        while slot_of:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                break
            try:
                h.aio_command_completed(cookie)
            except nbd.Error as e:
                raise ClientError("libnbd", f"command failed: {e}") from e
            free.append(slot_of.pop(cookie))
            done += 1
        if deadline is not None and issued < count and time.perf_counter() >= deadline:
            count = issued  # stop issuing; drain what is in flight
    return done


def random_read(uri: str, size: int, qd: int, seconds: float, seed: int,
                block: int = 4096) -> tuple[int, float]:
    """Uniform random ``block``-aligned reads at queue depth ``qd`` for ``seconds``.

    The offsets are one fixed sequence (``seed``) for every server; a faster
    server just gets further along it. Returns (operations, seconds).
    """
    rng = random.Random(seed)
    nblocks = size // block
    offsets = [rng.randrange(nblocks) * block for _ in range(1 << 18)]
    mask = len(offsets) - 1
    h = _connect(uri)
    try:
        bufs = [nbd.Buffer(block) for _ in range(qd)]
        aio_pread = h.aio_pread

        def submit(i: int, slot: int) -> int:
            return aio_pread(bufs[slot], offsets[i & mask])

        t0 = time.perf_counter()
        ops = _drive(h, 1 << 62, qd, submit, t0 + seconds)
        return ops, time.perf_counter() - t0
    finally:
        _close(h)


def sequential_write(uri: str, offset: int, length: int, request: int, qd: int,
                     pattern: int) -> float:
    """Write ``length`` bytes from ``offset`` in ``request``-sized commands at
    queue depth ``qd``, then flush; return seconds (flush included).

    Every byte written is ``pattern`` (non-zero, so no server can turn the
    writes into zero writes; ``qemu-io read -P`` verifies them afterwards).
    """
    if not 0 < pattern < 256:
        raise ValueError("pattern must be a non-zero byte")
    count = -(-length // request)
    last = count - 1
    payload = nbd.Buffer.from_bytearray(bytes([pattern]) * request)
    tail_buf = nbd.Buffer.from_bytearray(bytes([pattern]) * (length - last * request))
    h = _connect(uri)
    try:
        aio_pwrite = h.aio_pwrite

        def submit(i: int, slot: int) -> int:
            return aio_pwrite(payload if i != last else tail_buf, offset + i * request)

        t0 = time.perf_counter()
        _drive(h, count, qd, submit, None)
        h.flush()
        return time.perf_counter() - t0
    finally:
        _close(h)
