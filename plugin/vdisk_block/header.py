"""qcow2 header: parse, validate, and update individual fields in place.

Layout (docs/interop/qcow2.txt in QEMU), all fields big-endian:

    0  magic 'QFI\\xfb'      4  version (2|3)        8  backing_file_offset
   16  backing_file_size    20  cluster_bits        24  size (virtual)
   32  crypt_method         36  l1_size             40  l1_table_offset
   48  refcount_table_offset                         56  refcount_table_clusters
   60  nb_snapshots         64  snapshots_offset
   v3: 72 incompatible  80 compatible  88 autoclear  96 refcount_order
      100 header_length   104 compression_type (if header_length > 104)

The header is never rewritten as a whole: fields the driver changes are
written where they are, so header extensions it does not know survive.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from .errors import MalformedImage, UnsupportedImage

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MAX_L1_BYTES = 32 << 20          # QEMU's own limit on the L1 table
MAX_REFTABLE_BYTES = 8 << 20     # ... and on the refcount table
MAX_BACKING_NAME = 1023


def max_virtual_size(cluster_bits: int) -> int:
    """The largest virtual size of an image with this cluster size: what its
    largest L1 table maps (qemu-img 7.2 creates exactly this much, and refuses
    512 bytes more): 128 GiB at 512-byte clusters, 8 TiB at 4 KiB, 2 PiB at
    64 KiB, 2 EiB at 2 MiB."""
    cs = 1 << cluster_bits
    return MAX_L1_BYTES // 8 * cs * (cs // 8)


MAX_VIRTUAL_SIZE = max_virtual_size(21)     # at the largest cluster size

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_VDISK_IDENTITY = 0x76644944  # 'vdID': docs/content-id.md

# byte offsets of fields the driver rewrites
OFF_REFCOUNT_TABLE = 48          # u64 offset + u32 clusters at 56
OFF_INCOMPATIBLE = 72
OFF_AUTOCLEAR = 88
OFF_BACKING_FILE = 8             # u64 offset + u32 size at 16

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    extensions: dict[int, bytes] = field(default_factory=dict)
    ext_offsets: dict[int, int] = field(default_factory=dict)   # where each one's data is
    ext_end: int = 0                    # just past the end-of-extensions marker

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


def read_exact(fd: int, length: int, offset: int, path: str, what: str) -> bytes:
    """pread that treats a short read as a malformed image (data past EOF)."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise MalformedImage(path, f"{what} at offset {offset} lies beyond the end of the file")
    return data


def parse_header(fd: int, path: str) -> Header:
    """Read and validate the header and its extensions; refuse what we cannot serve."""
    raw = os.pread(fd, 4096, 0)
    if raw[:4] != MAGIC:
        raise MalformedImage(path, "not a qcow2 image (bad magic)")
    if len(raw) < V2_HEADER_LENGTH:
        raise MalformedImage(path, f"truncated header ({len(raw)} bytes)")
    f = _V2.unpack_from(raw)
    h = Header(*f[1:])
    if h.version not in (2, 3):
        raise UnsupportedImage(path, f"qcow2 version {h.version}")
    if not 9 <= h.cluster_bits <= 21:
        raise MalformedImage(path, f"cluster_bits {h.cluster_bits} out of range 9..21")
    if h.version == 3:
        if len(raw) < V3_HEADER_LENGTH:
            raise MalformedImage(path, "truncated v3 header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _V3.unpack_from(raw, 72)
        if h.header_length < V3_HEADER_LENGTH or h.header_length % 8 or \
                h.header_length > h.cluster_size:
            raise MalformedImage(path, f"header_length {h.header_length} is invalid")
        if h.header_length > 104:
            h.compression_type = raw[104] if len(raw) > 104 else 0
    if h.refcount_order > 6:
        raise MalformedImage(path, f"refcount_order {h.refcount_order} out of range 0..6")
    _check_features(h, path)
    cs = h.cluster_size
    if h.size > MAX_VIRTUAL_SIZE:
        raise MalformedImage(path, f"virtual size {h.size} is too large")
    l2_span = cs * h.l2_entries
    needed_l1 = -(-h.size // l2_span)
    if h.l1_size < needed_l1:
        raise MalformedImage(path, f"L1 table has {h.l1_size} entries, {needed_l1} needed")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise MalformedImage(path, f"L1 table of {h.l1_size} entries is too large")
    for name in ("l1_table_offset", "refcount_table_offset"):
        value = getattr(h, name)
        if value % cs or (value == 0 and (name != "l1_table_offset" or h.l1_size)):
            raise MalformedImage(path, f"{name} {value:#x} is not a cluster-aligned offset")
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise MalformedImage(path, f"refcount_table_clusters {h.refcount_table_clusters} invalid")
    ext_start = V2_HEADER_LENGTH if h.version == 2 else h.header_length
    _parse_extensions(fd, h, path, ext_start)
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size == 0:
            raise MalformedImage(path, f"backing file name length {h.backing_file_size} invalid")
        if h.backing_file_offset + h.backing_file_size > cs:
            raise MalformedImage(path, "backing file name lies outside the first cluster")
        name = read_exact(fd, h.backing_file_size, h.backing_file_offset, path,
                          "backing file name")
        try:
            h.backing_file = name.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedImage(path, "backing file name is not UTF-8") from None
        if "\0" in h.backing_file:
            raise MalformedImage(path, "backing file name contains a NUL byte")
    return h


def _check_features(h: Header, path: str) -> None:
    if h.crypt_method:
        raise UnsupportedImage(path, f"encrypted image (crypt_method {h.crypt_method})")
    if h.incompatible & INCOMPAT_CORRUPT:
        raise UnsupportedImage(path, "the corrupt bit is set; repair with 'qemu-img check -r all'")
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise UnsupportedImage(path, "external data file")
    if h.incompatible & INCOMPAT_EXTL2:
        raise UnsupportedImage(path, "extended L2 entries (subclusters)")
    unknown = h.incompatible & ~(INCOMPAT_KNOWN | INCOMPAT_DATA_FILE | INCOMPAT_EXTL2)
    if unknown:
        raise UnsupportedImage(path, f"unknown incompatible feature bits {unknown:#x}")
    if h.compression_type == 1:
        raise UnsupportedImage(path, "zstd compression type")
    if h.compression_type != 0:
        raise UnsupportedImage(path, f"unknown compression type {h.compression_type}")
    if h.compression_type == 0 and h.incompatible & INCOMPAT_COMPRESSION:
        # the bit says "look at compression_type"; type 0 (deflate) is what we read
        pass


def _parse_extensions(fd: int, h: Header, path: str, start: int) -> None:
    cs = h.cluster_size
    limit = min(cs, h.backing_file_offset) if h.backing_file_offset else cs
    raw = os.pread(fd, limit, 0)
    off = start
    while True:
        if off + 8 > len(raw):
            raise MalformedImage(path, "header extensions run past the first cluster")
        ext_type, length = struct.unpack_from(">II", raw, off)
        off += 8
        if ext_type == EXT_END:
            h.ext_end = off
            return
        end = off + length
        if end > len(raw):
            raise MalformedImage(path, f"header extension {ext_type:#x} runs past its area")
        data = raw[off:end]
        if ext_type == EXT_ENCRYPTION:
            raise UnsupportedImage(path, "encrypted image (LUKS header extension)")
        if ext_type == EXT_DATA_FILE:
            raise UnsupportedImage(path, "external data file")
        if ext_type == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        h.extensions[ext_type] = data
        h.ext_offsets[ext_type] = off
        off = (end + 7) & ~7


def raw_backing_name(fd: int, path: str) -> str | None:
    """The backing file name of a qcow2 header read from its two fixed fields
    only (offset 8: name offset, 16: name size), whatever else the header
    holds: enough to follow a chain through an image this driver refuses."""
    offset, size = struct.unpack(">QI", read_exact(fd, 12, OFF_BACKING_FILE, path, "header"))
    if not offset:
        return None
    if size > MAX_BACKING_NAME:
        raise MalformedImage(path, f"backing file name of {size} bytes")
    return read_exact(fd, size, offset, path, "backing file name").decode(errors="replace")


def write_u64(fd: int, offset: int, value: int) -> None:
    os.pwrite(fd, struct.pack(">Q", value), offset)


def write_refcount_table_location(fd: int, offset: int, clusters: int) -> None:
    """Point the header at a (new) refcount table: one 12-byte write."""
    os.pwrite(fd, struct.pack(">QI", offset, clusters), OFF_REFCOUNT_TABLE)


def extension(ext_type: int, data: bytes) -> bytes:
    """One header extension as it is stored: type, length, data padded to 8 bytes."""
    return struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
