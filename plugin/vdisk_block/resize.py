"""Change a disk's virtual size (`vdisk disk resize`), on its writable top.

Growing: if the new size needs more L1 entries, a larger L1 table is
written into fresh clusters (their refcounts on disk first), the header is
pointed at it in one 12-byte write (l1_size at 36, l1_table_offset at 40),
and only then are the old table's clusters freed; then the size field
(offset 24) changes. Every step is synced: a crash leaves the old size or
the new one, with at most leaked clusters, as ``qemu-img check`` sees it.
What the grown part would show besides zeros (the tail of the last cluster,
a longer backing file's data) is zeroed first, as QEMU does.

Shrinking: only down to where the disk holds data (the guest view from the
new end on reads zeros in every layer: no layer's data is cut away). The
size field changes; the L1 table stays (it may map more than the size).

The backing files keep their sizes: past a backing file's end the disk
reads zeros, as QEMU reads it; where a backing file is longer than the
old size, the grown part is zeroed in the top, so it does not show through.
NBD has no size-change notice: a client sees the new size when it connects
again.
"""

from __future__ import annotations

import os
import struct
from array import array

from . import header as hdr
from .create import l1_entries_for
from .disk import Disk, chain_map
from .errors import RequestError
from .top import TopImage

OFF_SIZE = 24
OFF_L1 = 36                     # u32 l1_size, then u64 l1_table_offset at 40


def resize(disk: Disk, size: int) -> int:
    """Give the disk this virtual size; returns the size it had."""
    with disk.lock:
        top = disk._writable()
        old = disk.size
        if size <= 0 or size % 512:
            raise RequestError(disk.path, f"size {size} is not a positive multiple of 512")
        limit = hdr.max_virtual_size(top.f.cluster_bits)
        if size > limit:
            raise RequestError(disk.path, f"size {size} is larger than a qcow2 image with "
                               f"{top.cs}-byte clusters can be ({limit} bytes)")
        if disk.job is not None:
            raise RequestError(disk.path, "a job is running on this disk")
        if size == old:
            return old
        if size < old:
            _check_shrink(disk, size)
        disk.drain_reads()
        top.begin_write()               # the disk's content changes: a fresh content ID
        top.flush()                     # metadata on disk as memory has it, first
        if size > old:
            _grow_l1(top, size)
            _hide_past_old_end(disk, top, old, size)
        hdr.write_u64(top.fd, OFF_SIZE, size)
        os.fdatasync(top.fd)
        top.f.header.size = top.f.size = size
        disk.map.resize(size)
        disk.set_chain(disk.layers, disk.map, top)
        return old


def _hide_past_old_end(disk: Disk, top: TopImage, old: int, size: int) -> None:
    """Make [old, size) read zeros for every reader of the grown image, as
    QEMU does: the tail of the top's last cluster past the old end may hold
    bytes, and a backing file longer than the old size would show its data
    there. Zeros (zero flags, or written zeros on v2) go in under the new size
    in memory and are synced before the size field changes: a crash before
    leaves the old size, with entries past it that nobody reads."""
    cs = top.cs
    end = min(size, -(-old // cs) * cs)
    if len(disk.layers) > 1:
        end = max(end, min(size, disk.layers[1].size))
    if end <= old:
        return
    layers = disk.layers
    top.f.header.size = top.f.size = size
    disk.set_chain(layers, chain_map(layers, top), top)    # what a reopen would read
    try:
        disk.zero(end - old, old)
        top.flush()
    except BaseException:
        top.f.header.size = top.f.size = old
        disk.set_chain(layers, chain_map(layers, top), top)
        raise


def _check_shrink(disk: Disk, size: int) -> None:
    """Refuse to cut away data: every slot from the one holding the new end on
    must read zeros (no layer maps data there)."""
    g = disk.map.g
    first = size // g
    end = disk.map.nslots
    n = disk.map.zero_run_length(first, end - first)
    if n < end - first:
        at = max(size, (first + n) * g)
        raise RequestError(disk.path, f"the disk holds data at offset {at}, beyond the new "
                           f"size {size}; shrinking only goes down to the data")


def _grow_l1(top: TopImage, size: int) -> None:
    cs = top.cs
    need = l1_entries_for(size, cs)
    h = top.f.header
    if need <= len(top.l1):
        return
    if need * 8 > hdr.MAX_L1_BYTES:
        raise RequestError(top.path, f"an L1 table of {need} entries is too large")
    clusters = -(-need * 8 // cs)
    rc = top.refcounts
    offset = rc.allocate(clusters)
    rc.write_increments(False)          # the new table's refcounts are on disk first
    table = array("Q", top.l1)
    table.extend([0] * (need - len(table)))
    table.byteswap()
    data = table.tobytes()
    os.pwrite(top.fd, data + bytes(clusters * cs - len(data)), offset)
    os.fdatasync(top.fd)
    os.pwrite(top.fd, struct.pack(">IQ", need, offset), OFF_L1)
    os.fdatasync(top.fd)
    old, old_clusters = h.l1_table_offset, -(-h.l1_size * 8 // cs)
    h.l1_size, h.l1_table_offset = need, offset
    top.l1.extend([0] * (need - len(top.l1)))
    for c in range(old // cs, old // cs + old_clusters):
        rc.free_later(c)
    rc.release_pending()                # nothing on disk points at the old table now
