"""Refcount table of a writable qcow2 image: allocation and crash-safe updates.

The whole refcount array lives in memory (one integer per host cluster); the
on-disk table and blocks are rewritten from it at flush time, in an order that
keeps every crash point consistent for ``qemu-img check``:

    increments  ->  [data + refcount blocks] fsync
                ->  [refcount table] fsync  ->  [header pointer] fsync
    references  ->  [L2 tables] fsync  ->  [L1 entries] fsync      (caller)
    decrements  ->  [refcount blocks] fsync                       (release_pending)

A cluster is referenced on disk only after its refcount is on disk, and its
refcount drops only after no reference to it is left on disk: a crash can
leak clusters, never leave a referenced cluster with refcount 0. Freed clusters
are not reused before the flush that drops their refcount, so no data write
can land in a cluster that an on-disk L2 entry still points to.

Clusters are handed out from a reserve whose refcounts are already on disk
(synced when the reserve is made): the top may then write an L2 entry for a
new cluster into the file at once (top.py), so a write acknowledged and not
yet flushed survives the death of the process, and no power loss can leave
that entry pointing at a cluster with refcount 0. The reserve grows from
RESERVE_MIN to RESERVE_MAX clusters at a time between flushes; what is left
of it goes back at each flush, with the deferred frees (a crash leaks at
most that much; a flushed image checks clean).
"""

from __future__ import annotations

import os
import sys
from array import array

from . import header as hdr
from .errors import MalformedImage

_ARRAY_CODE = {8: "B", 16: "H", 32: "I", 64: "Q"}
RESERVE_MIN = 8
RESERVE_MAX = 256


def decode_block(raw: bytes, bits: int) -> list[int]:
    """Refcounts of one block; sub-byte widths are packed LSB first (QEMU)."""
    if bits >= 8:
        a = array(_ARRAY_CODE[bits], raw)
        if bits > 8:
            a.byteswap()
        return a.tolist()
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(b >> (i * bits)) & mask for b in raw for i in range(per_byte)]


_NONZERO = bytes([0] + [1] * 255)


def decode_wide(raw: bytes, width: int) -> tuple[array, bytes]:
    """Big-endian refcounts of ``width`` bytes each, as a native array("Q")
    and one byte per count, 1 where it is not zero: moved a byte column at a
    time (slices in C), not a count at a time."""
    n = len(raw) // width
    wide = bytearray(8 * n)
    for j in range(width):              # j: the count's byte of weight 256**j
        wide[(j if sys.byteorder == "little" else 7 - j)::8] = raw[width - 1 - j::width]
    counts = array("Q")
    counts.frombytes(wide)
    flags = raw.translate(_NONZERO)
    used = 0
    for j in range(width):
        used |= int.from_bytes(flags[j::width], "big")
    return counts, used.to_bytes(n, "big")


def encode_block(counts: list[int], bits: int, size: int) -> bytes:
    if bits >= 8:
        a = array(_ARRAY_CODE[bits], counts)
        if bits > 8:
            a.byteswap()
        out = a.tobytes()
    else:
        per_byte = 8 // bits
        out = bytes(
            sum(c << (i * bits) for i, c in enumerate(counts[j:j + per_byte]))
            for j in range(0, len(counts), per_byte))
    return out + bytes(size - len(out))


class Refcounts:
    """In-memory refcounts of one image file and their on-disk structures."""

    def __init__(self, fd: int, path: str, h: hdr.Header, file_size: int) -> None:
        self.fd = fd
        self.path = path
        self.cs = h.cluster_size
        self.bits = h.refcount_bits
        self.max_count = (1 << self.bits) - 1
        self.per_block = self.cs * 8 // self.bits
        self.table_offset = h.refcount_table_offset
        self.table_clusters = h.refcount_table_clusters
        self.counts = array("Q")
        self.used = bytearray()          # 1 where counts[c] > 0: searched with find()
        self.table: list[int] = []
        self.dirty_blocks: set[int] = set()
        self.table_dirty = False
        self.table_moved = False
        self.pending_free: list[int] = []
        self.free_index = 0
        self.reserved: list[list[int]] = []   # [first, count]: refcount 1 on disk, unused
        self._reserve_next = RESERVE_MIN
        self._load(file_size)

    # -- loading ---------------------------------------------------------

    def _load(self, file_size: int) -> None:
        raw = hdr.read_exact(self.fd, self.table_clusters * self.cs, self.table_offset,
                             self.path, "refcount table")
        table = array("Q", raw)
        table.byteswap()
        self.table = table.tolist()
        nclusters = -(-file_size // self.cs)
        self.counts = array("Q", bytes(8 * nclusters))
        self.used = bytearray(nclusters)      # the file may run past its refcount blocks
        for b, off in enumerate(self.table):
            if not off:
                continue
            if off & 0x1FF or off % self.cs or off + self.cs > file_size:
                raise MalformedImage(self.path, f"refcount block {b} at {off:#x} is invalid")
            raw = hdr.read_exact(self.fd, self.cs, off, self.path, "refcount block")
            first = b * self.per_block
            self._grow(first + self.per_block)
            if self.bits >= 8:
                counts, used = decode_wide(raw, self.bits // 8)
            else:
                narrow = decode_block(raw, self.bits)
                counts, used = array("Q", narrow), bytes(map(bool, narrow))
            self.counts[first:first + self.per_block] = counts
            self.used[first:first + self.per_block] = used

    def _grow(self, n: int) -> None:
        missing = n - len(self.counts)
        if missing > 0:
            self.counts.frombytes(bytes(8 * missing))
            self.used.extend(bytes(missing))

    def get(self, cluster: int) -> int:
        return self.counts[cluster] if cluster < len(self.counts) else 0

    # -- allocation ------------------------------------------------------

    def _set(self, cluster: int, value: int) -> None:
        self.counts[cluster] = value
        self.used[cluster] = 1 if value else 0

    def _find_free(self, n: int) -> int:
        """First-fit run of n clusters with refcount 0 (possibly running past the end)."""
        used = self.used
        first = used.find(0, self.free_index)
        self.free_index = first = len(used) if first < 0 else first
        start = used.find(bytes(n), first)
        if start >= 0:
            return start
        end = len(used)                  # no run inside: use the free tail, if any
        while end > first and not used[end - 1]:
            end -= 1
        return end

    def allocate(self, n: int) -> int:
        """n contiguous clusters, from the reserve (refcount 1, on disk already);
        returns the host offset."""
        for run in self.reserved:
            if run[1] >= n:
                first = run[0]
                run[0] += n
                run[1] -= n
                if not run[1]:
                    self.reserved.remove(run)
                return first * self.cs
        self._reserve(max(n, self._reserve_next))
        self._reserve_next = min(self._reserve_next * 2, RESERVE_MAX)
        return self.allocate(n)

    def _reserve(self, n: int) -> None:
        """n more contiguous clusters for the reserve, their refcounts synced."""
        start = self._find_free(n)
        self._grow(start + n)
        for c in range(start, start + n):
            self._set(c, 1)
        for c in range(start, start + n):
            self._mark(c)
        self.write_increments(False)
        self.reserved.append([start, n])

    def undo_allocate(self, offset: int, n: int) -> None:
        """Clusters whose use never reached the disk go back to the reserve."""
        self.reserved.append([offset // self.cs, n])

    def release_reserved(self) -> None:
        """What is left of the reserve gets refcount 0 again (written by
        release_pending, at the flush). Nothing references it."""
        for first, n in self.reserved:
            for c in range(first, first + n):
                self._set(c, 0)
                self._mark(c)
            self.free_index = min(self.free_index, first)
        self.reserved.clear()
        self._reserve_next = RESERVE_MIN

    def add_ref(self, cluster: int) -> None:
        if self.get(cluster) >= self.max_count:
            raise MalformedImage(self.path, f"refcount of cluster {cluster} would overflow")
        self._grow(cluster + 1)
        self._set(cluster, self.counts[cluster] + 1)
        self._mark(cluster)

    def free_later(self, cluster: int) -> None:
        """Drop one reference once the metadata that used it is on disk."""
        self.pending_free.append(cluster)

    def _mark(self, cluster: int) -> None:
        block = cluster // self.per_block
        self._ensure_block(block)
        self.dirty_blocks.add(block)

    def _ensure_block(self, block: int) -> None:
        if block < len(self.table) and self.table[block]:
            return
        if block >= len(self.table):
            self._grow_table(block)
            if self.table[block]:       # growing allocated this very block already
                return
        c = self._find_free(1)
        self.table[block] = c * self.cs
        self.table_dirty = True
        self._grow(c + 1)
        self._set(c, 1)
        self._mark(c)

    def _grow_table(self, block: int) -> None:
        """Move the refcount table to the end of the file, large enough for block.

        The new table covers the blocks needed for its own clusters too, so
        setting their refcounts cannot ask for another growth.
        """
        old_offset, old_clusters = self.table_offset, self.table_clusters
        end = max(len(self.counts), self._find_free(1))
        entries = max(block + 1, len(self.table)) * 3 // 2 + 2
        while True:
            clusters = -(-entries * 8 // self.cs)
            covered = (end + clusters + 2) // self.per_block + 2
            if covered <= entries:
                break
            entries = covered
        if clusters * self.cs > hdr.MAX_REFTABLE_BYTES:
            raise MalformedImage(self.path, "refcount table would exceed its 8 MiB limit")
        self.table.extend([0] * (clusters * self.cs // 8 - len(self.table)))
        self.table_offset, self.table_clusters = end * self.cs, clusters
        self._grow(end + clusters)
        for c in range(end, end + clusters):
            self._set(c, 1)
        for c in range(end, end + clusters):
            self._mark(c)
        first_old = old_offset // self.cs
        for c in range(first_old, first_old + old_clusters):
            self.free_later(c)
        self.table_dirty = self.table_moved = True

    # -- flushing ----------------------------------------------------------

    def _write_blocks(self, blocks: set[int]) -> None:
        for b in sorted(blocks):
            first = b * self.per_block
            counts = self.counts[first:first + self.per_block].tolist()
            os.pwrite(self.fd, encode_block(counts, self.bits, self.cs), self.table[b])

    def write_increments(self, data_dirty: bool) -> None:
        """Persist new refcounts (and the data written so far) before references."""
        if self.dirty_blocks or data_dirty:
            self._write_blocks(self.dirty_blocks)
            self.dirty_blocks.clear()
            os.fdatasync(self.fd)
        if self.table_dirty:
            table = array("Q", self.table)
            table.byteswap()
            os.pwrite(self.fd, table.tobytes(), self.table_offset)
            os.fdatasync(self.fd)
            self.table_dirty = False
        if self.table_moved:
            hdr.write_refcount_table_location(self.fd, self.table_offset, self.table_clusters)
            os.fdatasync(self.fd)
            self.table_moved = False

    def release_pending(self) -> None:
        """Apply deferred frees, after no on-disk reference to them remains."""
        if not self.pending_free and not self.dirty_blocks:
            return
        pending, self.pending_free = self.pending_free, []
        blocks = set()
        for c in pending:
            if self.counts[c]:
                self._set(c, self.counts[c] - 1)
            blocks.add(c // self.per_block)
            self.free_index = min(self.free_index, c)
        self._write_blocks(blocks | self.dirty_blocks)
        self.dirty_blocks.clear()
        os.fdatasync(self.fd)
