"""Where things are in a small qcow2 file, and in-place mutations of its fields.

Independent of the driver under test: parsed here from the qcow2 spec
(docs/interop/qcow2.txt) so tests can aim a mutation at a header field, an L1
or L2 entry or a refcount, and know where they aimed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COMPRESSED = 1 << 62

# header field offsets and formats
FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}


@dataclass
class Layout:
    cluster_size: int
    header_length: int
    l1_offset: int
    l1_size: int
    l1: list[int]
    l2_offsets: list[int]  # of the L1 entries in use
    l2: dict[int, list[int]]  # L2 table offset -> entries
    refcount_table_offset: int
    refcount_blocks: list[int]
    refcount_order: int
    file_size: int

    def data_entries(self) -> list[tuple[int, int]]:
        """(guest offset, L2 entry) of every allocated, uncompressed data cluster."""
        out = []
        span = self.cluster_size // 8
        for i, l2_off in enumerate(self.l1):
            l2_off &= OFFSET_MASK
            if not l2_off:
                continue
            for k, e in enumerate(self.l2[l2_off]):
                if e & OFFSET_MASK and not e & COMPRESSED:
                    out.append(((i * span + k) * self.cluster_size, e))
        return out

    def l2_entry_position(self, guest: int) -> int:
        """File offset of the L2 entry that maps a guest offset."""
        span = self.cluster_size // 8
        cluster = guest // self.cluster_size
        l2_off = self.l1[cluster // span] & OFFSET_MASK
        assert l2_off, f"no L2 table for guest offset {guest}"
        return l2_off + 8 * (cluster % span)

    def refcount_position(self, host: int) -> int:
        """File offset of the (16-bit) refcount of the host cluster at ``host``."""
        assert self.refcount_order == 4
        per_block = self.cluster_size // 2
        index = host // self.cluster_size
        block = self.refcount_blocks[index // per_block]
        return block + 2 * (index % per_block)


def read_layout(path: Path) -> Layout:
    data = path.read_bytes()

    def field(name: str) -> int:
        off, fmt = FIELDS[name]
        return struct.unpack_from(fmt, data, off)[0]

    cs = 1 << field("cluster_bits")
    version = field("version")
    l1_offset, l1_size = field("l1_table_offset"), field("l1_size")
    l1 = list(struct.unpack_from(f">{l1_size}Q", data, l1_offset))
    l2 = {}
    for e in l1:
        off = e & OFFSET_MASK
        if off:
            l2[off] = list(struct.unpack_from(f">{cs // 8}Q", data, off))
    rt_off = field("refcount_table_offset")
    rt = struct.unpack_from(f">{field('refcount_table_clusters') * cs // 8}Q", data, rt_off)
    return Layout(
        cluster_size=cs,
        header_length=field("header_length") if version >= 3 else 72,
        l1_offset=l1_offset,
        l1_size=l1_size,
        l1=l1,
        l2_offsets=sorted(l2),
        l2=l2,
        refcount_table_offset=rt_off,
        refcount_blocks=[e for e in rt if e],
        refcount_order=field("refcount_order") if version >= 3 else 4,
        file_size=len(data),
    )


def set_field(path: Path, name: str, value: int) -> None:
    off, fmt = FIELDS[name]
    poke(path, off, struct.pack(fmt, value))


def get_field(path: Path, name: str) -> int:
    off, fmt = FIELDS[name]
    with path.open("rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def poke_u64(path: Path, offset: int, value: int) -> None:
    poke(path, offset, struct.pack(">Q", value))
