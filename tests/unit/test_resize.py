"""Resizing a disk's top (vdisk_block.resize), QEMU as the oracle.

Growing past what the L1 table maps moves the table (512-byte clusters make
that happen at a few MiB); the disk then reads and writes the new space,
and `qemu-img check` and `qemu-img compare` agree. Shrinking goes down to
the data and no further.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_matches_oracle, raw_view

from vdisk import qemu_img, qemu_io
from vdisk_block import ImageError
from vdisk_block.resize import resize

MiB = 1 << 20


@pytest.mark.parametrize("cluster", [512, 4096, 65536])
def test_grow_then_write_everywhere(tmp_path: Path, opened, cluster: int) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=MiB, options={"cluster_size": cluster})
    qemu_io.run(base, "write -P 0x11 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=MiB, backing="base.qcow2", backing_fmt="qcow2",
                    options={"cluster_size": cluster})
    qemu_io.run(top, "write -P 0x22 256k 64k")
    oracle = bytearray(raw_view(top, tmp_path))
    disk = opened(top)
    l1_at = disk.top.f.header.l1_table_offset
    assert resize(disk, 40 * MiB) == MiB
    assert disk.size == 40 * MiB
    if cluster == 512:              # 32 L1 entries (1 cluster) -> 1280 (20 clusters)
        assert len(disk.top.l1) == 1280 and disk.top.f.header.l1_table_offset != l1_at
    oracle.extend(bytes(39 * MiB))
    assert disk.read(disk.size, 0) == oracle          # the new space reads zeros
    for off in (MiB - 4096, MiB, 17 * MiB + 511, 40 * MiB - 8192):
        data = bytes([off % 251 + 1]) * 8192
        disk.write(data, off)
        oracle[off:off + 8192] = data
    disk.close()
    assert_matches_oracle(top, oracle, tmp_path)
    assert qemu_img.check(top)["leaks"] == 0
    assert qemu_img.info(top)["virtual-size"] == 40 * MiB


def test_shrink_goes_down_to_the_data(tmp_path: Path, opened) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=16 * MiB)
    qemu_io.run(top, "write -P 0x33 0 3M")
    oracle = raw_view(top, tmp_path)
    disk = opened(top)
    with pytest.raises(ImageError, match="holds data at offset 2097152"):
        resize(disk, 2 * MiB)
    assert disk.size == 16 * MiB
    resize(disk, 3 * MiB)
    assert disk.read(3 * MiB, 0) == oracle[:3 * MiB]
    with pytest.raises(ImageError, match="outside the disk"):
        disk.write(b"x" * 512, 3 * MiB)
    resize(disk, 8 * MiB)                                # and back: zeros past the data
    assert disk.read(8 * MiB, 0) == oracle[:3 * MiB] + bytes(5 * MiB)
    disk.close()
    assert_matches_oracle(top, oracle[:3 * MiB] + bytes(5 * MiB), tmp_path)


def test_sizes_refused(tmp_path: Path, opened) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=MiB, options={"cluster_size": 512})
    disk = opened(top)
    for size, reason in ((MiB + 1, "multiple of 512"), (0, "multiple of 512"),
                         (129 << 30, "larger than a qcow2 image with 512-byte clusters")):
        with pytest.raises(ImageError, match=reason):
            resize(disk, size)
    assert disk.size == MiB


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("cluster", [512, 65536])
@pytest.mark.parametrize("last", ["backing", "written", "compressed"])
def test_grow_over_a_longer_backing_reads_zeros_when_reopened(
        tmp_path: Path, opened, compat: str, cluster: int, last: str) -> None:
    """QEMU zero-writes what a grow would otherwise show: a longer backing
    file's data and the tail of the top's last cluster past the old end."""
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=3 * MiB)
    qemu_io.run(base, "write -P 0x11 0 3M")
    top = tmp_path / "top.qcow2"
    old = MiB + 1536                    # the last cluster (64 KiB) is cut short
    qemu_img.create(top, size=old, backing="base.qcow2", backing_fmt="qcow2",
                    options={"cluster_size": cluster, "compat": compat})
    if last == "written":
        qemu_io.run(top, f"write -P 0x22 {MiB} 1536")
    elif last == "compressed":
        qemu_io.run(top, f"write -c -P 0x33 {MiB - MiB % cluster if cluster > 1536 else MiB} "
                    f"{min(cluster, old - MiB)}")
    oracle = bytearray(raw_view(top, tmp_path))
    disk = opened(top)
    resize(disk, 4 * MiB)
    oracle.extend(bytes(4 * MiB - old))
    assert disk.read(disk.size, 0) == oracle            # what this process reads
    disk.close()
    assert_matches_oracle(top, oracle, tmp_path)        # what QEMU reads
    again = opened(top)
    assert again.read(again.size, 0) == oracle          # what a restarted worker reads


def test_a_write_at_a_short_end_writes_the_rest_of_its_cluster_as_zeros(
        tmp_path: Path, opened) -> None:
    """A cluster freed and used again for the last, cut-short cluster keeps
    none of what it held past the disk's end."""
    cs = 65536
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=16 * cs + 512)
    disk = opened(top)
    disk.write(b"\xaa" * 16 * cs, 0)
    disk.flush()
    disk.trim(16 * cs, 0)
    disk.flush()                                        # the 16 clusters are free
    disk.write(b"\xbb" * 512, 16 * cs)                  # reaches the end
    disk.flush()
    host = disk.top.entry(16) & ((1 << 56) - 1)
    assert os.pread(disk.top.fd, cs, host) == b"\xbb" * 512 + bytes(cs - 512)
