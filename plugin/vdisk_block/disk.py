"""A disk: a chain of images served as one block device.

Reads go through the cluster map to whichever layer holds each slot. Writes
go to the top image: in place where the top owns the cluster, otherwise into
freshly allocated clusters filled with the current guest view around the
written bytes (copy-on-write):

    guest cluster   |<------------- cluster ------------->|
    request                 |=========== data ===========|
    new cluster     [ COW: current view ][   data    ][COW]

Zero and trim work on whole clusters through L2 entries and fall back to
writing zeros for partial clusters.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .clustermap import (
    CHUNK_BITS,
    CHUNK_MASK,
    KIND_COMPRESSED,
    LAYER_SHIFT,
    PAYLOAD_MASK,
    SLOT_BITS,
    SLOT_MASK,
    ClusterMap,
)
from .errors import NotFast, RequestError
from .image import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG, Qcow2File, RawFile
from .top import TopImage

EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3      # nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


class MirrorHooks(Protocol):
    """A running mirror job: it takes every change of the guest view (the
    disk lock held, overlapping copies waited for) and routes it to the top,
    the target or both (mirrorroute.py)."""

    def wait_for_copies(self, offset: int, length: int) -> bool:
        """Under the disk lock, before a change of [offset, offset + length):
        wait while a copy in flight overlaps it (the lock is released
        meanwhile). Returns whether it waited."""
        ...

    def guest_write(self, data: memoryview, offset: int) -> None: ...

    def guest_zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None: ...

    def guest_trim(self, length: int, offset: int) -> None: ...

    def before_flush(self) -> None:
        """Under the disk lock, before the top's flush: what the guest wrote
        to the target alone durable."""
        ...


@dataclass
class Placement:
    """Where data for [offset, offset + length) goes in the top file, written
    outside the lock by the one who asked (see Disk.place)."""

    fd: int
    pieces: list[tuple[int, int, int]]      # (guest offset, length, host offset)
    new: list[tuple[int, int, int]]         # clusters allocated: (first, count, host)


def _in_place(e: int) -> bool:
    """A top cluster that can be overwritten where it is."""
    return bool(e & COPIED and e & OFFSET_MASK and not e & (COMPRESSED | ZERO_FLAG))


def chain_map(layers: list[Qcow2File | RawFile], top: TopImage | None) -> ClusterMap:
    """The map of a chain (top first) as it is on disk, at the top's size;
    a writable top's L2 tables are those it holds in memory."""
    if top is not None:
        top.f.file_size = os.fstat(top.fd).st_size      # it grew since it opened
    sizes = [f.cluster_size for f in layers if f.cluster_size]
    cmap = ClusterMap(layers[0].size, min(sizes) if sizes else 65536, layers[0].path)
    for j in range(len(layers) - 1):
        cmap.apply_layer(j, layers[-1 - j])
    cmap.freeze_backing()
    tables = None if top is None else [(i, 0, l2) for i, l2 in top.l2.items()]
    cmap.apply_layer(len(layers) - 1, layers[0], tables)
    return cmap


class Disk:
    def __init__(self, layers: list[Qcow2File | RawFile], readonly: bool) -> None:
        self.readonly = readonly
        top: TopImage | None = None
        if not readonly:
            assert isinstance(layers[0], Qcow2File)
            top = TopImage(layers[0])
        cmap = chain_map(layers, top)
        self.lock = threading.RLock()
        # reads running outside the disk lock (concurrent_reads): counted under
        # their own lock, so that a drain can wait for them while it keeps the
        # disk lock (and with it every new request) to itself
        self._inflight_lock = threading.Lock()
        self._idle = threading.Condition(self._inflight_lock)
        self._inflight = 0
        self.concurrent_reads = False     # set when nbdkit runs requests in parallel
        self.job: MirrorHooks | None = None
        # a sync of data the chain needs failed where no flush of this disk
        # would see it (a job's target): the next flush reports it
        self.flush_error: OSError | None = None
        # told of every move of a top cluster (c, new L2 entry): a consolidation
        # target whose clusters another disk's map reads directly
        self.on_remap: Callable[[int, int], None] | None = None
        self.set_chain(layers, cmap, top)

    def set_chain(self, layers: list[Qcow2File | RawFile], cmap: ClusterMap,
                  top: TopImage | None) -> None:
        """Serve this chain (top first) through this map and writable top.

        The one place a disk's chain changes (open, snapshot, pivot): every
        field derived from the chain is rebuilt here. Called under the lock,
        with no read in flight outside it (drain_reads).
        """
        self.layers = layers
        self.path = layers[0].path
        self.size = layers[0].size
        self.map = cmap
        self._g = cmap.g                      # a power of two
        self._gbits = self._g.bit_length() - 1
        self._gmask = self._g - 1
        # per layer id (0 = base): descriptor and the end of its visible data
        self._fds = [f.fd for f in reversed(layers)]
        self.limits = []
        limit = self.size
        for f in layers:
            limit = min(limit, f.size)
            self.limits.insert(0, limit)
        self.top = top
        self.top_tag = len(layers) << LAYER_SHIFT
        self.cluster_size = layers[0].cluster_size or cmap.g
        self._zcache: tuple[int, bytes] | None = None

    def layer(self, e: int) -> Qcow2File | RawFile:
        """The file a map entry points into."""
        return self.layers[len(self.layers) - (e >> LAYER_SHIFT)]

    # -- helpers ------------------------------------------------------------

    def _check(self, length: int, offset: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RequestError(self.path, f"request [{offset}, {offset + length}) is outside "
                               f"the disk (size {self.size})", errno=errno.EINVAL)

    def _writable(self) -> TopImage:
        if self.top is None:
            raise RequestError(self.path, "the disk is read-only", errno=errno.EROFS)
        return self.top

    def _decompressed(self, e: int) -> bytes:
        index = (e & PAYLOAD_MASK) >> SLOT_BITS
        key = (e >> LAYER_SHIFT) << 48 | index
        if self._zcache and self._zcache[0] == key:
            return self._zcache[1]
        f = self.layer(e)
        assert isinstance(f, Qcow2File)
        data = f.read_compressed(self.map.compressed[index])
        self._zcache = (key, data)
        return data

    def _runs(self, offset: int, n: int) -> list[tuple[int, int, int, int]]:
        """The guest view of [offset, offset + n) as runs (pos, length, map entry,
        offset within the entry's first slot); entry 0 reads zeros (caller holds
        the lock)."""
        out = []
        g = self.map.g
        pos = 0
        while pos < n:
            slot, within = divmod(offset + pos, g)
            e, k = self.map.run(slot, -(-(within + n - pos) // g))
            length = min(k * g - within, n - pos)
            if e:
                limit = self.limits[(e >> LAYER_SHIFT) - 1] - offset
                if pos + length > limit:  # beyond the virtual size of a backing layer
                    cut = max(pos, limit)
                    if cut > pos:
                        out.append((pos, cut - pos, e, within))
                    out.append((cut, pos + length - cut, 0, 0))
                    pos += length
                    continue
            out.append((pos, length, e, within))
            pos += length
        return out

    def _read(self, mv: memoryview, offset: int) -> None:
        """Fill mv with the guest view at offset (caller holds the lock)."""
        g = self.map.g
        for pos, length, e, within in self._runs(offset, len(mv)):
            if not e:
                mv[pos:pos + length] = bytes(length)
            elif e & KIND_COMPRESSED:
                start = (e & SLOT_MASK) * g + within
                mv[pos:pos + length] = self._decompressed(e)[start:start + length]
            else:
                got = os.preadv(self._fds[(e >> LAYER_SHIFT) - 1], [mv[pos:pos + length]],
                                (e & PAYLOAD_MASK) + within)
                if got < length:          # data cluster cut short by the end of the file
                    mv[pos + got:pos + length] = bytes(length - got)

    def locate(self, offset: int, length: int) -> list[tuple[int, int, int, int]] | None:
        """Where the guest view of [offset, offset + length) lies, for a reader
        outside the lock: (pos, length, fd, host offset) pieces, fd -1 for zeros
        (a piece may also end early in its file: zeros beyond). None if a part is
        compressed. Called under the lock; the pieces stay valid while nothing
        changes the range (a mirror job keeps guest changes of a range it copies
        waiting, see wait_for_copies)."""
        out = []
        for pos, n, e, within in self._runs(offset, length):
            if e & KIND_COMPRESSED:
                return None
            if not e:
                out.append((pos, n, -1, 0))
            else:
                out.append((pos, n, self._fds[(e >> LAYER_SHIFT) - 1],
                            (e & PAYLOAD_MASK) + within))
        return out

    # -- reads --------------------------------------------------------------

    def pread_into(self, buf: bytearray | memoryview, offset: int) -> None:
        n = len(buf)
        fd = -1
        with self.lock:
            # Fast path, the common small random read: one slot of plain data
            # (the map's get() inlined: this runs once per NBD read). The
            # geometry is read under the lock: a pivot may change it.
            # With concurrent_reads (nbdkit's parallel thread model) the preadv
            # runs outside the lock, counted in _inflight so that no descriptor
            # is closed under it.
            within = offset & self._gmask
            if within + n <= self._g and 0 <= offset and offset + n <= self.size:
                slot = offset >> self._gbits
                c = self.map.chunks[slot >> CHUNK_BITS]
                e = 0 if c is None else c[slot & CHUNK_MASK]
                if e and not e & KIND_COMPRESSED:
                    layer = (e >> LAYER_SHIFT) - 1
                    if offset + n <= self.limits[layer]:
                        fd = self._fds[layer]
                        if not self.concurrent_reads:
                            if os.preadv(fd, [buf], (e & PAYLOAD_MASK) + within) == n:
                                return
                            fd = -1
                        else:
                            with self._inflight_lock:
                                self._inflight += 1
        if fd >= 0:                       # concurrent_reads: outside the lock
            try:
                got = os.preadv(fd, [buf], (e & PAYLOAD_MASK) + within)
            finally:
                with self._inflight_lock:
                    self._inflight -= 1
                    if not self._inflight:
                        self._idle.notify_all()
            if got == n:
                return
        mv = memoryview(buf).cast("B")
        self._check(len(mv), offset)
        with self.lock:
            self._read(mv, offset)

    def drain_reads(self, timeout: float = 30.0) -> None:
        """Wait until no read runs outside the lock, before a descriptor is closed
        or the chain changes. The caller holds the disk lock and keeps it: no new
        request of any kind starts meanwhile (a barrier, not a pause)."""
        with self._idle:
            done = self._idle.wait_for(lambda: not self._inflight, timeout)
        if not done:
            raise RequestError(self.path, f"reads still in flight after {timeout} s")

    def read(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.pread_into(buf, offset)
        return bytes(buf)

    def extents(self, length: int, offset: int) -> list[tuple[int, int, int]]:
        """base:allocation extents covering [offset, offset + length)."""
        self._check(length, offset)
        g, m = self.map.g, self.map
        out: list[tuple[int, int, int]] = []
        end = offset + length
        last = -(-end // g)
        with self.lock:
            pos = offset
            while pos < end:
                slot = pos // g
                if m.get(slot):
                    k, flags = m.data_run_length(slot, last - slot), EXTENT_DATA
                else:
                    k, flags = m.zero_run_length(slot, last - slot), EXTENT_HOLE_ZERO
                stop = min((slot + k) * g, end)
                out.append((pos, stop - pos, flags))
                pos = stop
        return out

    # -- writes -------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        mv = memoryview(data).cast("B")
        self._check(len(mv), offset)
        if not mv:
            return
        with self.lock:
            if self._job_takes(offset, len(mv)):
                assert self.job is not None
                self.job.guest_write(mv, offset)
            else:
                self.write_top(mv, offset)

    def _job_takes(self, offset: int, length: int) -> bool:
        """Under the lock, before a change: whether a running job routes it
        (after any copy in flight that overlaps it has landed)."""
        if self.job is None:
            return False
        self._wait_for_copies(offset, length)
        return self.job is not None

    def _wait_for_copies(self, offset: int, length: int) -> None:
        """Before changing [offset, offset + length) while a job runs: wait until
        no copy in flight overlaps it. The lock is released while waiting, so
        the caller takes top and job only afterwards."""
        while (job := self.job) is not None and job.wait_for_copies(offset, length):
            pass

    def write_top(self, mv: memoryview, offset: int) -> None:
        """Under the lock: write into the top (the change of a job's route too)."""
        self._write_top(self._writable(), mv, offset)

    def _write_top(self, top: TopImage, mv: memoryview, offset: int) -> None:
        top.begin_write()
        c = offset // top.cs
        last = (offset + len(mv) - 1) // top.cs
        while c <= last:
            if _in_place(top.entry(c)):
                c = self._write_in_place(top, c, last, mv, offset)
            else:
                c = self._write_allocating(top, c, last, mv, offset)

    @staticmethod
    def _in_place_run(top: TopImage, c: int, last: int) -> tuple[int, int]:
        """(end, host) of the run of top clusters from c (at most to last) that
        can be overwritten where they are, contiguous on the host."""
        host = top.entry(c) & OFFSET_MASK
        run = c + 1
        while run <= last and top.entry(run) == (host + (run - c) * top.cs) | COPIED:
            run += 1
        return run, host

    @staticmethod
    def _new_run(top: TopImage, c: int, last: int) -> int:
        """End of the run of clusters from c (at most to last) the top does not own."""
        run = c + 1
        while run <= last and not _in_place(top.entry(run)):
            run += 1
        return run

    def _write_in_place(self, top: TopImage, c: int, last: int, mv: memoryview,
                        offset: int) -> int:
        """Overwrite a run of top clusters that are contiguous on the host."""
        cs = top.cs
        run, host = self._in_place_run(top, c, last)
        lo = max(offset, c * cs)
        hi = min(offset + len(mv), run * cs)
        self._pwrite(top, mv[lo - offset:hi - offset], host + lo - c * cs)
        return run

    def _write_allocating(self, top: TopImage, c: int, last: int, mv: memoryview,
                          offset: int) -> int:
        """Write a run of clusters the top does not own into new clusters."""
        cs = top.cs
        run = self._new_run(top, c, last)
        count = run - c
        gstart, gend = c * cs, min(run * cs, self.size)
        lo, hi = max(offset, gstart), min(offset + len(mv), gend)
        # whole clusters: nothing to copy on write. A last cluster the disk's
        # end cuts short is not whole: its tail is written as zeros, or a
        # reused cluster would show what it held once the disk grows.
        if lo == gstart and hi == run * cs:
            bv = mv[lo - offset:hi - offset]
        else:
            bv = memoryview(bytearray(count * cs))
            if lo > gstart:
                self._read(bv[:lo - gstart], gstart)
            if hi < gend:
                self._read(bv[hi - gstart:gend - gstart], hi)
            bv[lo - gstart:hi - gstart] = mv[lo - offset:hi - offset]
        host = top.refcounts.allocate(count)
        try:
            self._pwrite(top, bv, host)
        except BaseException:
            top.refcounts.undo_allocate(host, count)
            raise
        for i in range(count):
            self._set_top(top, c + i, (host + i * cs) | COPIED)
        return run

    def _pwrite(self, top: TopImage, data: memoryview, host: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(top.fd, data[done:], host + done)
        top.data_dirty = True

    def place(self, offset: int, length: int) -> Placement | None:
        """Host places for writing [offset, offset + length) as plain data outside
        the lock: clusters the top owns, and whole clusters allocated now. None
        if a cluster would need copy-on-write (then write under the lock).

        Called under the lock. The caller writes the pieces without the lock,
        then calls link() (or unplace() if it could not write) under the lock;
        meanwhile nobody else may change the range (a mirror job's copy: guest
        changes of it wait, see wait_for_copies).
        """
        top = self._writable()
        top.begin_write()
        cs = top.cs
        end = offset + length
        c, last = offset // cs, (end - 1) // cs
        p = Placement(top.fd, [], [])
        while c <= last:
            if _in_place(top.entry(c)):
                run, host = self._in_place_run(top, c, last)
                lo, hi = max(offset, c * cs), min(end, run * cs)
                p.pieces.append((lo, hi - lo, host + lo - c * cs))
            else:
                run = self._new_run(top, c, last)
                gstart, gend = c * cs, run * cs
                if offset > gstart or end < gend:     # (the tail past the disk's
                    self.unplace(p)                   # end too: written as zeros)
                    return None
                host = top.refcounts.allocate(run - c)
                p.new.append((c, run - c, host))
                p.pieces.append((gstart, gend - gstart, host))
            c = run
        top.data_dirty = True
        return p

    def link(self, p: Placement) -> None:
        """Under the lock, once the data of p is written: the new clusters take
        their place in the top."""
        top = self._writable()
        top.data_dirty = True
        for c, count, host in p.new:
            for i in range(count):
                self._set_top(top, c + i, (host + i * top.cs) | COPIED)

    def unplace(self, p: Placement) -> None:
        """Under the lock: give back the clusters place() allocated for p."""
        top = self._writable()
        for _c, count, host in p.new:
            top.refcounts.undo_allocate(host, count)
        p.new.clear()

    def _set_top(self, top: TopImage, c: int, new: int) -> None:
        """Replace the top's entry for cluster c and keep the map in step."""
        old = top.entry(c)
        if old == new:
            return
        top.set_entry(c, new)
        if old & COMPRESSED or (old & OFFSET_MASK and old & OFFSET_MASK != new & OFFSET_MASK):
            top.release(old)
        # new == 0 is only set where the backing holds no data: the slots read zeros
        per = top.cs // self.map.g
        first = c * per
        end = min(first + per, self.map.nslots)
        self.map.set_cluster(first, per, self.top_tag, new if new & ~COPIED else ZERO_FLAG, end)
        if self.on_remap is not None:
            self.on_remap(c, new)

    def _full_clusters(self, top: TopImage, length: int, offset: int) -> tuple[int, int]:
        """[first, end) of the clusters that [offset, offset + length) covers whole.

        A last cluster cut short by the virtual size counts as whole when the
        request reaches the end of the disk.
        """
        cs = top.cs
        first = -(-offset // cs)
        stop = offset + length
        end = -(-self.size // cs) if stop >= self.size else stop // cs
        return first, max(first, end)

    def zero(self, length: int, offset: int, may_trim: bool = False, fast: bool = False) -> None:
        self._check(length, offset)
        with self.lock:
            if self._job_takes(offset, length):
                assert self.job is not None
                self.job.guest_zero(length, offset, may_trim, fast)
            else:
                self.zero_top(length, offset, may_trim, fast)

    def _zero_plan(self, top: TopImage, length: int, offset: int,
                   may_trim: bool) -> tuple[int, int, list[tuple[int, int]], set[int]]:
        """How the top zeroes [offset, offset + length): the whole clusters
        [first, end), the partial pieces that must be written (unless they read
        zeros already), and the clusters of first..end that need zeros written."""
        cs = top.cs
        first, end = self._full_clusters(top, length, offset)
        partial = []
        if first >= end:
            partial.append((offset, length))
        else:
            if offset < first * cs:
                partial.append((offset, first * cs - offset))
            if offset + length > end * cs:
                partial.append((end * cs, offset + length - end * cs))
        partial = [p for p in partial if not self._reads_zero(*p)]
        slow = {c for c in range(first, end) if self._zero_needs_write(top, c, may_trim)}
        return first, end, partial, slow

    def zero_is_fast(self, length: int, offset: int, may_trim: bool) -> bool:
        """Under the lock: whether zeroing the range needs no zeros written."""
        _first, _end, partial, slow = self._zero_plan(self._writable(), length, offset, may_trim)
        return not partial and not slow

    def zero_top(self, length: int, offset: int, may_trim: bool = False,
                 fast: bool = False) -> None:
        """Under the lock: zero the range in the top."""
        top = self._writable()
        cs = top.cs
        first, end, partial, slow = self._zero_plan(top, length, offset, may_trim)
        if fast and (partial or slow):
            raise NotFast(self.path, "zeroing this range needs writing zeros")
        top.begin_write()
        for c in range(first, end):
            if c not in slow:
                self._zero_cluster(top, c, may_trim)
        for c in sorted(slow):
            self._write_top(top, memoryview(bytes(min(cs, self.size - c * cs))), c * cs)
        for off, n in partial:
            self._write_top(top, memoryview(bytes(n)), off)

    def _reads_zero(self, offset: int, length: int) -> bool:
        g = self.map.g
        return self.map.is_zero(offset // g, (offset + length - 1) // g - offset // g + 1)

    def _zero_needs_write(self, top: TopImage, c: int, may_trim: bool) -> bool:
        """v2 images have no zero flag: zeros must be written over backing data."""
        if top.v3:
            return False
        per = top.cs // self.map.g
        e = top.entry(c)
        if self.map.backing_has_data(c * per, per):
            return True
        return bool(e & OFFSET_MASK and not may_trim and
                    not self._reads_zero(c * top.cs, min(top.cs, self.size - c * top.cs)))

    def _zero_cluster(self, top: TopImage, c: int, may_trim: bool) -> None:
        per = top.cs // self.map.g
        e = top.entry(c)
        below = self.map.backing_has_data(c * per, per)
        if top.v3 and _in_place(e) and not may_trim:
            new = (e & OFFSET_MASK) | ZERO_FLAG | COPIED       # keep the allocation
        elif top.v3 and not e & COMPRESSED and e & ZERO_FLAG and e & OFFSET_MASK and \
                not may_trim:           # (bit 0 of a compressed entry is its offset's)
            new = e
        elif below:
            new = ZERO_FLAG
        else:
            new = 0
        self._set_top(top, c, new)

    def trim(self, length: int, offset: int) -> None:
        """Deallocate whole clusters; they read as zeros afterwards (see docs)."""
        self._check(length, offset)
        with self.lock:
            if self._job_takes(offset, length):
                assert self.job is not None
                self.job.guest_trim(length, offset)
            else:
                self.trim_top(length, offset)

    def trim_top(self, length: int, offset: int) -> list[tuple[int, int]]:
        """Under the lock: trim the whole top clusters of the range; returns
        the (offset, length) of each one trimmed."""
        top = self._writable()
        per = top.cs // self.map.g
        first, end = self._full_clusters(top, length, offset)
        done = []
        for c in range(first, end):
            below = self.map.backing_has_data(c * per, per)
            if below and not top.v3:
                continue
            top.begin_write()
            self._set_top(top, c, ZERO_FLAG if below else 0)
            done.append((c * top.cs, min(top.cs, self.size - c * top.cs)))
        return done

    def whole_clusters(self, length: int, offset: int) -> tuple[int, int]:
        """Under the lock: the byte range of the top clusters that
        [offset, offset + length) covers whole (what a trim trims)."""
        top = self._writable()
        first, end = self._full_clusters(top, length, offset)
        if first >= end:
            return offset, 0
        return first * top.cs, min(end * top.cs, self.size) - first * top.cs

    def flush(self) -> None:
        with self.lock:
            if self.flush_error is not None:
                e, self.flush_error = self.flush_error, None
                raise RequestError(self.path, f"data written earlier may be lost: {e}",
                                   errno=errno.EIO)
            if self.job is not None:
                self.job.before_flush()
            if self.top is not None:
                if self.top.refcounts.pending_free:
                    # the flush frees clusters the top stopped using: no read
                    # outside the lock may still be reading one (concurrent_reads)
                    self.drain_reads()
                self.top.flush()

    def close(self) -> None:
        with self.lock:
            try:
                self.drain_reads()
                self.flush()
            finally:
                for f in self.layers:
                    f.close()
