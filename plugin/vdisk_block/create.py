"""Create an empty qcow2 v3 image, optionally on a backing file.

Layout of the new file (cluster size cs):

    cluster 0        header, header extensions, backing file name
    cluster 1        refcount table (one cluster)
    cluster 2        refcount block (16-bit refcounts, covers the first cs/2 clusters)
    cluster 3...     L1 table, all entries zero

Every structure is written, then the file and its directory are fsynced, so
the image exists whole or not at all from a crash's point of view: the file
is created under a temporary name and linked into place.

Every image created here carries a content ID (identity.py); a child also
records its parent's.
"""

from __future__ import annotations

import os
import struct

from . import header as hdr
from . import identity as ident
from .errors import RequestError
from .files import fsync_dir

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


def create_qcow2(path: str, size: int, *, cluster_bits: int = 16, backing: str | None = None,
                 backing_format: str | None = None, parent_id: bytes | None = None,
                 content_id: bytes | None = None, tmp: str | None = None) -> bytes:
    """Create the image; returns its content ID. ``tmp`` is the name it is
    written under before it is linked into place (default ``.NAME.creating``)."""
    cs = 1 << cluster_bits
    l1_entries = l1_entries_for(size, cs)
    l1_clusters = -(-l1_entries * 8 // cs)
    content_id = content_id or ident.new_id()
    first = header_cluster(path, cs, size, l1_entries=l1_entries, l1_offset=3 * cs,
                           refcount_table_offset=cs, refcount_table_clusters=1,
                           backing=backing, backing_format=backing_format,
                           content_id=content_id, parent_id=parent_id)
    nclusters = 3 + l1_clusters
    table = struct.pack(">Q", 2 * cs)
    block = struct.pack(f">{nclusters}H", *([1] * nclusters))
    tmp = tmp or os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.creating")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, first, 0)
        os.pwrite(fd, table + bytes(cs - len(table)), cs)
        os.pwrite(fd, block + bytes(cs - len(block)), 2 * cs)
        os.ftruncate(fd, nclusters * cs)
        os.fsync(fd)
        os.link(tmp, path)          # fails if path exists: never replace an image
    finally:
        os.close(fd)
        os.unlink(tmp)
    fsync_dir(os.path.dirname(path) or ".")
    return content_id
