"""Refcount encoding and allocation, checked by qemu-img."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_matches_oracle
from hypothesis import given
from hypothesis import strategies as st

from vdisk import qemu_img
from vdisk_block.refcounts import decode_block, decode_wide, encode_block


@given(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), st.data())
def test_block_encoding_round_trips(bits: int, data: st.DataObject) -> None:
    size = 16
    per_block = size * 8 // bits
    counts = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=per_block,
                                max_size=per_block))
    raw = encode_block(counts, bits, size)
    assert len(raw) == size
    assert decode_block(raw, bits) == counts


@given(st.sampled_from([8, 16, 32, 64]), st.data())
def test_wide_counts_decode_a_column_at_a_time(bits: int, data: st.DataObject) -> None:
    """decode_wide (what opening an image uses) reads what decode_block reads."""
    top = (1 << bits) - 1
    edges = [c for c in (0, 1, 2, 255, 256, top) if c <= top]
    counts = data.draw(st.lists(st.sampled_from(edges) | st.integers(0, top),
                                min_size=1, max_size=200))
    raw = encode_block(counts, bits, len(counts) * bits // 8)
    wide, used = decode_wide(raw, bits // 8)
    assert list(wide) == decode_block(raw, bits) == counts
    assert used == bytes(1 if c else 0 for c in counts)


def test_sub_byte_refcounts_are_packed_lsb_first() -> None:
    # QEMU: refcount of cluster i is (byte[i / 8] >> (i % 8)) & 1 for 1-bit refcounts
    assert encode_block([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], 1, 4)[:2] == b"\x01\x02"
    assert decode_block(b"\x21", 4) == [1, 2]


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(bits: int, tmp_path: Path, opened) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img.create(img, size=4 << 20, options={"refcount_bits": bits, "cluster_size": 4096})
    oracle = bytearray(4 << 20)
    d = opened(img)
    for i, off in enumerate(range(0, 4 << 20, 300_000)):
        chunk = bytes([i + 1]) * 70_000
        d.write(chunk, off)
        oracle[off:off + len(chunk)] = chunk
    d.trim(1 << 20, 1 << 20)
    oracle[1 << 20:2 << 20] = bytes(1 << 20)
    d.flush()
    d.write(b"\x7f" * 9000, (1 << 20) + 100)       # reuses clusters freed by the trim
    oracle[(1 << 20) + 100:(1 << 20) + 9100] = b"\x7f" * 9000
    d.close()
    assert_matches_oracle(img, oracle, tmp_path)


def test_refcount_table_grows(tmp_path: Path, opened) -> None:
    """512-byte clusters: one table cluster covers 8 MiB; writing 12 MiB must move it."""
    img = tmp_path / "img.qcow2"
    qemu_img.create(img, size=16 << 20, options={"cluster_size": 512})
    before = qemu_img.info(img)
    oracle = bytearray(16 << 20)
    d = opened(img)
    data = os.urandom(12 << 20)
    for off in range(0, len(data), 1 << 20):
        d.write(data[off:off + (1 << 20)], off)
        if off == 6 << 20:
            d.flush()
    oracle[:len(data)] = data
    d.close()
    assert qemu_img.info(img)["actual-size"] > before["actual-size"]
    assert_matches_oracle(img, oracle, tmp_path)
