"""qcow2 variants QEMU creates, written through vdisk: refcount widths, refcount
table growth, lazy refcounts, internal snapshots, large sparse disks.

Writes end the usual way: stop the server, ``qemu-img check`` clean (no
corruptions and no leaks: nothing crashed) and ``qemu-img compare`` equal to
what the test wrote.
"""

from __future__ import annotations

from pathlib import Path

import nbd
import pytest
from nbdharness import HOLE, ZERO, KiB, MiB, extents, first_difference, pattern, read_all

from vdisk import qemu_img, qemu_io
from vdisk.errors import NbdkitError


def finish(served, image: Path, expected: bytes) -> None:
    served.stop()
    result = qemu_img.check(image)
    assert result["corruptions"] == 0 and result["leaks"] == 0, result
    raw = image.with_suffix(".expected")
    raw.write_bytes(expected)
    qemu_img.compare(raw, image, fmt_a="raw", fmt_b="qcow2")


def scatter_writes(h: nbd.NBD, expected: bytearray, step: int, length: int, seed: int) -> None:
    for i, offset in enumerate(range(0, len(expected) - length, step)):
        data = pattern(seed + i, length)
        h.pwrite(data, offset)
        expected[offset : offset + length] = data


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(serve, workdir: Path, bits: int) -> None:
    image = workdir / "disk.qcow2"
    qemu_img.create(image, "qcow2", 4 * MiB, options={"refcount_bits": bits, "cluster_size": 4096})
    qemu_io.run(image, "write -P 0x11 0 1M", fmt="qcow2")
    expected = bytearray(b"\x11" * MiB + bytes(3 * MiB))
    served = serve(image)
    h = served.connect()
    scatter_writes(h, expected, 12345, 777, bits * 1000)
    h.trim(MiB, MiB)  # v3: whole clusters read as zeros
    expected[MiB : 2 * MiB] = bytes(MiB)
    h.zero(100000, 2 * MiB + 5)
    expected[2 * MiB + 5 : 2 * MiB + 100005] = bytes(100000)
    # rewrite the trimmed range: freed clusters may be reused
    scatter_writes(h, expected, 40000, 9000, bits * 2000)
    h.flush()
    finish(served, image, bytes(expected))


@pytest.mark.parametrize(
    "cluster_size,bits,size",
    [(512, 16, 8 * MiB), (512, 64, 8 * MiB), (1024, 64, 16 * MiB)],
    ids=["512-rc16-8M", "512-rc64-8M", "1k-rc64-16M"],
)
def test_refcount_table_growth(
    serve, workdir: Path, cluster_size: int, bits: int, size: int
) -> None:
    """Filling the disk needs new refcount blocks and a larger, moved refcount table."""
    image = workdir / "disk.qcow2"
    qemu_img.create(
        image, "qcow2", size, options={"refcount_bits": bits, "cluster_size": cluster_size}
    )
    table_before = qemu_img_header_refcount_table(image)
    served = serve(image)
    h = served.connect()
    expected = bytearray(size)
    for i, offset in enumerate(range(0, size, MiB)):
        data = pattern(i, MiB)
        h.pwrite(data, offset)
        expected[offset : offset + MiB] = data
    h.flush()
    assert read_all(h) == expected
    served.stop()
    assert qemu_img_header_refcount_table(image) != table_before, "the table did not move"
    result = qemu_img.check(image)
    assert result["corruptions"] == 0 and result["leaks"] == 0, result
    got = qemu_raw(image)
    assert got == expected, first_difference(got, bytes(expected))


def qemu_img_header_refcount_table(image: Path) -> tuple[int, int]:
    with image.open("rb") as f:
        head = f.read(60)
    return int.from_bytes(head[48:56], "big"), int.from_bytes(head[56:60], "big")


def qemu_raw(image: Path) -> bytes:
    raw = image.with_suffix(".view")
    qemu_img.convert(image, raw, "raw")
    data = raw.read_bytes()
    raw.unlink()
    return data


def test_lazy_refcounts_clean_image(serve, workdir: Path) -> None:
    image = workdir / "disk.qcow2"
    qemu_img.create(image, "qcow2", 4 * MiB, options={"lazy_refcounts": True})
    qemu_io.run(image, "write -P 0x21 0 256k", fmt="qcow2")
    assert qemu_img.info(image)["dirty-flag"] is False
    expected = bytearray(b"\x21" * 256 * KiB + bytes(4 * MiB - 256 * KiB))
    served = serve(image)
    h = served.connect()
    scatter_writes(h, expected, 300 * KiB, 70 * KiB, 77)
    h.flush()
    finish(served, image, bytes(expected))
    assert qemu_img.info(image)["dirty-flag"] is False


@pytest.fixture
def snapshotted(workdir: Path) -> Path:
    image = workdir / "disk.qcow2"
    qemu_img.create(image, "qcow2", 4 * MiB)
    qemu_io.run(image, "write -P 0x31 0 1M", fmt="qcow2")
    qemu_img.run(["snapshot", "-c", "s1", image])
    qemu_io.run(image, "write -P 0x32 512k 1M", fmt="qcow2")
    return image


def snapshot_view(image: Path, name: str) -> bytes:
    raw = image.with_suffix(".snap")
    qemu_img.run(["convert", "-l", f"snapshot.name={name}", "-O", "raw", image, raw])
    data = raw.read_bytes()
    raw.unlink()
    return data


def test_internal_snapshot_read_only(serve, snapshotted: Path) -> None:
    h = serve(snapshotted, readonly=True).connect()
    assert read_all(h) == qemu_raw(snapshotted)


def test_internal_snapshot_write(serve, snapshotted: Path) -> None:
    """Either refused by name, or writes copy shared clusters and the snapshot survives."""
    snap = snapshot_view(snapshotted, "s1")
    before = snapshotted.read_bytes()
    try:
        served = serve(snapshotted)
    except NbdkitError as e:
        assert "snapshot" in e.stderr.lower(), e.stderr
        assert snapshotted.read_bytes() == before
        return
    expected = bytearray(qemu_raw(snapshotted))
    h = served.connect()
    scatter_writes(h, expected, 200 * KiB, 100 * KiB, 5)
    finish(served, snapshotted, bytes(expected))
    assert snapshot_view(snapshotted, "s1") == snap


@pytest.mark.slow
@pytest.mark.parametrize(
    "size,cluster_size",
    [(1 << 40, 64 * KiB), (1 << 40, 4 * KiB), (2 << 40, 4 * KiB)],
    ids=["1T-64k", "1T-4k", "2T-4k"],
)
def test_large_sparse_disk(serve, workdir: Path, size: int, cluster_size: int) -> None:
    """Terabyte disks are ordinary: an empty one serves in modest memory."""
    image = workdir / "disk.qcow2"
    qemu_img.create(image, "qcow2", size, options={"cluster_size": cluster_size})
    served = serve(image)
    rss = resident_kib(served.server.pid)
    h = served.connect()
    assert h.get_size() == size
    tail = size - 3 * cluster_size - 100
    assert h.pread(4096, tail) == bytes(4096)
    assert extents(h, 0, 64 * MiB) == [(0, 64 * MiB, HOLE | ZERO)]
    h.pwrite(b"\x5a" * 2 * cluster_size, tail)
    h.flush()
    served.stop()
    assert qemu_img.check(image)["corruptions"] == 0
    qemu_io.run(image, f"read -P 0x5a {tail} {2 * cluster_size}", fmt="qcow2")
    assert rss < 512 * 1024, f"nbdkit uses {rss // 1024} MiB to serve an empty disk"


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
