"""The chain resolved into one map: guest slot -> (layer, host offset | zero).

Resolving once at open makes every lookup O(1) whatever the chain depth.
Layers are applied base first, so an upper layer's clusters overwrite what
lies below; the top keeps the map current as it allocates, zeroes and trims.

The map has one 64-bit entry per slot of `granularity` bytes (the smallest
cluster size in the chain, so every cluster covers whole slots):

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

from .errors import MalformedImage
from .image import COMPRESSED, OFFSET_MASK, ZERO_FLAG, Qcow2File, RawFile

LAYER_SHIFT = 56
KIND_COMPRESSED = 1 << 55
PAYLOAD_MASK = KIND_COMPRESSED - 1
SLOT_BITS = 12
SLOT_MASK = (1 << SLOT_BITS) - 1
ZERO = 0
MAX_SLOTS = 1 << 28
MAX_LAYERS = 250                 # layer + 1 must fit the 8-bit field


class ClusterMap:
    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.g = granularity
        nslots = -(-size // granularity)
        if nslots > MAX_SLOTS:
            raise MalformedImage("", f"virtual size {size} needs {nslots} map slots")
        self.nslots = nslots
        self.entries = array("Q", bytes(8 * nslots))
        self.compressed: list[int] = []     # raw L2 entries of compressed clusters
        # 1 where the layers below the top hold data; fixed once the backing is applied
        self.backing_data = bytearray()

    # -- building ----------------------------------------------------------

    def apply_layer(self, layer: int, f: Qcow2File | RawFile,
                    tables: Iterable[tuple[int, int, array]] | None = None) -> None:
        """Overlay one layer (applied base first) onto the map."""
        tag = (layer + 1) << LAYER_SHIFT
        g = self.g
        entries = self.entries
        visible = -(-min(f.size, self.size) // g)
        # a layer hides everything below it beyond its own virtual size
        if visible < self.nslots:
            entries[visible:] = array("Q", bytes(8 * (self.nslots - visible)))
        if isinstance(f, RawFile):
            for s in range(visible):
                entries[s] = tag | (s * g)
            return
        per = f.cluster_size // g
        span = f.header.l2_entries
        for l1_index, _off, l2 in f.l2_tables() if tables is None else tables:
            base_cluster = l1_index * span
            for k, e in enumerate(l2):
                if not e & ~(1 << 63):
                    continue
                first = (base_cluster + k) * per
                if first >= visible:
                    break
                f.check_l2_entry(e, first * g)
                self.set_cluster(first, per, tag, e, min(visible, first + per))

    def set_cluster(self, first: int, per: int, tag: int, e: int, end: int) -> None:
        """Point slots [first, end) at the cluster described by L2 entry e."""
        entries = self.entries
        if e & COMPRESSED:
            index = len(self.compressed)
            self.compressed.append(e)
            c = tag | KIND_COMPRESSED | (index << SLOT_BITS)
            for t in range(end - first):
                entries[first + t] = c | t
        elif e & ZERO_FLAG:
            entries[first:end] = array("Q", bytes(8 * (end - first)))
        else:
            host = e & OFFSET_MASK
            for t in range(end - first):
                entries[first + t] = tag | (host + t * self.g)

    def freeze_backing(self) -> None:
        """Remember which slots the backing chain (everything below the top) holds."""
        self.backing_data = bytearray(1 if e else 0 for e in self.entries)

    # -- queries -------------------------------------------------------------

    def backing_has_data(self, first: int, count: int) -> bool:
        return any(self.backing_data[first:first + count])

    def is_zero(self, first: int, count: int) -> bool:
        return not any(self.entries[first:first + count])
