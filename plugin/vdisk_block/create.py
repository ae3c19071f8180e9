"""Create an empty qcow2 v3 image, optionally on a backing file.

Layout of the new file (cluster size cs):

    cluster 0        header, header extensions, backing file name
    cluster 1        refcount table (one cluster)
    cluster 2        refcount block (16-bit refcounts, covers the first cs/2 clusters)
    cluster 3...     L1 table, all entries zero

Every structure is written, then the file and its directory are fsynced, so
the image exists whole or not at all from a crash's point of view: the file
is created under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import struct

from . import header as hdr
from .errors import RequestError


def create_qcow2(path: str, size: int, *, cluster_bits: int = 16, backing: str | None = None,
                 backing_format: str | None = None) -> None:
    cs = 1 << cluster_bits
    l1_entries = max(1, -(-size // (cs * (cs // 8))))
    l1_clusters = -(-l1_entries * 8 // cs)
    exts = b""
    if backing_format:
        name = backing_format.encode()
        exts += struct.pack(">II", hdr.EXT_BACKING_FORMAT, len(name)) + \
            name + bytes(-len(name) % 8)
    exts += struct.pack(">II", hdr.EXT_END, 0)
    backing_bytes = backing.encode() if backing else b""
    backing_offset = hdr.V3_HEADER_LENGTH + len(exts) if backing else 0
    if backing_offset + len(backing_bytes) > cs or len(backing_bytes) > hdr.MAX_BACKING_NAME:
        raise RequestError(path, "backing file name is too long")
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", hdr.MAGIC, 3, backing_offset,
                         len(backing_bytes), cluster_bits, size, 0, l1_entries, 3 * cs,
                         cs, 1, 0, 0, 0, 0, 0, 4, hdr.V3_HEADER_LENGTH)
    first = header + exts + backing_bytes
    nclusters = 3 + l1_clusters
    table = struct.pack(">Q", 2 * cs)
    block = struct.pack(f">{nclusters}H", *([1] * nclusters))
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.creating")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, first + bytes(cs - len(first)), 0)
        os.pwrite(fd, table + bytes(cs - len(table)), cs)
        os.pwrite(fd, block + bytes(cs - len(block)), 2 * cs)
        os.ftruncate(fd, nclusters * cs)
        os.fsync(fd)
        os.link(tmp, path)          # fails if path exists: never replace an image
    finally:
        os.close(fd)
        os.unlink(tmp)
    dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
