"""The chain resolved into one map: guest slot -> (layer, host offset | zero).

Resolving once at open makes every lookup O(1) whatever the chain depth.
Layers are applied base first, so an upper layer's clusters overwrite what
lies below; the top keeps the map current as it allocates, zeroes and trims.

The map has one 64-bit entry per slot of `granularity` bytes (the smallest
cluster size in the chain, so every cluster covers whole slots), kept in
chunks of 32 Ki slots that exist only where some layer has clusters, so an
empty terabyte disk costs nothing:

     63      56 55 54                                   0
    +----------+--+--------------------------------------+
    | layer+1  |C |  host offset of the slot (C = 0)     |
    |          |  |  compressed index << 12 | slot (C=1) |
    +----------+--+--------------------------------------+

layer+1 == 0 means the slot reads as zeros (zero cluster, unallocated in
every layer, or beyond a layer's virtual size). Layers are numbered from the
base (0) up, so putting a new top on the chain leaves every entry valid.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from . import lanes
from .errors import UnsupportedImage
from .image import COMPRESSED, OFFSET_MASK, ZERO_FLAG, Qcow2File, RawFile

LAYER_SHIFT = 56
KIND_COMPRESSED = 1 << 55
PAYLOAD_MASK = KIND_COMPRESSED - 1
SLOT_BITS = 12
SLOT_MASK = (1 << SLOT_BITS) - 1
ZERO = 0
MAX_SLOTS = 1 << 40
CHUNK_BITS = 15                  # slots per chunk: 32 Ki (256 KiB of map)
CHUNK = 1 << CHUNK_BITS
CHUNK_MASK = CHUNK - 1
MAX_LAYERS = 250                 # layer + 1 must fit the 8-bit field


class ClusterMap:
    def __init__(self, size: int, granularity: int, path: str = "") -> None:
        self.size = size
        self.g = granularity
        nslots = -(-size // granularity)
        if nslots > MAX_SLOTS:
            raise UnsupportedImage(path, f"virtual size {size} is too large")
        self.nslots = nslots
        self.chunks: list[array | None] = [None] * (-(-nslots // CHUNK))
        self.compressed: list[int] = []     # raw L2 entries of compressed clusters
        # nonzero where the layers below the top hold data, fixed once they are applied
        self.backing: list[array | None] = []

    # -- access --------------------------------------------------------------

    def get(self, s: int) -> int:
        c = self.chunks[s >> CHUNK_BITS]
        return 0 if c is None else c[s & CHUNK_MASK]

    def _chunk(self, i: int) -> array:
        c = self.chunks[i]
        if c is None:
            c = self.chunks[i] = array("Q", [0]) * CHUNK
        return c

    def set(self, s: int, value: int) -> None:
        c = self.chunks[s >> CHUNK_BITS]
        if c is None:
            if not value:
                return
            c = self._chunk(s >> CHUNK_BITS)
        c[s & CHUNK_MASK] = value

    def clear(self, first: int, end: int) -> None:
        """Slots [first, end) read zeros."""
        while first < end:
            i, lo = first >> CHUNK_BITS, first & CHUNK_MASK
            hi = min(CHUNK, lo + end - first)
            c = self.chunks[i]
            if c is not None:
                if lo == 0 and hi == CHUNK:
                    self.chunks[i] = None
                else:
                    c[lo:hi] = array("Q", [0]) * (hi - lo)
            first += hi - lo

    def run(self, s: int, limit: int) -> tuple[int, int]:
        """The entry at slot s and how many slots (at most limit) continue it.

        Zero slots continue a zero entry; data slots continue a data entry when
        they follow it on the host in the same layer; compressed slots stand alone.
        """
        e = self.get(s)
        if e & KIND_COMPRESSED:
            return e, 1
        if not e:
            return 0, self.zero_run_length(s, limit)
        n, expect, g = 1, e + self.g, self.g
        while n < limit and self.get(s + n) == expect:
            n += 1
            expect += g
        return e, n

    def zero_run_length(self, s: int, limit: int) -> int:
        n = 0
        while n < limit:
            i, lo = (s + n) >> CHUNK_BITS, (s + n) & CHUNK_MASK
            c = self.chunks[i]
            span = min(CHUNK - lo, limit - n)
            if c is None:
                n += span
                continue
            for k in range(lo, lo + span):
                if c[k]:
                    return n + k - lo
            n += span
        return n

    def data_run_length(self, s: int, limit: int) -> int:
        """Slots from s (at most limit) that all hold data (any layer, any host)."""
        n = 0
        while n < limit:
            i, lo = (s + n) >> CHUNK_BITS, (s + n) & CHUNK_MASK
            c = self.chunks[i]
            if c is None:
                return n
            span = min(CHUNK - lo, limit - n)
            for k in range(lo, lo + span):
                if not c[k]:
                    return n + k - lo
            n += span
        return n

    def is_zero(self, first: int, count: int) -> bool:
        return self.zero_run_length(first, count) == count

    # -- building ----------------------------------------------------------

    def apply_layer(self, layer: int, f: Qcow2File | RawFile,
                    tables: Iterable[tuple[int, int, array]] | None = None) -> None:
        """Overlay one layer (applied base first) onto the map."""
        tag = (layer + 1) << LAYER_SHIFT
        g = self.g
        visible = -(-min(f.size, self.size) // g)
        # a layer hides everything below it beyond its own virtual size
        self.clear(visible, self.nslots)
        if isinstance(f, RawFile):
            for s in range(visible):
                self.set(s, tag | (s * g))
            return
        per = f.cluster_size // g
        span = f.header.l2_entries
        for l1_index, _off, l2 in f.l2_tables() if tables is None else tables:
            base_cluster = l1_index * span
            n = min(span, visible - base_cluster * per)     # entries in view
            if per == 1 and n > 0 and f.plain_offsets(l2, n) is not None:
                self._apply_plain(base_cluster, l2, n, tag)
                continue
            for k, e in enumerate(l2):
                if not e & ~(1 << 63):
                    continue
                first = (base_cluster + k) * per
                if first >= visible:
                    break
                f.check_l2_entry(e, first * g)
                self.set_cluster(first, per, tag, e, min(visible, first + per))

    def _apply_plain(self, first: int, l2: array, n: int, tag: int) -> None:
        """Slots [first, first + n) take entries [0, n) of an L2 table whose
        clusters are one slot each, none compressed (checked): what
        set_cluster does entry by entry, a chunk's part at a time, each part
        in one pass over its lanes (lanes.py). An entry with an offset is
        data (tag | offset), one with the zero flag reads zeros, and one
        with neither (unallocated) leaves the slot to the layers below."""
        k = 0
        while k < n:
            i, lo = (first + k) >> CHUNK_BITS, (first + k) & CHUNK_MASK
            m = min(CHUNK - lo, n - k)
            e = lanes.lanes(l2, k, k + m)
            ones = lanes.repeat(1, m)
            zero = e & ones
            offsets = e & lanes.repeat(OFFSET_MASK, m)
            allocated = lanes.nonzero(offsets, m)
            part = (offsets | lanes.spread(tag, m)) & lanes.widen(allocated & ~zero)
            c = self.chunks[i]
            if c is not None:
                unallocated = ones ^ (allocated | zero)
                part |= lanes.lanes(c, lo, lo + m) & lanes.widen(unallocated)
            elif part:
                c = self._chunk(i)
            if c is not None:
                c[lo:lo + m] = lanes.entries(part, m)
            k += m

    def set_cluster(self, first: int, per: int, tag: int, e: int, end: int) -> None:
        """Point slots [first, end) at the cluster described by L2 entry e."""
        if e & COMPRESSED:
            index = len(self.compressed)
            self.compressed.append(e)
            c = tag | KIND_COMPRESSED | (index << SLOT_BITS)
            for t in range(end - first):
                self.set(first + t, c | t)
        elif e & ZERO_FLAG:
            self.clear(first, end)
        else:
            host = e & OFFSET_MASK
            for t in range(end - first):
                self.set(first + t, tag | (host + t * self.g))

    def retarget(self, first: int, end: int, tag: int, e: int) -> None:
        """Slots [first, end) that read layer ``tag`` now read the cluster of
        L2 entry e of that layer (which moved it: copy-on-write); other slots,
        served by a layer above, stay. e is a data cluster, or zeros."""
        assert not e & COMPRESSED
        host = e & OFFSET_MASK if not e & ZERO_FLAG else 0
        for s in range(first, end):
            if self.get(s) >> LAYER_SHIFT == tag >> LAYER_SHIFT:
                self.set(s, tag | (host + (s - first) * self.g) if host else ZERO)

    def resize(self, size: int) -> None:
        """The disk's virtual size changes: slots past a smaller end are cleared,
        a larger end adds slots that read zeros."""
        nslots = -(-size // self.g)
        if nslots > MAX_SLOTS:
            raise UnsupportedImage("", f"virtual size {size} is too large")
        if nslots < self.nslots:
            self.clear(nslots, self.nslots)
        missing = -(-nslots // CHUNK) - len(self.chunks)
        if missing > 0:
            self.chunks.extend([None] * missing)
            self.backing.extend([None] * missing)
        self.size, self.nslots = size, nslots

    def freeze_backing(self) -> None:
        """Remember which slots the backing chain (everything below the top) holds."""
        self.backing = [None if c is None else array("Q", c) for c in self.chunks]

    def mark_backing(self, first: int, end: int) -> None:
        """From now on, treat slots [first, end) as having backing data."""
        s = first
        while s < end:
            i, lo = s >> CHUNK_BITS, s & CHUNK_MASK
            hi = min(CHUNK, lo + end - s)
            c = self.backing[i]
            if c is None:
                c = self.backing[i] = array("Q", [0]) * CHUNK
            if hi - lo == 1:
                c[lo] = 1
            else:
                c[lo:hi] = array("Q", [1]) * (hi - lo)
            s += hi - lo

    # -- queries -------------------------------------------------------------

    def backing_has_data(self, first: int, count: int) -> bool:
        for s in range(first, first + count):
            c = self.backing[s >> CHUNK_BITS]
            if c is not None and c[s & CHUNK_MASK]:
                return True
        return False
