"""What a crash (or another writer) leaves behind.

Images: a crash between extending the file with new clusters and writing the
refcount block that would count them leaves leaked clusters and a file longer
than its refcount blocks cover. ``qemu-img convert -c`` leaves a file whose end
is not cluster-aligned. QEMU writes to all of these; so must vdisk, without
corrupting them.

Files: ``vdisk disk import`` and ``disk create`` killed (SIGKILL) at each step
leave at most a stale temporary (swept by the next command) and, once an image
was renamed into place, whole images no disk names; the same command run
again succeeds. A stale ``.NEW.creating`` does not stop ``consolidate --to
NEW``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nbdharness import KiB, MiB, first_difference, pattern, read_all

from vdisk import qemu_img, qemu_io
from vdisk_block.files import OwnedTemp, temp_path

CLIPAUSE = Path(__file__).resolve().parent / "clipause.py"
VDISK = [sys.executable, "-m", "vdisk.cli"]
PAUSE_DEADLINE_S = 30

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


# -- files a killed command leaves ---------------------------------------------------------


def vdisk(*args: str | os.PathLike[str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([*VDISK, *map(str, args)], stdin=subprocess.DEVNULL,
                        capture_output=True, text=True, timeout=60, check=False)
    if ok:
        assert cp.returncode == 0, cp.stderr
    else:
        assert cp.returncode == 1 and len(cp.stderr.splitlines()) == 1, cp.stderr
    return cp


def kill_at(point: str, tmp: Path, *args: str | os.PathLike[str]) -> None:
    """Run ``vdisk ARGS`` until it reaches point (clipause.py), then SIGKILL it."""
    marker = tmp / f"paused-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, str(CLIPAUSE), point, str(marker),
                             *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + PAUSE_DEADLINE_S
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"vdisk ended (exit {proc.returncode}) before {point}: "
                                     f"{proc.stderr.read() if proc.stderr else ''}")
            assert time.monotonic() < deadline, f"vdisk did not reach {point}"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    path = tmp_path / "ds"
    vdisk("datastore", "init", path)
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """raw base <- qcow2 mid <- qcow2 top: three layers to import."""
    qemu_img.create(tmp_path / "base.raw", "raw", 4 * MiB)
    qemu_io.run(tmp_path / "base.raw", "write -P 0x11 0 1M", fmt="raw")
    qemu_img.create(tmp_path / "mid.qcow2", backing="base.raw", backing_fmt="raw")
    qemu_io.run(tmp_path / "mid.qcow2", "write -P 0x22 1M 1M")
    qemu_img.create(tmp_path / "top.qcow2", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io.run(tmp_path / "top.qcow2", "write -P 0x33 2M 1M")
    return tmp_path / "top.qcow2"


def disk_chain(ds: Path, name: str) -> list[str]:
    info = json.loads(vdisk("disk", "info", name, "-d", ds, "--json").stdout)
    return [os.path.basename(p) for p in info["chain"]]


def check_after(ds: Path, name: str, renamed: int) -> None:
    """No temporary is left; the disk's images and ``renamed`` whole images
    nobody names (put in place before the kill) are all there is."""
    images = sorted(os.listdir(ds / "images"))
    assert not [n for n in images if n.startswith(".")], images
    chain = disk_chain(ds, name)
    orphans = [n for n in images if n not in chain]
    assert len(orphans) == renamed, images
    for n in images:
        qemu_img.check_clean(ds / "images" / n, allow_leaks=False)


# (point, images renamed into place before it) for a three-layer import
IMPORT_POINTS = [("qemu-img:convert:1", 0), ("qemu-img:convert:3", 0),
                 ("qemu-img:rebase:2", 0), ("rename:1", 0), ("rename:3", 2), ("add-disk", 3)]


@pytest.mark.crash
@pytest.mark.parametrize("point,renamed", IMPORT_POINTS, ids=[p for p, _ in IMPORT_POINTS])
def test_import_killed(ds: Path, source: Path, tmp_path: Path, point: str,
                       renamed: int) -> None:
    kill_at(point, tmp_path, "disk", "import", "vm", source, "-d", ds)
    vdisk("disk", "import", "vm", source, "-d", ds)
    check_after(ds, "vm", renamed)
    qemu_img.compare(ds / "images" / disk_chain(ds, "vm")[0], source)


@pytest.mark.crash
@pytest.mark.parametrize("point,renamed", [("rename:1", 0), ("add-disk", 1)])
def test_create_killed(ds: Path, tmp_path: Path, point: str, renamed: int) -> None:
    kill_at(point, tmp_path, "disk", "create", "vm", "--size", "16M", "-d", ds)
    vdisk("disk", "create", "vm", "--size", "16M", "-d", ds)
    check_after(ds, "vm", renamed)


@pytest.mark.crash
def test_consolidate_to_a_new_file_after_a_killed_creation(ds: Path) -> None:
    """A stale ``.NEW.creating`` (its creator killed) is replaced; a live one (a
    creation under way) is refused, and left alone."""
    vdisk("disk", "create", "vm", "--size", "16M", "-d", ds)
    vdisk("snapshot", "vm", "-d", ds)
    new = ds / "images" / "vm-new.qcow2"
    with OwnedTemp.create(str(new)) as live:
        failed = vdisk("consolidate", "vm", "--to", new, "-d", ds, ok=False)
        assert "File exists" in failed.stderr
        assert os.path.exists(live.path)
    Path(temp_path(str(new), ".creating")).write_bytes(b"left by a kill")
    vdisk("consolidate", "vm", "--to", new, "-d", ds)
    assert disk_chain(ds, "vm") == ["vm-new.qcow2"]
    assert sorted(os.listdir(ds / "images")) == ["vm-new.qcow2"]
    qemu_img.check_clean(new, allow_leaks=False)
