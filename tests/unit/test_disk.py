"""Engine behaviour without nbdkit, with qemu-img and qemu-io as the oracle."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import assert_matches_oracle, raw_view

from vdisk import qemu_img, qemu_io
from vdisk_block import ImageError
from vdisk_block.errors import ImageLocked, NotFast

MiB = 1 << 20


def _chain(tmp: Path, *, top_opts: dict | None = None, base_fmt: str = "qcow2") -> Path:
    """base (pattern 0x11 over the first 3 MiB, raw or qcow2) <- mid <- top; 8 MiB."""
    base = tmp / f"base.{base_fmt}"
    qemu_img.create(base, base_fmt, size=8 * MiB)
    qemu_io.run(base, "write -P 0x11 0 3M", fmt=base_fmt)
    mid = tmp / "mid.qcow2"
    qemu_img.create(mid, backing=base.name, backing_fmt=base_fmt)
    qemu_io.run(mid, "write -P 0x22 2M 2M")
    top = tmp / "top.qcow2"
    qemu_img.create(top, backing=mid.name, backing_fmt="qcow2", options=top_opts)
    return top


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_reads_equal_qemu(tmp_path: Path, opened, base_fmt: str) -> None:
    top = _chain(tmp_path, base_fmt=base_fmt)
    qemu_io.run(top, "write -P 0x33 100k 5k", "write -z 2500k 64k")
    expected = raw_view(top, tmp_path)
    d = opened(top, readonly=True)
    assert d.read(d.size, 0) == expected
    assert d.read(7, 100 * 1024 - 3) == expected[100 * 1024 - 3:100 * 1024 + 4]


@pytest.mark.parametrize("top_opts", [None, {"compat": "0.10"}, {"cluster_size": 4096},
                                      {"cluster_size": 2 * MiB}])
def test_writes_zero_trim_over_backing(tmp_path: Path, opened, top_opts) -> None:
    top = _chain(tmp_path, top_opts=top_opts)
    oracle = bytearray(raw_view(top, tmp_path))
    d = opened(top)
    cs = d.cluster_size
    ops = [("w", 1000, 200_000), ("z", 2 * MiB - 7, 300_000), ("w", 6 * MiB, 9),
           ("z", 0, 3 * cs), ("t", 4 * MiB, min(2 * cs + 1, 4 * MiB)), ("w", 3 * MiB + 5, 70_000)]
    for i, (op, off, n) in enumerate(ops):
        if op == "w":
            data = os.urandom(n)
            d.write(data, off)
            oracle[off:off + n] = data
        elif op == "z":
            d.zero(n, off, may_trim=bool(i % 2))
            oracle[off:off + n] = bytes(n)
        else:
            d.trim(n, off)
            first, end = -(-off // cs), (off + n) // cs
            if top_opts != {"compat": "0.10"}:         # v3 trim reads zeros; v2 keeps backing
                oracle[first * cs:end * cs] = bytes((end - first) * cs)
    assert d.read(d.size, 0) == oracle
    d.close()
    assert_matches_oracle(top, oracle, tmp_path)


def test_fast_zero_refused_when_zeros_must_be_written(tmp_path: Path, opened) -> None:
    top = _chain(tmp_path, top_opts={"compat": "0.10"})
    before = top.read_bytes()
    d = opened(top)
    with pytest.raises(NotFast) as e:
        d.zero(64 * 1024, 0, fast=True)     # v2 cannot mark a cluster zero over backing data
    assert e.value.errno == errno.ENOTSUP
    d.close()
    assert top.read_bytes() == before


def test_backing_shorter_than_child_reads_zeros_beyond_it(tmp_path: Path, opened) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=4 * MiB)
    qemu_io.run(base, "write -P 0x44 0 4M")
    mid = tmp_path / "mid.qcow2"
    qemu_img.create(mid, size=MiB + 512, backing="base.qcow2", backing_fmt="qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=3 * MiB, backing="mid.qcow2", backing_fmt="qcow2")
    expected = raw_view(top, tmp_path)
    d = opened(top)
    got = d.read(d.size, 0)
    assert got == expected
    assert got[MiB + 512:] == bytes(2 * MiB - 512)
    d.write(b"\xee" * 100, MiB + 400)           # COW across the backing's end
    oracle = bytearray(expected)
    oracle[MiB + 400:MiB + 500] = b"\xee" * 100
    d.close()
    assert_matches_oracle(top, oracle, tmp_path)


def test_compressed_base(tmp_path: Path, opened) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img.create(src, size=4 * MiB)
    qemu_io.run(src, "write -P 0x55 0 1M", "write -P 0x66 2M 1536k")
    base = tmp_path / "base.qcow2"
    qemu_img.convert(src, base, "qcow2", compressed=True)
    assert base.stat().st_size < 512 * 1024, "2.5 MiB of patterns must have been compressed"
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, backing="base.qcow2", backing_fmt="qcow2")
    oracle = bytearray(raw_view(top, tmp_path))
    d = opened(top)
    assert d.read(d.size, 0) == oracle
    d.write(b"\x01" * 1000, 2 * MiB + 5000)
    oracle[2 * MiB + 5000:2 * MiB + 6000] = b"\x01" * 1000
    d.close()
    assert_matches_oracle(top, oracle, tmp_path)


def test_writing_compressed_clusters_of_the_top(tmp_path: Path, opened) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img.create(src, size=2 * MiB)
    qemu_io.run(src, "write -P 0x77 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img.convert(src, top, "qcow2", compressed=True)
    oracle = bytearray(raw_view(top, tmp_path))
    d = opened(top)
    d.write(b"\x02" * 70_000, 10)
    oracle[10:70_010] = b"\x02" * 70_000
    d.trim(MiB, MiB)
    oracle[MiB:] = bytes(MiB)
    d.close()
    assert_matches_oracle(top, oracle, tmp_path)


def test_extents_match_qemu_img_map(tmp_path: Path, opened) -> None:
    top = _chain(tmp_path)
    qemu_io.run(top, "write -z 2M 128k")
    d = opened(top, readonly=True)
    ours = [(o, n) for o, n, flags in d.extents(d.size, 0) if flags == 0]
    theirs = [(e["start"], e["length"]) for e in qemu_img.map(top) if e["data"]]
    assert _merge(ours) == _merge(theirs)
    assert d.extents(10, 5 * MiB + 3) == [(5 * MiB + 3, 10, 3)]


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for o, n in extents:
        if out and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((o, n))
    return out


def test_requests_outside_the_disk_are_refused(tmp_path: Path, opened) -> None:
    top = _chain(tmp_path)
    d = opened(top)
    for call in (lambda: d.read(2, d.size - 1), lambda: d.write(b"x", d.size),
                 lambda: d.zero(1, -1), lambda: d.extents(1, d.size)):
        with pytest.raises(ImageError) as e:
            call()
        assert e.value.errno == errno.EINVAL


def test_read_only_disk_refuses_writes(tmp_path: Path, opened) -> None:
    d = opened(_chain(tmp_path), readonly=True)
    with pytest.raises(ImageError) as e:
        d.write(b"x", 0)
    assert e.value.errno == errno.EROFS


def test_qemu_locks_are_honoured(tmp_path: Path, opened) -> None:
    top = _chain(tmp_path)
    opened(top)
    with pytest.raises(ImageLocked):
        opened(top)
    r = subprocess.run(["qemu-io", "-c", "write 0 4k", str(top)], capture_output=True, text=True)
    assert r.returncode != 0 and "lock" in r.stderr
    r = subprocess.run(["qemu-io", "-c", "write 0 4k", str(tmp_path / "mid.qcow2")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "lock" in r.stderr, "a backing file must not be writable"


def test_foreign_autoclear_bits_are_cleared_on_first_write(tmp_path: Path, opened) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img.create(img, size=MiB)
    qemu_img.run(["bitmap", "--add", img, "b0"])
    assert _autoclear(img) & 1
    d = opened(img)
    d.read(4096, 0)
    assert _autoclear(img) & 1, "reading must not change the header"
    d.write(b"x", 0)
    d.close()
    # the bitmaps bit is gone; only vdisk's own identity bit is set
    assert _autoclear(img) == 1 << 63
    qemu_img.check_clean(img)


def _autoclear(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(88)
        return struct.unpack(">Q", f.read(8))[0]


def test_the_first_flush_after_opening_syncs(tmp_path: Path, opened, monkeypatch) -> None:
    """What a killed server acknowledged is in the page cache only; the
    restarted server's first flush must make it durable although it has
    written nothing itself."""
    image = tmp_path / "a.qcow2"
    qemu_img.create(image, size=MiB)
    d = opened(image)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    d.flush()
    assert synced
    synced.clear()
    d.flush()                                   # nothing new since: no sync needed
    assert not synced
