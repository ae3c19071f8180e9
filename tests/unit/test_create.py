"""create_qcow2 at every cluster size and size QEMU accepts, QEMU as the oracle.

The refcount blocks of a new image count its metadata clusters, themselves
included: one block counts cs/2 clusters (16-bit refcounts), so at 512-byte
clusters one block is full once the L1 table has cs/2 - 3 clusters (header,
refcount table, the block), a little past 506 MiB; at 4 KiB clusters past
2 TiB. The largest size is what QEMU's largest L1 table (32 MiB) maps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdisk import qemu_img, qemu_io
from vdisk.qemu_img import QemuImgError
from vdisk_block import open_disk
from vdisk_block.create import create_qcow2
from vdisk_block.errors import RequestError
from vdisk_block.files import OwnedTemp, temp_path

MiB = 1 << 20
L1_LIMIT_ENTRIES = (32 * MiB) // 8


def l1_span(cs: int) -> int:
    """Guest bytes one L1 entry maps."""
    return cs * (cs // 8)


def largest(cs: int) -> int:
    return L1_LIMIT_ENTRIES * l1_span(cs)


def one_block_full(cs: int) -> int:
    """The largest size whose metadata one refcount block still counts."""
    l1_clusters = cs // 2 - 3
    return l1_clusters * (cs // 8) * l1_span(cs)


def table_full(cs: int) -> int:
    """The largest size whose refcount blocks one refcount table cluster lists
    (cs/8 blocks, each counting cs/2 clusters)."""
    blocks = cs // 8
    l1_clusters = blocks * (cs // 2) - 1 - 1 - blocks
    return l1_clusters * (cs // 8) * l1_span(cs)


CASES = [
    (512, one_block_full(512)), (512, one_block_full(512) + 512),
    (512, table_full(512)), (512, table_full(512) + 512), (512, largest(512)),
    (4096, one_block_full(4096)), (4096, one_block_full(4096) + 512), (4096, largest(4096)),
    (65536, largest(65536)),
    (2 * MiB, largest(2 * MiB)),
]


@pytest.mark.parametrize("cs,size", CASES, ids=[f"{cs}-{size}" for cs, size in CASES])
def test_created_image_checks_clean_and_takes_writes(tmp_path: Path, cs: int, size: int) -> None:
    image = tmp_path / "disk.qcow2"
    create_qcow2(str(image), size, cluster_bits=cs.bit_length() - 1)
    qemu_img.check_clean(image, allow_leaks=False)
    info = qemu_img.info(image)
    assert info["virtual-size"] == size and info["cluster-size"] == cs
    disk = open_disk(str(image))
    try:
        disk.write(b"\x5a" * 4096, 0)
        disk.write(b"\xa5" * 4096, size - 4096)
        disk.flush()
    finally:
        for f in disk.layers:
            f.close()
    qemu_img.check_clean(image, allow_leaks=False)
    qemu_io.run(image, "read -P 0x5a 0 4k", f"read -P 0xa5 {size - 4096} 4k", "read -P 0 4k 4k")


@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
def test_size_limit_is_qemu_img_s(tmp_path: Path, cs: int) -> None:
    """qemu-img create takes the largest size and refuses 512 bytes more: so do we."""
    image = tmp_path / "disk.qcow2"
    too_large = largest(cs) + 512
    with pytest.raises(QemuImgError, match="too large"):
        qemu_img.create(tmp_path / "qemu.qcow2", "qcow2", too_large, options={"cluster_size": cs})
    with pytest.raises(RequestError, match=f"too large for {cs}-byte clusters "
                                           f"\\(at most {largest(cs)} bytes\\)"):
        create_qcow2(str(image), too_large, cluster_bits=cs.bit_length() - 1)
    assert os.listdir(tmp_path) == []


def test_a_stale_temporary_is_replaced(tmp_path: Path) -> None:
    """A ``.NAME.creating`` a killed creation left (nobody holds it) is no obstacle."""
    image = tmp_path / "new.qcow2"
    stale = Path(temp_path(str(image), ".creating"))
    stale.write_bytes(b"half an image")
    create_qcow2(str(image), MiB)
    qemu_img.check_clean(image, allow_leaks=False)
    assert sorted(os.listdir(tmp_path)) == ["new.qcow2"]


def test_a_live_temporary_is_left_alone(tmp_path: Path) -> None:
    """Another creation of the same image is under way: EEXIST, its file untouched."""
    image = tmp_path / "new.qcow2"
    with OwnedTemp.create(str(image)) as other:
        os.write(other.fd, b"theirs")
        with pytest.raises(FileExistsError):
            create_qcow2(str(image), MiB)
        assert Path(other.path).read_bytes() == b"theirs"
        assert os.listdir(tmp_path) == [os.path.basename(other.path)]


def test_an_existing_image_is_never_replaced(tmp_path: Path) -> None:
    image = tmp_path / "new.qcow2"
    image.write_bytes(b"someone's image")
    with pytest.raises(FileExistsError):
        create_qcow2(str(image), MiB)
    assert image.read_bytes() == b"someone's image"
    assert os.listdir(tmp_path) == ["new.qcow2"]
