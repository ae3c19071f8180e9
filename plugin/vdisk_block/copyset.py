"""The copy set of a consolidation: the guest slots the collapsed layers hold.

A slot belongs to the copy set when a collapsed layer (the images above the
target) allocates its cluster, as data or as zeros, or hides it by being
smaller than the disk. Each slot of the set is copied once; what the guest
writes later is mirrored instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from .disk import Disk
from .image import COPIED, Qcow2File


def layer_ranges(disk: Disk, layers: Iterable[int]) -> list[tuple[int, int]]:
    """Slot ranges [first, end) that the given layers of the chain (0 = top)
    allocate or hide, unsorted. The top's in-memory tables are read, so
    layer 0 only under the disk lock; the frozen layers below it from their
    files, without it."""
    m = disk.map
    ranges: list[tuple[int, int]] = []
    for p in layers:
        f = disk.layers[p]
        assert isinstance(f, Qcow2File)
        if f.size < disk.size:          # a smaller layer hides what lies below it
            ranges.append((f.size // m.g, m.nslots))
        per = f.cluster_size // m.g
        span = f.header.l2_entries
        assert disk.top is not None
        tables = disk.top.l2.items() if p == 0 else \
            ((i, l2) for i, _off, l2 in f.l2_tables())
        for l1_index, l2 in tables:
            # a byte per entry, 1 where nonzero; runs of them found by find()
            flags = bytes(map(bool, l2))
            base = l1_index * span
            k = flags.find(1)
            while k >= 0:
                end = flags.find(0, k)
                end = len(flags) if end < 0 else end
                run = [(k, end)]
                if COPIED in l2[k:end]:     # an entry of the COPIED bit alone is unallocated
                    run = merged([(j, j + 1) for j in range(k, end) if l2[j] & ~COPIED])
                for a, b in run:
                    first = (base + a) * per
                    if first < m.nslots:
                        ranges.append((first, min((base + b) * per, m.nslots)))
                k = flags.find(1, end) if end < len(flags) else -1
    return ranges


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges sorted, those that overlap or touch joined."""
    out: list[tuple[int, int]] = []
    for first, end in sorted(ranges):
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return out
