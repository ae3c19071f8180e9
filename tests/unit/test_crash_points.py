"""Process death between any two writes to the image file.

A kill -9 stops the process between system calls, and everything it wrote
before stays in the page cache. This test replays one workload and stops it
before its k-th pwrite or fdatasync, for every k, then checks what a restart
would find:

    qemu-img check   no corruption (leaked clusters are allowed)
    contents         every byte written before the last completed flush and
                     not written after it reads back as it was written

The workload uses 512-byte clusters so that it allocates L2 tables and
refcount blocks, moves the refcount table, frees clusters and reuses them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import raw_view

from vdisk import qemu_img
from vdisk_block import open_disk

SIZE = 12 << 20
MiB = 1 << 20


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no finally writes anything."""


def _pattern(seed: int, n: int) -> bytes:
    return (bytes([seed % 251 + 1]) * 64 + seed.to_bytes(8, "big")) * (n // 72) + b"x" * (n % 72)


# Each step: (kind, offset, length, seed); a flush step marks a durability point.
WORKLOAD = [
    ("write", 0, 3 * MiB, 1),
    ("write", 5 * MiB + 300, 700_000, 2),
    ("flush", 0, 0, 0),
    ("write", 100, 5000, 3),                   # in place, unaligned
    ("zero", 5 * MiB, 1 * MiB, 0),             # frees clusters (may_trim)
    ("write", 3 * MiB - 200, 5 * MiB, 4),      # crosses 8 MiB: the refcount table moves
    ("trim", 1 * MiB, 512 * 1024, 0),
    ("flush", 0, 0, 0),
    ("write", 1 * MiB + 1000, 300_000, 5),     # reuses clusters freed above
    ("zero", 8 * MiB, 64 * 1024, 0),
    ("flush", 0, 0, 0),
]


def _apply(oracle: bytearray, kind: str, off: int, n: int, seed: int) -> None:
    if kind == "write":
        oracle[off:off + n] = _pattern(seed, n)
    elif kind in ("zero", "trim"):           # 512-byte clusters, aligned ranges: both zero
        oracle[off:off + n] = bytes(n)


def _run(image: Path, stop_at: int | None) -> tuple[int, bytearray | None, set[int]]:
    """Run WORKLOAD, dying before syscall number stop_at.

    Returns the syscall count, the oracle at the last completed flush, and the
    set of 512-byte sectors written after that flush (whose content is open).
    """
    calls = 0
    real: dict[str, Callable] = {"pwrite": os.pwrite, "fdatasync": os.fdatasync}

    def counted(name: str) -> Callable:
        def call(*args):
            nonlocal calls
            if stop_at is not None and calls == stop_at:
                raise Crash
            calls += 1
            return real[name](*args)
        return call

    oracle = bytearray(SIZE)
    durable: bytearray | None = None
    open_sectors: set[int] = set()
    d = open_disk(str(image))
    os.pwrite, os.fdatasync = counted("pwrite"), counted("fdatasync")
    try:
        for kind, off, n, seed in WORKLOAD:
            if kind == "flush":
                d.flush()
                durable, open_sectors = bytearray(oracle), set()
                continue
            _apply(oracle, kind, off, n, seed)
            open_sectors.update(range(off // 512, (off + n + 511) // 512))
            if kind == "write":
                d.write(_pattern(seed, n), off)
            elif kind == "zero":
                d.zero(n, off, may_trim=True)
            else:
                d.trim(n, off)
    except Crash:
        pass
    finally:
        os.pwrite, os.fdatasync = real["pwrite"], real["fdatasync"]
        for f in d.layers:
            f.close()
    return calls, durable, open_sectors


@pytest.mark.crash
def test_every_crash_point_leaves_a_consistent_image(tmp_path: Path) -> None:
    template = tmp_path / "template.qcow2"
    qemu_img.create(template, size=SIZE, options={"cluster_size": 512})
    total, _, _ = _run(_copy(template, tmp_path / "count.qcow2"), None)
    assert total > 50
    step = max(1, total // 150)
    points = sorted(set(range(0, total, step)) | set(range(total - 20, total)))
    for k in points:
        image = _copy(template, tmp_path / "trial.qcow2")
        _, durable, open_sectors = _run(image, k)
        result = qemu_img.check(image)
        assert result["corruptions"] == 0, f"crash before syscall {k}: {result}"
        view = bytearray(raw_view(image, tmp_path))
        expected = durable if durable is not None else bytes(SIZE)
        for s in open_sectors:                 # their content is not promised
            view[s * 512:(s + 1) * 512] = expected[s * 512:(s + 1) * 512]
        if view != expected:
            bad = next(i for i in range(SIZE) if view[i] != expected[i]) // 512
            pytest.fail(f"crash before syscall {k}: sector {bad} lost flushed data")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
