"""Create an empty qcow2 v3 image, optionally on a backing file.

Layout of the new file (cluster size cs, T + B + L clusters after the header):

    cluster 0          header, header extensions, backing file name
    clusters 1..T      refcount table
    next B clusters    refcount blocks (16-bit refcounts, cs/2 clusters each)
    next L clusters    L1 table, all entries zero

The refcount blocks count every cluster of the file, themselves and the
table included, so T and B are a fixpoint (refcount_clusters): at 512-byte
clusters a 128 GiB image has a 32 MiB L1 table (65536 clusters) and needs
258 refcount blocks. Sizes past what QEMU's largest L1 table maps are
refused (header.max_virtual_size).

Every structure is written, then the file and its directory are fsynced, so
the image exists whole or not at all from a crash's point of view: the file
is written under a temporary name it owns (files.OwnedTemp, ``.NAME.creating``)
and renamed into place without replacing anything. A temporary left by a
crash is removed and creation proceeds; one another process is writing makes
this creation fail with EEXIST.

Every image created here carries a content ID (identity.py); a child also
records its parent's.
"""

from __future__ import annotations

import os
import struct

from . import header as hdr
from . import identity as ident
from .errors import RequestError
from .files import CREATING_SUFFIX, OwnedTemp, fsync_dir

REFCOUNT_ORDER = 4


def header_cluster(path: str, cs: int, size: int, *, l1_entries: int, l1_offset: int,
                   refcount_table_offset: int, refcount_table_clusters: int,
                   backing: str | None, backing_format: str | None,
                   content_id: bytes | None, parent_id: bytes | None) -> bytes:
    """Cluster 0 of a new image: v3 header, extensions, backing file name.

    Without a content_id the image has no identity (it is "unknown").
    """
    exts = b""
    if backing and backing_format:
        exts += hdr.extension(hdr.EXT_BACKING_FORMAT, backing_format.encode())
    if content_id is not None:
        exts += ident.extension(content_id, parent_id)
    exts += struct.pack(">II", hdr.EXT_END, 0)
    backing_bytes = backing.encode() if backing else b""
    backing_offset = hdr.V3_HEADER_LENGTH + len(exts) if backing else 0
    if backing_offset + len(backing_bytes) > cs or len(backing_bytes) > hdr.MAX_BACKING_NAME:
        raise RequestError(path, "backing file name is too long")
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", hdr.MAGIC, 3, backing_offset,
                         len(backing_bytes), cs.bit_length() - 1, size, 0, l1_entries,
                         l1_offset, refcount_table_offset, refcount_table_clusters, 0, 0,
                         0, 0, ident.AUTOCLEAR_IDENTITY if content_id is not None else 0,
                         REFCOUNT_ORDER,
                         hdr.V3_HEADER_LENGTH)
    first = header + exts + backing_bytes
    return first + bytes(cs - len(first))


def l1_entries_for(size: int, cs: int) -> int:
    return max(1, -(-size // (cs * (cs // 8))))


def refcount_clusters(fixed: int, cs: int) -> tuple[int, int]:
    """(refcount table clusters, refcount blocks) that count ``fixed`` other
    clusters and themselves (16-bit refcounts)."""
    per_block = cs * 8 // (1 << REFCOUNT_ORDER)
    table = blocks = 1
    while True:
        need_blocks = -(-(fixed + table + blocks) // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table):
            return table, blocks
        blocks, table = max(blocks, need_blocks), max(table, need_table)


def check_size(path: str, size: int, cluster_bits: int) -> None:
    """Refuse a virtual size that is not a positive multiple of 512 bytes or that
    QEMU cannot open at this cluster size (the L1 table it would need)."""
    if size <= 0 or size % 512:
        raise RequestError(path, f"virtual size {size} is not a positive multiple of 512")
    largest = hdr.max_virtual_size(cluster_bits)
    if size > largest:
        raise RequestError(path, f"virtual size {size} is too large for {1 << cluster_bits}"
                           f"-byte clusters (at most {largest} bytes)")


def create_qcow2(path: str, size: int, *, cluster_bits: int = 16, backing: str | None = None,
                 backing_format: str | None = None, parent_id: bytes | None = None,
                 content_id: bytes | None = None, tmp: str | None = None) -> bytes:
    """Create the image; returns its content ID. ``tmp`` is the name it is
    written under before it is renamed into place (default ``.NAME.creating``).
    FileExistsError if path exists, or tmp is held by another process."""
    check_size(path, size, cluster_bits)
    cs = 1 << cluster_bits
    l1_entries = l1_entries_for(size, cs)
    l1_clusters = -(-l1_entries * 8 // cs)
    table_clusters, blocks = refcount_clusters(1 + l1_clusters, cs)
    if table_clusters * cs > hdr.MAX_REFTABLE_BYTES:    # not below max_virtual_size
        raise RequestError(path, f"virtual size {size} needs too large a refcount table")
    l1_offset = (1 + table_clusters + blocks) * cs
    content_id = content_id or ident.new_id()
    first = header_cluster(path, cs, size, l1_entries=l1_entries, l1_offset=l1_offset,
                           refcount_table_offset=cs, refcount_table_clusters=table_clusters,
                           backing=backing, backing_format=backing_format,
                           content_id=content_id, parent_id=parent_id)
    nclusters = 1 + table_clusters + blocks + l1_clusters
    table = struct.pack(f">{blocks}Q", *((1 + table_clusters + i) * cs for i in range(blocks)))
    counts = struct.pack(f">{nclusters}H", *([1] * nclusters))
    with OwnedTemp.create(path, CREATING_SUFFIX, path=tmp, take_stale=True) as t:
        os.pwrite(t.fd, first, 0)
        os.pwrite(t.fd, table, cs)
        os.pwrite(t.fd, counts, (1 + table_clusters) * cs)
        os.ftruncate(t.fd, nclusters * cs)
        os.fsync(t.fd)
        t.commit()                  # fails if path exists: never replace an image
    fsync_dir(os.path.dirname(path) or ".")
    return content_id
