"""Where a guest change goes while a mirror job runs: the top, the target, or both.

A mixin of MirrorJob (mirror.py). The disk calls it under its lock, once no
copy in flight overlaps the change (wait_for_copies). Each whole cluster of
the top a change touches takes one route:

    top cluster                          route
    -----------------------------------  -----------------------------------
    in the copy set, ahead of the copy   the top alone: the copy reads it later
    behind the copy (copied), held       both: the top, then the target
    not held by the top (into mode,      the target alone: the served chain
      collapse 1: handed down, or never  reads it there, through the top,
      written)                           which holds nothing there
    anything else                        both

Into mode with one collapsed layer (the top onto the image below it) the
copy hands down what it copied: once the target's data is synced, the top
lets go of the clusters copied (copy pass, mirrorcopy.py), so the guest's
later writes there go to the target alone, and are written once. The chain
reads the same at every step: the top's entry goes only after the target
holds the cluster durably, and a write goes to the target alone only where
the top holds nothing, where the served chain reads the target already.
What the guest writes to the target alone is then in the disk's chain like
anything else it wrote: a guest flush syncs the target first
(before_flush), a cancel or failure flushes and keeps it (release_target),
and a write the target refuses goes to the top instead (the job fails).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable

from .clustermap import KIND_COMPRESSED, LAYER_SHIFT, PAYLOAD_MASK, SLOT_BITS, SLOT_MASK
from .disk import Disk
from .errors import NotFast
from .image import COPIED, OFFSET_MASK, ZERO_FLAG
from .mirrorstate import Stats

TOP, BOTH, TARGET = "top", "both", "target"
Route = tuple[int, int, str]            # (guest offset, length, where)


def _write(target: Disk, data: memoryview, offset: int) -> None:
    """Disk.write without its checks: the served disk made them (same size)."""
    with target.lock:
        target.write_top(data, offset)


class Routes:
    disk: Disk
    collapse: int
    new_path: str | None
    stats: Stats
    _target: Disk | None
    _copy_set: list[tuple[int, int]]
    _mirroring: bool
    _fail: Callable[[BaseException], None]

    # set under the disk lock by the job: the copy set's range starts, the
    # first slot the copy has not claimed yet (copy-set slots below it are
    # copied), whether the target is in the served chain and takes writes
    # alone, and a count of guest changes (the copy's pacing)
    _starts: list[int]
    _copied_to: int
    _direct: bool
    _changes: int

    # -- routes ------------------------------------------------------------

    def _routes(self, offset: int, length: int) -> list[Route]:
        """Under the disk lock: the pieces of [offset, offset + length) and
        their routes, cut at the top's cluster boundaries."""
        disk = self.disk
        top = disk.top
        assert top is not None
        cs, g = top.cs, disk.map.g
        per = cs // g
        end = offset + length
        out: list[Route] = []
        pos = offset
        while pos < end:
            c = pos // cs
            stop = min(end, (c + 1) * cs)
            if self._direct and not top.entry(c) & ~COPIED:
                how = TARGET
            elif c * per >= self._copied_to and self._in_copy_set(c * per, (c + 1) * per):
                how = TOP
            else:
                how = BOTH
            if out and out[-1][2] == how:
                out[-1] = (out[-1][0], stop - out[-1][0], how)
            else:
                out.append((pos, stop - pos, how))
            pos = stop
        return out

    def _in_copy_set(self, first: int, end: int) -> bool:
        """Whether slots [first, end) lie in one range of the copy set."""
        i = bisect_right(self._starts, first) - 1
        return i >= 0 and end <= self._copy_set[i][1]

    # -- guest changes -------------------------------------------------------

    def guest_write(self, data: memoryview, offset: int) -> None:
        self._changes += 1
        for off, n, how in self._routes(offset, len(data)):
            part = data[off - offset:off - offset + n]
            if how == TARGET and self._alone(off, n, lambda t, p=part, o=off: _write(t, p, o)):
                continue
            self.disk.write_top(part, off)
            if how == BOTH:
                self._mirror(off, n, lambda t, p=part, o=off: t.write(p, o))

    def guest_zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        self._changes += 1
        routes = self._routes(offset, length)
        if fast:                # (the target's part of a mirrored zero need not be fast)
            target = self._target
            for off, n, how in routes:
                d = target if how == TARGET and target is not None else self.disk
                if not d.zero_is_fast(n, off, may_trim):
                    raise NotFast(self.disk.path, "zeroing this range needs writing zeros")
        for off, n, how in routes:
            if how == TARGET and self._alone(
                    off, n, lambda t, n=n, o=off: t.zero(n, o, may_trim=may_trim)):
                continue
            self.disk.zero_top(n, off, may_trim)
            if how == BOTH:
                self._mirror(off, n, lambda t, n=n, o=off: t.zero(n, o, may_trim=True))

    def guest_trim(self, length: int, offset: int) -> None:
        """A trim makes the top's whole clusters read zeros where it
        deallocates them; the target alone zeroes the same clusters."""
        self._changes += 1
        for off, n, how in self._routes(offset, length):
            if how == TARGET:
                lo, k = self.disk.whole_clusters(n, off)
                if not k or self._alone(lo, k, lambda t, k=k, o=lo: t.zero(k, o, may_trim=True)):
                    continue
            for lo, k in self.disk.trim_top(n, off):
                if how == BOTH:
                    self._mirror(lo, k, lambda t, k=k, o=lo: t.zero(k, o, may_trim=True))

    def _alone(self, offset: int, length: int, op: Callable[[Disk], None]) -> bool:
        """A change for the target alone; False if there is no target (any
        more), or it failed (the job with it): then the top takes it."""
        target = self._target
        if not self._mirroring or target is None:
            return False
        try:
            op(target)
        except Exception as e:          # noqa: BLE001 - the job fails, the guest does not
            self._fail(e)
            return False
        g = self.disk.map.g
        first, end = offset // g, -(-(offset + length) // g)
        # the served map reads the target's clusters there, whatever it read
        # before: an in-place write tells the map nothing, and a slot may
        # read zeros through another entry (a zero in the top after an
        # earlier job, the target's growth)
        self._show_target(first, end)
        # the target holds data there now: a zero in the top after the job
        # must use the zero flag there, never just unallocate
        self.disk.map.mark_backing(first, end)
        self.stats.bytes_mirrored += length
        self.stats.bytes_direct += length
        return True

    def _mirror(self, offset: int, length: int, op: Callable[[Disk], None]) -> None:
        """A change the top took, for the target too."""
        target = self._target
        if not self._mirroring or target is None:
            return
        if not self.new_path:
            # the target is in the served chain: from now on its data may show
            # through wherever the top has nothing, so a later zero of these
            # clusters must use the zero flag, never just unallocate
            g = self.disk.map.g
            self.disk.map.mark_backing(offset // g, -(-(offset + length) // g))
        try:
            op(target)
            self.stats.bytes_mirrored += length
        except Exception as e:          # noqa: BLE001
            self._fail(e)

    def before_flush(self) -> None:
        """Under the disk lock, before the top's flush: the target's data
        written back, when it holds guest writes the top does not."""
        if self._direct and self._target is not None and self._target.top is not None:
            try:
                self._target.top.fsync_data()
            except OSError as e:
                self._lost_sync(e)
                self._fail(e)
                raise

    def _lost_sync(self, e: OSError) -> None:
        """A sync of the target failed. Once it holds guest data the top does
        not (writes to it alone, clusters handed down), the guest's next
        flush reports it: a later sync of the same file would succeed (the
        kernel reports a writeback error once) without the data."""
        if self.stats.bytes_direct or self.stats.bytes_handed_down:
            self.disk.flush_error = e

    # -- the served map ------------------------------------------------------

    def _show_target(self, first: int, end: int) -> None:
        """Under the disk lock: served slots [first, end) the top does not
        hold read what the target chain reads there (its map's entries, in
        the served map's slots; the layers below the target are numbered
        alike in both)."""
        disk, target = self.disk, self._target
        top = disk.top
        assert target is not None and top is not None
        m, tm = disk.map, target.map
        g, tg = m.g, tm.g
        tper = top.cs // g
        moved: dict[int, int] = {}      # target's compressed index -> the served map's
        for s in range(first, end):
            if top.entry(s // tper) & ~COPIED:
                continue
            ts, within = divmod(s * g, tg)
            e = tm.get(ts)
            if e & KIND_COMPRESSED:
                index = (e & PAYLOAD_MASK) >> SLOT_BITS
                if index not in moved:
                    moved[index] = len(m.compressed)
                    m.compressed.append(tm.compressed[index])
                at = (e & SLOT_MASK) * tg + within          # bytes into its cluster
                e = (e >> LAYER_SHIFT << LAYER_SHIFT | KIND_COMPRESSED |
                     moved[index] << SLOT_BITS | at // g)
            elif e:
                e += within
            m.set(s, e)

    def _remap(self, cluster: int, entry: int) -> None:
        """Into mode, under the disk lock: the target's cluster now is entry.

        Slots of the served map that read that cluster from the target image
        (compressed or data, where the layers above hold nothing) move with
        it, so the old host cluster is referenced by nobody once the target
        frees it at its next flush, and may be reused. Once the target takes
        writes alone, every slot the top does not hold reads the target's
        new entry (the target may not have held it before).
        """
        disk = self.disk
        g = disk.map.g
        per = disk.layers[self.collapse].cluster_size // g     # (the target's)
        first = cluster * per
        end = min(first + per, disk.map.nslots)
        tag = (len(disk.layers) - self.collapse) << LAYER_SHIFT
        if not self._direct:
            disk.map.retarget(first, end, tag, entry)
            return
        self._show_target(first, end)   # (the target's map has the new entry)
        if entry & OFFSET_MASK and not entry & ZERO_FLAG:
            disk.map.mark_backing(first, end)   # (the target holds data there now)
