"""Online consolidation by I/O mirroring.

A job collapses the top `collapse` layers of a disk's chain into a target:
an image already in the chain (into mode: disk.layers[collapse]) or a new
image on top of disk.layers[collapse] (new mode). The target chain is served
by a second Disk sharing the lower layers.

States and transitions (each has a test in tests/unit/test_mirror.py):

    copying --copy pass done--> ready --complete()--> pivoting --> done
       |                          |                      |
       +--cancel()--> cancelled <-+                      +--error--> failed
       +--target error--------------> failed <-----------+

A guest write waits only for a copy in flight that overlaps it, as QEMU's
mirror in write-blocking mode does. The copy of a chunk claims its range
under the disk lock (where its data lies in the served files and goes in the
target), moves the data without the lock, then settles under the lock; a
guest change (write, zero, trim) of an overlapping range waits for that, and
only then goes where its route says (mirrorroute.py):

    guest write W to clusters C     copy of C (one pass, chunk by chunk)
    ---------------------------     --------------------------------------
    W before the claim of C:        W lands in the top alone; the copy
                                    reads the view with W in it
    W after C settled:              W lands in the top and the target,
                                    after the copy landed (or in the target
                                    alone, once the top let go of C)
    W while C is in flight:         W waits for C to settle, then as above
    W elsewhere meanwhile:          runs at once (the claim covers whole
                                    clusters of every image involved)

so a stale copy never lands on newer data and every cluster is copied once.
Data moves outside the lock only between clusters the source already holds
and target clusters already in place (or allocated by the claim and linked
when it settles); a cancel or failure drains the copy in flight before it
closes the target, and the pivot drains it as it drains reads.
Whatever happens to the job, the served chain reads the same. In new mode
the target is not in it. Into mode, the target changes where the layers
above it hold data (the copy set, and what the guest writes there) and,
with one layer collapsed, where the top holds nothing: there the served
chain reads the target already, and the guest's writes go to it alone; the
top lets go of a copied cluster only once the target holds it durably.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from .chainops import Persist, adopt
from .chunkcopy import Chunk, InFlight
from .copyset import layer_ranges, merged
from .disk import Disk
from .errors import RequestError
from .mirrorcopy import CopyPass
from .mirrorroute import Routes
from .mirrorstate import ACTIVE, ENDED, State, Stats
from .mirrortarget import open_target, release_target

__all__ = ["ACTIVE", "ENDED", "JOB_SWITCH_INTERVAL_S", "MirrorJob", "State", "Stats"]


# While a job runs, the interpreter is handed from thread to thread every
# 0.1 ms instead of every 5: the job's own Python work (opening the target
# reads and checks all of its metadata) then keeps a guest request waiting
# for the interpreter for fractions of a millisecond, not for several
# (measured in docs/benchmarks.md: against 0.5 ms, guest p99 during a job
# 2.5 against 3.0 ms, throughput the same). Process-wide, so counted over jobs.
JOB_SWITCH_INTERVAL_S = 0.0001


class _SwitchInterval:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0.0

    def hold(self) -> None:
        with self._lock:
            if not self._users:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, JOB_SWITCH_INTERVAL_S))
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._users:
                sys.setswitchinterval(self._saved)


_switch_interval = _SwitchInterval()

# Before the pivot, up to PRESYNCS syncs of the target without the lock, until
# one takes less than QUICK_SYNC_S: the pivot's own flush takes about a third
# of the last one (measured under the fast load, 1 GiB delta).
PRESYNCS = 4
QUICK_SYNC_S = 0.01


class MirrorJob(CopyPass, Routes):
    def __init__(self, disk: Disk, collapse: int = 1, *, new_path: str | None = None,
                 chunk: int = 1 << 20,
                 on_change: Callable[[MirrorJob, State], None] | None = None,
                 on_target_id: Callable[[bytes], None] | None = None) -> None:
        if disk.top is None:
            raise RequestError(disk.path, "the disk is read-only")
        if not 1 <= collapse <= len(disk.layers) - (0 if new_path else 1):
            raise RequestError(disk.path, f"cannot collapse {collapse} layers of a chain "
                               f"of {len(disk.layers)}")
        self.disk = disk
        self.collapse = collapse
        self.new_path = new_path
        self.chunk = chunk
        self.on_change = on_change
        self.on_target_id = on_target_id
        self.state = State.COPYING
        self.error: str | None = None
        self.stats = Stats()
        self.target_path = new_path or disk.layers[collapse].path
        self.dropped: list[str] = []
        self._cond = threading.Condition()
        # state changes are announced to on_change in order, one at a time,
        # and where the caller can, after it has let go of the disk lock
        self._news: collections.deque[State] = collections.deque()
        self._announcing = threading.Lock()
        self._t0 = time.monotonic()
        self._target: Disk | None = None
        self._chunk: Chunk | None = None
        self._copy_set: list[tuple[int, int]] = []
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()   # cancel() waits for a start in progress
        self._quick_switch = False          # holds _switch_interval
        self._mirroring = False             # guest changes go to the target too
        self._starts: list[int] = []        # routes (mirrorroute.py)
        self._copied_to = 0
        self._direct = False
        self._changes = 0
        self._pending: list[tuple[int, int]] = []   # copied, not handed down yet
        # the copy in flight: the guest byte range it claims (whole clusters of
        # every image involved), and its work without the disk lock
        self._in_flight = InFlight(disk.lock, disk.path)
        self._align = disk.map.g

    # -- start ----------------------------------------------------------------

    def start(self) -> MirrorJob:
        """Open the target and start the copy pass.

        The disk lock is held only to claim the disk (no snapshot and no other
        job from then on) and, once the target is open, to take the copy set
        and start mirroring. Guest writes before that land in the top alone;
        the copy set, taken at the same instant mirroring starts, covers them.
        """
        disk = self.disk
        with self._starting:
            with disk.lock:
                if disk.job is not None:
                    raise RequestError(disk.path, "a mirror job is already running on this disk")
                if self.state is not State.COPYING:
                    raise RequestError(disk.path, f"the job is {self.state.value}")
                disk.job = self
                self._hurry(True)
                assert disk.top is not None
                if not self.new_path and self.collapse == 1:
                    # the child whose parent ID the target's fresh ID goes to
                    # is the top: its own first-write ID must not race that
                    disk.top.begin_write()
            try:
                frozen = layer_ranges(disk, range(1, self.collapse))
                target = open_target(disk, self.collapse, self.new_path, self.on_target_id,
                                     self._remap)
            except BaseException:
                with disk.lock:
                    if disk.job is self:
                        disk.job = None
                    self._hurry(False)
                raise
            with disk.lock:
                self._target = target
                try:
                    self._install(frozen)
                except BaseException:
                    self._release_target()
                    self._hurry(False)
                    raise
        self._news.append(State.COPYING)
        self._announce()
        self._thread = threading.Thread(target=self._copy_pass, name="vdisk-mirror",
                                        daemon=True)
        self._thread.start()
        return self

    def _install(self, frozen: list[tuple[int, int]]) -> None:
        """Under the disk lock: the copy set, taken as mirroring starts."""
        disk, target = self.disk, self._target
        assert target is not None
        self._copy_set = merged(frozen + layer_ranges(disk, [0]))
        g = disk.map.g
        count = 0
        for first, end in self._copy_set:
            disk.map.mark_backing(first, end)       # the target may now hold data there
            count += end - first
        self.stats.copy_set_bytes = min(count * g, disk.size)
        self._starts = [first for first, _end in self._copy_set]
        # into the image below the top: the target is what the served chain
        # reads wherever the top holds nothing (mirrorroute.py)
        self._direct = not self.new_path and self.collapse == 1
        self._align = max(g, target.cluster_size,
                          *(f.cluster_size for f in disk.layers[:self.collapse]))
        self._mirroring = True

    # -- end states -------------------------------------------------------------

    def complete(self, persist: Persist | None = None) -> list[str]:
        """Pivot: the disk serves the target chain. Returns images no longer used.

        The guest waits for the barrier alone: from the pivoting state to
        done, the disk lock is held while requests drain, the target is
        flushed (its data was written back just before, without the lock),
        the new chain is persisted and switched to.
        """
        disk = self.disk
        # write the target's data back without the lock, again while a sync
        # takes long (a busy guest mirrored much meanwhile), so that the
        # flush in the barrier has little left
        for _ in range(PRESYNCS):
            if self.state is not State.READY:
                break
            t = time.monotonic()
            try:
                self._sync_target()
            except OSError as e:        # (a later sync of the file would not say)
                with disk.lock:
                    self._fail(e)
                raise RequestError(disk.path, f"syncing the target failed: {e}") from e
            if time.monotonic() - t < QUICK_SYNC_S:
                break
        with disk.lock:
            if self.state is not State.READY:
                raise RequestError(disk.path, f"the job is {self.state.value}, not ready")
            t0 = time.monotonic()
            # announced at once (the job's events say pivoting); the journal
            # records it with the new chain, in persist's one transaction
            self._set(State.PIVOTING)
            self._announce()
            target = self._target
            assert target is not None
            try:
                # a barrier first: the disk lock stays held from here to the
                # switch, so no request (nor a read outside the lock) runs
                # between the last flush of the target and the new chain
                disk.drain_reads()
                self._in_flight.drain()
                target.flush()
                if persist is not None:
                    persist(self.target_path)
            except Exception as e:
                self._fail(e)
                raise
            dropped = adopt(disk, target)
            disk.job = None
            for f in dropped:
                f.close()
            self.dropped = [f.path for f in dropped if f.path != self.target_path]
            self.stats.pivot_pause_ms = (time.monotonic() - t0) * 1000
            self.stats.duration_s = time.monotonic() - self._t0
            self._set(State.DONE)
        self._announce()
        return self.dropped

    def cancel(self) -> None:
        with self._starting, self.disk.lock:
            if self.state not in ACTIVE:
                raise RequestError(self.disk.path, f"the job is {self.state.value}")
            self._release_target()
            self._set(State.CANCELLED)
        self._announce()

    def _fail(self, e: BaseException) -> None:
        """Called under the disk lock: abandon the target, keep serving the chain."""
        if self.state not in (*ACTIVE, State.PIVOTING):
            return
        self.error = str(e)
        self._release_target()
        self._set(State.FAILED)
        self._announce()                # (a failure is announced at once)

    def _release_target(self) -> None:
        """Under the disk lock: the disk goes on without the job."""
        disk, target = self.disk, self._target
        if disk.job is self:
            disk.job = None
        self._mirroring = False
        self._direct = False
        self._in_flight.let_go()
        self.stats.duration_s = time.monotonic() - self._t0
        if target is None:
            return
        self._in_flight.drain()
        if self._chunk is not None:     # moved or not, the target will not link it: its
            target.unplace(self._chunk.dst)     # clusters go back before the flush
            self._chunk = None
        error = release_target(disk, self.collapse, self.new_path, target)
        if error is None and not self.new_path:
            # a writeback error of the target's file, seen (once) by whichever
            # sync of the job's descriptor came first, shows again on the
            # served chain's own descriptor of that file
            try:
                os.fdatasync(disk.layers[self.collapse].fd)
            except OSError as e:
                error = e
        if error is not None:
            self._lost_sync(error)
        self._target = None

    def _set(self, state: State) -> None:
        """Change state (under the disk lock) and queue its announcement."""
        with self._cond:
            self.state = state
            self._news.append(state)
            self._cond.notify_all()
        if state in ENDED:
            self._hurry(False)

    def _hurry(self, on: bool) -> None:
        """Under the disk lock: the short switch interval, while the job runs."""
        if on != self._quick_switch:
            self._quick_switch = on
            (_switch_interval.hold if on else _switch_interval.release)()

    def _announce(self) -> None:
        """Tell on_change (the journal) of the queued state changes, in order."""
        with self._announcing:
            while self._news:
                state = self._news.popleft()
                if self.on_change is not None:
                    self.on_change(self, state)

    def wait(self, states: tuple[State, ...], timeout: float) -> State:
        """Wait until the job reaches one of states (or an end state); bounded."""
        end = (*states, *ENDED)
        with self._cond:
            self._cond.wait_for(lambda: self.state in end, timeout)
            return self.state

    def info(self) -> dict:
        return {"state": self.state.value, "target": self.target_path, "error": self.error,
                "collapse": self.collapse, "dropped": self.dropped, **asdict(self.stats)}

