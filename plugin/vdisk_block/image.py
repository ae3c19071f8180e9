"""One image file of a chain: qcow2 (L1/L2 tables, compressed clusters) or raw.

L2 entry (standard cluster, no subclusters):

    bit 63      COPIED: refcount is exactly 1, writable in place
    bit 62      0 (compressed clusters have it set, below)
    bits 9-55   host offset of the cluster (cluster aligned)
    bit 0       reads as zeros (v3 zero flag)

Compressed cluster (bit 62 set), x = 62 - (cluster_bits - 8):

    bits 0..x-1         host offset of the compressed data (any byte)
    bits x..61          number of additional 512-byte sectors used
"""

from __future__ import annotations

import os
import zlib
from array import array
from collections.abc import Iterator

from . import header as hdr
from . import identity as ident
from . import lanes, locking
from .errors import MalformedImage, UnsupportedImage

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE


class RawFile:
    """A raw file used as a read-only backing file."""

    fmt = "raw"
    backing_file: str | None = None
    backing_format: str | None = None
    cluster_size = 0
    writable = False
    identity = ident.Identity(ident.UNSUPPORTED, reason="raw image")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            locking.lock_for_read(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Qcow2File:
    """A qcow2 image: header, L1 table, L2 tables read on demand."""

    fmt = "qcow2"

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        try:
            if writable:
                locking.lock_for_write(self.fd, path)
            else:
                locking.lock_for_read(self.fd, path)
            self.refresh()
        except BaseException:
            os.close(self.fd)
            raise

    def refresh(self) -> None:
        """Read the header and L1 table again: another handle of this file
        wrote them (the target of a consolidation into this image)."""
        self.header = h = hdr.parse_header(self.fd, self.path)
        self.file_size = os.fstat(self.fd).st_size
        self.l1 = self._read_l1()
        self.size = h.size
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.backing_file = h.backing_file
        self.backing_format = h.backing_format
        self.identity = ident.of_header(h)
        self._csize_shift = 62 - (h.cluster_bits - 8)
        self._csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self._coff_mask = (1 << self._csize_shift) - 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read_l1(self) -> array:
        h = self.header
        l1 = array("Q", hdr.read_exact(self.fd, h.l1_size * 8, h.l1_table_offset,
                                       self.path, "L1 table"))
        l1.byteswap()
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if e & L1_RESERVED or off % h.cluster_size:
                raise MalformedImage(self.path, f"L1 entry {i} ({e:#x}) is invalid")
            if off and off + h.cluster_size > self.file_size:
                raise MalformedImage(self.path, f"L2 table {i} at {off:#x} is beyond the file")
            if off and off < h.cluster_size:
                raise MalformedImage(self.path, f"L2 table {i} overlaps the header")
        return l1

    def read_l2(self, l2_offset: int) -> array:
        l2 = array("Q", hdr.read_exact(self.fd, self.cluster_size, l2_offset, self.path,
                                       "L2 table"))
        l2.byteswap()
        return l2

    def l2_tables(self) -> Iterator[tuple[int, int, array]]:
        """(L1 index, L2 offset, L2 entries) for every allocated L2 table."""
        for i, e in enumerate(self.l1):
            off = e & OFFSET_MASK
            if off:
                yield i, off, self.read_l2(off)

    def check_l2_entry(self, entry: int, guest: int) -> None:
        """Reject entries that would make us read or write where we must not."""
        if entry & COMPRESSED:
            off, size = self.compressed_extent(entry)
            if off < self.cluster_size or off >= self.file_size:
                raise MalformedImage(self.path, f"compressed cluster for guest offset {guest} "
                                     f"at {off:#x} is outside the image data")
            return
        if entry & L2_RESERVED:
            raise MalformedImage(self.path, f"L2 entry for guest offset {guest} has reserved "
                                 f"bits set ({entry:#x})")
        off = entry & OFFSET_MASK
        if off % self.cluster_size:
            raise MalformedImage(self.path, f"L2 entry for guest offset {guest} is unaligned "
                                 f"({off:#x})")
        if off and (off < self.cluster_size or off >= self.file_size):
            raise MalformedImage(self.path, f"L2 entry for guest offset {guest} points "
                                 f"outside the image data ({off:#x})")

    def plain_offsets(self, l2: array, limit: int) -> int | None:
        """The host offsets of entries [0, limit) of an L2 table, as lanes
        (lanes.py), when none is compressed and every one passes
        check_l2_entry; None otherwise.

        The common case, tested over the whole table at once instead of a
        call per entry (opening a 1 GiB image checks 16 Ki entries); anything
        else goes entry by entry through check_l2_entry, which says what is
        wrong. No reserved bit, no offset bit below the cluster size, and
        every offset below the file's end (an aligned offset that is not zero
        is past the header: at least one cluster).
        """
        x = lanes.lanes(l2, 0, limit)
        odd = COMPRESSED | L2_RESERVED | ((self.cluster_size - 1) & ~0x1FF)
        if x & lanes.repeat(odd, limit):
            return None
        offsets = x & lanes.repeat(OFFSET_MASK, limit)
        # offsets are below 2**56 and a file's size below 2**63
        if lanes.any_at_least(offsets, self.file_size, limit):
            return None
        return offsets

    def compressed_extent(self, entry: int) -> tuple[int, int]:
        off = entry & self._coff_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return off, sectors * 512 - (off & 511)

    def read_compressed(self, entry: int) -> bytes:
        off, size = self.compressed_extent(entry)
        data = os.pread(self.fd, size, off)
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, self.cluster_size)
        except zlib.error as e:
            raise MalformedImage(self.path, f"compressed cluster at {off:#x}: {e}") from None
        if len(out) != self.cluster_size:
            raise MalformedImage(self.path, f"compressed cluster at {off:#x} is truncated")
        return out


def probe_format(path: str) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == hdr.MAGIC else "raw"


def open_image(path: str, fmt: str | None, writable: bool) -> Qcow2File | RawFile:
    fmt = fmt or probe_format(path)
    if fmt == "qcow2":
        return Qcow2File(path, writable)
    if fmt == "raw":
        if writable:
            raise UnsupportedImage(path, "a raw image can only be a read-only backing file")
        return RawFile(path)
    raise UnsupportedImage(path, f"image format {fmt!r}")
