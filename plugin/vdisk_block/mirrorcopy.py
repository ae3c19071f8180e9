"""The copy pass of a mirror job: the copy set, chunk by chunk, once.

A mixin of MirrorJob (mirror.py), which gives it the disk, the target, the
copy set, the state and the figures. Each chunk is claimed under the disk
lock (where its bytes lie and go, chunkcopy.py), moved without it, and
settled under it; a guest change of a claimed range waits for the settle
(wait_for_copies, called by the disk). A chunk that needs the lock to be
read or written (zeros, a compressed source, copy-on-write in the target)
is copied under it. When the pass is done, the target's data is written
back without the lock, and the job is ready.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .chunkcopy import Chunk, InFlight, transfer
from .copyset import merged
from .disk import Disk
from .image import COMPRESSED, COPIED, OFFSET_MASK
from .mirrorstate import State, Stats

# While the guest writes, the copy leaves it most of the machine: after a
# chunk during which the guest changed the disk, the copy pauses ten times
# as long as the chunk took. An idle guest's disk is copied at full speed; a
# busy one's over a longer time, with less of its throughput lost: most of
# its writes meanwhile go to one image only (mirrorroute.py). Measured in
# docs/benchmarks.md (fast load: 0.73x and 0.84x of the guest's throughput
# alone, against 0.53x and 0.66x with a pause of three times). The pass is
# still a single one.
BUSY_PAUSE = 10.0

# Into mode with one collapsed layer, the top lets go of what was copied
# (mirrorroute.py) after a sync of the target, once this much more is copied
# and at least HAND_DOWN_SPACING times the last sync's time has passed: the
# sync writes back what the guest wrote to the target too, which under a busy
# guest grows with the range it writes (measured in docs/benchmarks.md). The
# lock is taken for this many of the top's clusters at a time.
HAND_DOWN_BYTES = 4 << 20
HAND_DOWN_SPACING = 3.0
HAND_DOWN_GROUP = 16


class CopyPass:
    disk: Disk
    state: State
    stats: Stats
    chunk: int
    _target: Disk | None
    _chunk: Chunk | None                # claimed, not settled yet
    _copy_set: list[tuple[int, int]]
    _copied_to: int
    _direct: bool
    _changes: int
    _pending: list[tuple[int, int]]
    _in_flight: InFlight
    _align: int
    _t0: float
    _set: Callable[[State], None]
    _fail: Callable[[BaseException], None]
    _show_target: Callable[[int, int], None]
    _lost_sync: Callable[[OSError], None]
    _announce: Callable[[], None]

    def _copy_pass(self) -> None:
        disk, target = self.disk, self._target
        assert target is not None
        g = disk.map.g
        per_chunk = max(1, self.chunk // g)
        zeros = bytes(per_chunk * g)
        seen = self._changes
        pending = 0                     # bytes copied since the last hand-down,
        handed = sync_s = 0.0           # its end and how long its sync took
        try:
            for first, end in self._copy_set:
                for a in range(first, end, per_chunk):
                    b = min(a + per_chunk, end)
                    with disk.lock:
                        t = time.monotonic()
                        if self.state is not State.COPYING:
                            return
                        c = self._claim(target, a, b)
                        self._copied_to = b
                    if c is not None:
                        error = None
                        try:
                            transfer(c, zeros)
                        except Exception as e:      # noqa: BLE001 - settled below
                            error = e
                        finally:
                            self._in_flight.io_end()
                        with disk.lock:
                            self._settle(c, error)
                    took = time.monotonic() - t
                    if self._direct:
                        self._pending.append((a, b))
                        pending += (b - a) * g
                        if pending >= HAND_DOWN_BYTES and \
                                time.monotonic() - handed >= HAND_DOWN_SPACING * sync_s:
                            sync_s = self._hand_down()
                            handed = time.monotonic()
                            pending = 0
                    # (a pause of 0 still lets a guest request that waited for
                    # this chunk take the lock, which is not fair, before the next)
                    busy = self._changes != seen
                    seen = self._changes
                    time.sleep(BUSY_PAUSE * took if busy else 0)
            # the target's data on disk now, without holding up the guest; its
            # metadata is written by the pivot's flush (a crash before it
            # leaves the served chain as it was, the target at worst leaking)
            if self._direct:
                self._hand_down()
            else:
                self._sync_target()
            with disk.lock:
                if self.state is State.COPYING:
                    self.stats.passes = 1
                    self.stats.time_to_ready_s = time.monotonic() - self._t0
                    self._set(State.READY)
            self._announce()
        except Exception as e:          # noqa: BLE001 - the job fails, the disk serves on
            with disk.lock:
                self._fail(e)

    def _hand_down(self) -> float:
        """The top lets go of the clusters copied so far, once the target
        holds them durably (its data synced first, without the lock): the
        guest's later writes there go to the target alone (mirrorroute.py).
        A cluster of the top the copy has only partly passed waits for the
        next time. The lock is taken for a few clusters at a time. Returns
        how long the sync took."""
        t = time.monotonic()
        self._sync_target()
        sync_s = time.monotonic() - t
        pending, self._pending = merged(self._pending), []
        per = self._top_per()
        for a, b in pending:
            c0, c1 = -(-a // per), b // per
            if c0 >= c1:
                self._pending.append((a, b))
                continue
            if a < c0 * per:
                self._pending.append((a, c0 * per))
            if c1 * per < b:
                self._pending.append((c1 * per, b))
            for c in range(c0, c1, HAND_DOWN_GROUP):
                with self.disk.lock:
                    if self.state is not State.COPYING or self._target is None:
                        return sync_s
                    for k in range(c, min(c + HAND_DOWN_GROUP, c1)):
                        self._let_go(k)
                time.sleep(0)           # (a guest request waiting for the lock takes it)
        return sync_s

    def _top_per(self) -> int:
        top = self.disk.top
        assert top is not None
        return top.cs // self.disk.map.g

    def _let_go(self, c: int) -> None:
        """Under the disk lock: the top's cluster c, copied and synced in the
        target, goes; the served map reads the target's slots there instead."""
        top = self.disk.top
        assert top is not None
        old = top.entry(c)
        if not old & ~COPIED:
            return
        top.set_entry(c, 0)
        if old & (COMPRESSED | OFFSET_MASK):
            top.release(old)
        per = self._top_per()
        self._show_target(c * per, min((c + 1) * per, self.disk.map.nslots))
        self.stats.bytes_handed_down += min(top.cs, self.disk.size - c * top.cs)

    def _claim(self, target: Disk, a: int, b: int) -> Chunk | None:
        """Under the disk lock: copy slots [a, b) now if that needs the lock
        (zeros, a compressed source, copy-on-write in the target); otherwise
        claim their range and return where the data lies and goes."""
        disk = self.disk
        g = disk.map.g
        off = a * g
        n = min(b * g, disk.size) - off
        if disk.map.is_zero(a, b - a):
            target.zero(n, off, may_trim=True)
        else:
            src = disk.locate(off, n)
            dst = None if src is None else target.place(off, n)
            if src is not None and dst is not None:
                al = self._align
                self._in_flight.claim(off - off % al, -(-(off + n) // al) * al)
                self._chunk = Chunk(off, n, src, dst)
                return self._chunk
            buf = bytearray(n)
            disk._read(memoryview(buf), off)
            target.write(buf, off)
        self.stats.bytes_copied += n
        return None

    def _settle(self, c: Chunk, error: Exception | None) -> None:
        """Under the disk lock, the data moved (or not): the target takes the
        clusters it allocated for it, and guest changes of the range go on."""
        target = self._target
        self._chunk = None
        if target is not None:          # else cancelled or failed meanwhile (and the
                                        # release gave back what the chunk had placed)
            if error is None:
                target.link(c.dst)
                self.stats.bytes_copied += c.length
            else:
                target.unplace(c.dst)
        self._in_flight.settled()
        if error is not None:
            self._fail(error)

    def _sync_target(self) -> None:
        """Write the target's data back without holding up the guest: a flush
        under the lock then only has what was mirrored since (and metadata)."""
        with self.disk.lock:
            target = self._target
            if target is None or target.top is None:
                return
            top = target.top
            top.data_dirty = False      # what is written from now on sets it again
            self._in_flight.io_begin()
        error = None
        try:
            os.fdatasync(top.fd)
        except OSError as e:
            error = e
        finally:
            self._in_flight.io_end()
        if error is not None:
            with self.disk.lock:
                top.data_dirty = True
                self._lost_sync(error)
            raise error

    def wait_for_copies(self, offset: int, length: int) -> bool:
        """Under the disk lock, before a guest change of [offset, offset + length):
        wait (the lock released) for a copy in flight that overlaps it."""
        return self._in_flight.wait(offset, length)
