"""Images in the states a crash (or another writer) leaves behind, served read-write.

A crash between extending the file with new clusters and writing the
refcount block that would count them leaves leaked clusters and a file longer
than its refcount blocks cover. ``qemu-img convert -c`` leaves a file whose end
is not cluster-aligned. QEMU writes to all of these; so must vdisk, without
corrupting them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from nbdharness import KiB, MiB, first_difference, pattern, read_all

from vdisk import qemu_img, qemu_io

SIZE = 4 * MiB


def qemu_view(image: Path) -> bytes:
    raw = image.with_suffix(".view")
    qemu_img.convert(image, raw, "raw")
    data = raw.read_bytes()
    raw.unlink()
    return data


def leak_to_the_end_of_coverage(image: Path, cs: int, bits: int, extra_clusters: int) -> None:
    """Give every cluster the last refcount block covers a refcount (leaks beyond the
    image end), then make the file longer than the blocks cover."""
    per_block = cs * 8 // bits
    fmt = {16: ">H", 64: ">Q"}[bits]
    with image.open("r+b") as f:
        head = f.read(60)
        rt_offset, rt_clusters = struct.unpack_from(">QI", head, 48)
        f.seek(rt_offset)
        table = struct.unpack(f">{rt_clusters * cs // 8}Q", f.read(rt_clusters * cs))
        last = max(i for i, off in enumerate(table) if off)
        f.seek(table[last])
        block = f.read(cs)
        width = bits // 8
        counts = [struct.unpack_from(fmt, block, i * width)[0] for i in range(per_block)]
        f.seek(table[last])
        f.write(b"".join(struct.pack(fmt, c or 1) for c in counts))
        f.truncate(((last + 1) * per_block + extra_clusters) * cs)


@pytest.mark.parametrize(
    "cs,bits", [(512, 64), (64 * KiB, 16)], ids=["512-rc64", "64k-rc16"]
)
def test_file_longer_than_refcount_coverage(serve, workdir: Path, cs: int, bits: int) -> None:
    image = workdir / "disk.qcow2"
    qemu_img.create(image, "qcow2", SIZE, options={"cluster_size": cs, "refcount_bits": bits})
    qemu_io.run(image, "write -P 0x11 0 1M", fmt="qcow2")
    leak_to_the_end_of_coverage(image, cs, bits, extra_clusters=50)
    result = qemu_img.check(image)
    assert result["corruptions"] == 0 and result["leaks"] > 0, result
    expected = bytearray(qemu_view(image))
    served = serve(image)
    h = served.connect()
    for i, (offset, length) in enumerate([(3 * MiB, 64 * KiB), (2 * MiB + 7, 3 * cs + 1)]):
        data = pattern(i, length)
        h.pwrite(data, offset)  # allocates: new clusters come from past the covered end
        expected[offset : offset + length] = data
    h.flush()
    assert read_all(h) == expected
    served.stop()
    assert qemu_img.check(image)["corruptions"] == 0
    got = qemu_view(image)
    assert got == expected, first_difference(got, bytes(expected))


def test_compressed_image_as_top(serve, workdir: Path) -> None:
    """The file of a compressed image ends mid-cluster: new clusters must be aligned."""
    scratch, image = workdir / "scratch.qcow2", workdir / "disk.qcow2"
    qemu_img.create(scratch, "qcow2", SIZE)
    qemu_io.run(scratch, "write -P 0x21 0 1M", "write -P 0x22 3M 100k", fmt="qcow2")
    qemu_img.convert(scratch, image, "qcow2", compressed=True)
    assert image.stat().st_size % (64 * KiB), "expected a file end inside a cluster"
    expected = bytearray(qemu_view(image))
    served = serve(image)
    h = served.connect()
    for i, (offset, length) in enumerate([(100, 5000), (2 * MiB, 128 * KiB), (3 * MiB + 1, 10)]):
        data = pattern(50 + i, length)
        h.pwrite(data, offset)  # over compressed data, and into new clusters
        expected[offset : offset + length] = data
    h.trim(64 * KiB, 512 * KiB)  # frees compressed clusters
    expected[512 * KiB : 576 * KiB] = bytes(64 * KiB)
    h.flush()
    served.stop()
    result = qemu_img.check(image)
    assert result["corruptions"] == 0 and result["leaks"] == 0, result
    got = qemu_view(image)
    assert got == expected, first_difference(got, bytes(expected))
