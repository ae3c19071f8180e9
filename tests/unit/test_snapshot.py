"""Creating images and snapshotting a disk that is being written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_matches_oracle, raw_view

from vdisk import qemu_img, qemu_io
from vdisk_block import ImageError
from vdisk_block.chainops import snapshot
from vdisk_block.create import create_qcow2

MiB = 1 << 20


@pytest.mark.parametrize("cluster_bits", [9, 16, 21])
def test_created_image_is_what_qemu_img_expects(tmp_path: Path, cluster_bits: int) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=5 * MiB + 512)
    qemu_io.run(base, "write -P 0x31 1M 1M")
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), 5 * MiB + 512, cluster_bits=cluster_bits, backing="base.qcow2",
                 backing_format="qcow2")
    info = qemu_img.info(top)
    assert info["virtual-size"] == 5 * MiB + 512
    assert info["cluster-size"] == 1 << cluster_bits
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert qemu_img.check(top)["corruptions"] == 0 and qemu_img.check(top)["leaks"] == 0
    qemu_img.compare(top, base)
    qemu_io.run(top, "write -P 0x32 0 100k")        # QEMU can write what we created
    qemu_img.check_clean(top, allow_leaks=False)


def test_create_never_replaces_an_image(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    img.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        create_qcow2(str(img), MiB)
    assert img.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.qcow2"]


def test_snapshots_freeze_the_top(tmp_path: Path, opened) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=8 * MiB)
    qemu_io.run(base, "write -P 0x41 0 8M")
    oracle = bytearray(raw_view(base, tmp_path))
    d = opened(base)
    frozen: list[tuple[Path, str, bytes]] = []
    for i in range(5):
        data = os.urandom(300_000 + i)
        off = i * 1_234_567
        d.write(data, off)
        oracle[off:off + len(data)] = data
        d.zero(70_000, off + 500_000)
        oracle[off + 500_000:off + 570_000] = bytes(70_000)
        old = Path(d.path)
        new = tmp_path / f"snap{i}.qcow2"
        snapshot(d, str(new))
        frozen.append((old, _sha(old), bytes(oracle)))
        assert d.path == str(new)
        assert d.read(d.size, 0) == oracle
        r = subprocess.run(["qemu-io", "-c", "write 0 4k", str(old)], capture_output=True,
                           text=True)
        assert r.returncode != 0 and "lock" in r.stderr, "a frozen image must stay read-only"
    d.write(b"\x99" * 5000, 3)
    oracle[3:5003] = b"\x99" * 5000
    d.close()
    for old, digest, content in frozen:
        assert _sha(old) == digest, f"{old.name} changed after it was frozen"
        assert raw_view(old, tmp_path) == content
        qemu_img.check_clean(old)
    assert len(qemu_img.info(new, backing_chain=True)) == 6
    assert_matches_oracle(new, oracle, tmp_path)


def test_read_only_disk_cannot_snapshot(tmp_path: Path, opened) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img.create(img, size=MiB)
    d = opened(img, readonly=True)
    with pytest.raises(ImageError):
        snapshot(d, str(tmp_path / "snap.qcow2"))
    assert not (tmp_path / "snap.qcow2").exists()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _blocked_in(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_write_racing_a_snapshot_lands_in_the_new_top(tmp_path: Path, opened) -> None:
    """A write that arrives while a snapshot runs must go to the new top, not the frozen one."""
    img = tmp_path / "img.qcow2"
    qemu_img.create(img, size=MiB)
    d = opened(img)
    data = b"\x5a" * 4096
    with d.lock:
        t = threading.Thread(target=d.write, args=(data, 8192))
        t.start()
        deadline = time.monotonic() + 10
        while not _blocked_in(t, "write") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert _blocked_in(t, "write")
        snapshot(d, str(tmp_path / "snap.qcow2"))
    t.join(10)
    assert d.read(4096, 8192) == data
    d.close()
    assert raw_view(img, tmp_path)[8192:12288] == bytes(4096), "the frozen image changed"
    assert raw_view(tmp_path / "snap.qcow2", tmp_path)[8192:12288] == data
