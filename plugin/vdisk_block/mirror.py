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

Copy and mirrored writes both run under the disk lock, so their order is the
order in which they reach the target:

    guest write W to clusters C     copy of C (one pass, chunk by chunk)
    ---------------------------     --------------------------------------
    W before the copy of C:         the copy reads the view with W in it
    W after the copy of C:          W is mirrored after the copy landed
    W while C is copied:            impossible, W waits for the lock

so a stale copy never lands on newer data and every cluster is copied once.
Whatever happens to the job, the served chain reads the same: the target only
changes where the layers above it hold data (the copy set, and clusters the
guest writes, which land in the top first).
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from . import identity as ident
from . import locking
from .chainops import Persist, adopt, relative_backing
from .clustermap import LAYER_SHIFT
from .create import create_qcow2
from .disk import Disk
from .errors import RequestError
from .image import COPIED, Qcow2File


class State(enum.Enum):
    COPYING = "copying"
    READY = "ready"
    PIVOTING = "pivoting"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


ACTIVE = (State.COPYING, State.READY)


@dataclass
class Stats:
    copy_set_bytes: int = 0
    bytes_copied: int = 0
    bytes_mirrored: int = 0
    passes: int = 0
    time_to_ready_s: float = 0.0
    duration_s: float = 0.0
    pivot_pause_ms: float = 0.0


def _disk_over(top: Qcow2File, lower: list) -> Disk:
    """A writable Disk of top over lower layers that stay shared with the served disk."""
    try:
        return Disk([top, *lower], readonly=False)
    except BaseException:
        top.close()
        raise


class MirrorJob:
    def __init__(self, disk: Disk, collapse: int = 1, *, new_path: str | None = None,
                 chunk: int = 1 << 20,
                 on_change: Callable[[MirrorJob, State], None] | None = None,
                 on_target_id: Callable[[bytes], None] | None = None) -> None:
        if disk.top is None:
            raise RequestError(disk.path, "the disk is read-only")
        if not 1 <= collapse <= len(disk.layers) - (0 if new_path else 1):
            raise RequestError(disk.path, f"cannot collapse {collapse} layers of a chain "
                               f"of {len(disk.layers)}")
        if not new_path and disk.layers[collapse].size < disk.size:
            target = disk.layers[collapse]
            raise RequestError(target.path, f"its virtual size ({target.size} bytes) is "
                               f"smaller than the disk's ({disk.size} bytes): it cannot hold "
                               "what the layers above it hold; consolidate to a new image "
                               "instead")
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
        self._io = threading.Lock()             # the copy's I/O outside the disk lock
        self._t0 = time.monotonic()
        self._target: Disk | None = None
        self._copy_set: list[tuple[int, int]] = []
        self._thread: threading.Thread | None = None

    # -- start ----------------------------------------------------------------

    def start(self) -> MirrorJob:
        disk = self.disk
        with disk.lock:
            if disk.job is not None:
                raise RequestError(disk.path, "a mirror job is already running on this disk")
            self._copy_set = self._compute_copy_set()
            self._target = self._open_target()
            g = disk.map.g
            count = 0
            for first, end in self._copy_set:
                disk.map.mark_backing(first, end)   # the target may now hold data there
                count += end - first
            self.stats.copy_set_bytes = min(count * g, disk.size)
            disk.job = self
        self._notify(State.COPYING)
        self._thread = threading.Thread(target=self._copy_pass, name="vdisk-mirror",
                                        daemon=True)
        self._thread.start()
        return self

    def _compute_copy_set(self) -> list[tuple[int, int]]:
        """Slot ranges that any collapsed layer allocates (data or zero) or hides."""
        disk = self.disk
        m = disk.map
        ranges: list[tuple[int, int]] = []
        for p in range(self.collapse):
            f = disk.layers[p]
            assert isinstance(f, Qcow2File)
            if f.size < disk.size:      # a smaller layer hides what lies below it
                ranges.append((f.size // m.g, m.nslots))
            per = f.cluster_size // m.g
            assert disk.top is not None
            tables = disk.top.l2.items() if p == 0 else \
                ((i, l2) for i, _off, l2 in f.l2_tables())
            for l1_index, l2 in tables:
                for k, e in enumerate(l2):
                    if e & ~COPIED:
                        first = (l1_index * f.header.l2_entries + k) * per
                        if first < m.nslots:
                            ranges.append((first, min(first + per, m.nslots)))
        merged: list[tuple[int, int]] = []
        for first, end in sorted(ranges):
            if merged and first <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((first, end))
        return merged

    def _open_target(self) -> Disk:
        disk = self.disk
        lower = disk.layers[self.collapse + (0 if self.new_path else 1):]
        if self.new_path:
            old_top = disk.layers[0]
            backing = disk.layers[self.collapse] if self.collapse < len(disk.layers) else None
            assert isinstance(old_top, Qcow2File)
            create_qcow2(self.new_path, disk.size, cluster_bits=old_top.cluster_bits,
                         backing=relative_backing(self.new_path, backing.path) if backing else None,
                         backing_format=backing.fmt if backing else None,
                         parent_id=backing.identity.content_id if backing else None)
            try:
                return _disk_over(Qcow2File(self.new_path, writable=True), lower)
            except BaseException:
                os.unlink(self.new_path)
                raise
        orig = disk.layers[self.collapse]
        if not isinstance(orig, Qcow2File):
            raise RequestError(orig.path, "a raw image cannot be a consolidation target")
        # our own read lock must not stop our own writer; others still cannot write
        locking.lock_image(orig.fd, orig.path, locking.PERM_CONSISTENT_READ, locking.PERM_ALL)
        try:
            target = _disk_over(Qcow2File(orig.path, writable=True), lower)
        except BaseException:
            locking.lock_for_read(orig.fd, orig.path)
            raise
        # The target's data changes from now on: a fresh content ID first
        # (announced to on_target_id, which journals it, before it is
        # written), then the image above records that ID, since the chain
        # still reads the same through it. After a crash between the two, the
        # service's recovery records it, if the target still has that ID.
        top, child = target.top, disk.layers[self.collapse - 1]
        assert top is not None
        # the served map reads this image's clusters directly: where the
        # target moves a cluster (copy-on-write), the map must follow before
        # the old place can be freed and reused
        target.on_remap = self._remap
        before = top.f.identity
        fresh = ident.new_id()
        try:
            if self.on_target_id is not None:
                self.on_target_id(fresh)
            top.refresh_identity(fresh)
            ident.set_parent(child, top.f.identity.content_id)
        except BaseException:
            # no data was written: the target may take its old ID back
            if before.valid and top.f.identity.content_id == fresh:
                assert before.content_id is not None
                top.f.identity = ident.write(top.fd, top.path, top.f.header,
                                             before.content_id, before.parent_id)
            target.layers[0].close()
            locking.lock_for_read(orig.fd, orig.path)
            raise
        orig.identity = top.f.identity
        return target

    # -- copy and mirror ------------------------------------------------------

    def _copy_pass(self) -> None:
        disk, target = self.disk, self._target
        assert target is not None
        g = disk.map.g
        per_chunk = max(1, self.chunk // g)
        try:
            for first, end in self._copy_set:
                for a in range(first, end, per_chunk):
                    b = min(a + per_chunk, end)
                    with disk.lock:
                        if self.state is not State.COPYING:
                            return
                        off = a * g
                        n = min(b * g, disk.size) - off
                        if disk.map.is_zero(a, b - a):
                            target.zero(n, off, may_trim=True)
                        else:
                            buf = bytearray(n)
                            disk._read(memoryview(buf), off)
                            target.write(buf, off)
                        self.stats.bytes_copied += n
                    # the lock is not fair: let a guest request that waited
                    # for this chunk take it before the next one
                    time.sleep(0)
            # write the copied data back without holding up the guest; the
            # flush under the lock then has little left to do. _io keeps a
            # cancel from closing the target's descriptor under the sync.
            with self._io:
                if self._target is None:
                    return
                os.fdatasync(target.layers[0].fd)
            with disk.lock:
                if self.state is State.COPYING:
                    target.flush()
                    self.stats.passes = 1
                    self.stats.time_to_ready_s = time.monotonic() - self._t0
                    self._set(State.READY)
        except Exception as e:          # noqa: BLE001 - the job fails, the disk serves on
            with disk.lock:
                self._fail(e)

    def _remap(self, cluster: int, entry: int) -> None:
        """Into mode, under the disk lock: the target's cluster now is entry.

        Slots of the served map that read that cluster from the target image
        (compressed or data, where the layers above hold nothing) move with
        it, so the old host cluster is referenced by nobody once the target
        frees it at its next flush, and may be reused.
        """
        disk, target = self.disk, self._target
        assert target is not None and target.top is not None
        per = target.top.cs // disk.map.g
        first = cluster * per
        tag = (len(disk.layers) - self.collapse) << LAYER_SHIFT
        disk.map.retarget(first, min(first + per, disk.map.nslots), tag, entry)

    def mirror_write(self, data: memoryview, offset: int) -> None:
        """Called under the disk lock after the top took the write."""
        self._mirror(offset, len(data), lambda t: t.write(data, offset))

    def mirror_zero(self, length: int, offset: int) -> None:
        self._mirror(offset, length, lambda t: t.zero(length, offset, may_trim=True))

    def _mirror(self, offset: int, length: int, op: Callable[[Disk], None]) -> None:
        if not self.new_path:
            # the target is in the served chain: from now on its data may show
            # through wherever the top has nothing, so a later zero of these
            # clusters must use the zero flag, never just unallocate
            g = self.disk.map.g
            self.disk.map.mark_backing(offset // g, -(-(offset + length) // g))
        try:
            assert self._target is not None
            op(self._target)
            self.stats.bytes_mirrored += length
        except Exception as e:          # noqa: BLE001
            self._fail(e)

    # -- end states -------------------------------------------------------------

    def complete(self, persist: Persist | None = None) -> list[str]:
        """Pivot: the disk serves the target chain. Returns images no longer used."""
        disk = self.disk
        with disk.lock:
            if self.state is not State.READY:
                raise RequestError(disk.path, f"the job is {self.state.value}, not ready")
            self._set(State.PIVOTING)
            t0 = time.monotonic()
            target = self._target
            assert target is not None
            try:
                # a barrier first: the disk lock stays held from here to the
                # switch, so no request (nor a read outside the lock) runs
                # between the last flush of the target and the new chain
                disk.drain_reads()
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
            return self.dropped

    def cancel(self) -> None:
        with self.disk.lock:
            if self.state not in ACTIVE:
                raise RequestError(self.disk.path, f"the job is {self.state.value}")
            self._release_target()
            self._set(State.CANCELLED)

    def _fail(self, e: BaseException) -> None:
        """Called under the disk lock: abandon the target, keep serving the chain."""
        if self.state not in (*ACTIVE, State.PIVOTING):
            return
        self.error = str(e)
        self._release_target()
        self._set(State.FAILED)

    def _release_target(self) -> None:
        disk, target = self.disk, self._target
        disk.job = None
        self.stats.duration_s = time.monotonic() - self._t0
        if target is None:
            return
        with self._io:                  # no sync of the copy thread still under way
            if target.top is not None and not self.new_path:
                try:                    # an image of the chain: what it holds stays whole
                    target.top.flush()
                except OSError:
                    pass                # (a failing target: leaks at worst)
            target.layers[0].close()
            self._target = None
        if self.new_path:
            os.unlink(self.new_path)
        else:
            orig = disk.layers[self.collapse]
            locking.lock_for_read(orig.fd, orig.path)

    def _set(self, state: State) -> None:
        with self._cond:
            self.state = state
            self._cond.notify_all()
        self._notify(state)

    def _notify(self, state: State) -> None:
        if self.on_change is not None:
            self.on_change(self, state)

    def wait(self, states: tuple[State, ...], timeout: float) -> State:
        """Wait until the job reaches one of states (or an end state); bounded."""
        end = (*states, State.DONE, State.CANCELLED, State.FAILED)
        with self._cond:
            self._cond.wait_for(lambda: self.state in end, timeout)
            return self.state

    def info(self) -> dict:
        return {"state": self.state.value, "target": self.target_path, "error": self.error,
                "collapse": self.collapse, "dropped": self.dropped, **asdict(self.stats)}
