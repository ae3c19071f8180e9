"""What the job tests found besides the known holes, each on the smallest case.

* A backing image shorter than the disk as the target: the job starts, then
  fails ("request ... is outside the disk").
* Zeroing (without trim) a compressed cluster whose data starts at an odd
  byte leaves it: bit 0 of a compressed L2 entry is part of its offset, and
  was taken for the zero flag.
* A cancel while the copy pass syncs the target fails ("another process holds
  the write permission"): the job stays ``copying`` with its target closed.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import jobcheck
import pytest
from jobcheck import verify_view
from jobshapes import LayerSpec, ShapeSpec, build

from vdisk_block import ImageError, mirrorcopy, open_disk
from vdisk_block.mirror import MirrorJob, State

pytestmark = pytest.mark.differential

KiB = 1024
MiB = 1024 * KiB


def v3(cluster: int, size: int, *io: tuple[str, int, int, int]) -> LayerSpec:
    return LayerSpec("qcow2", "1.1", cluster, size, tuple(io))


def test_target_shorter_than_the_disk(tmp_path: Path) -> None:
    """A backing image shorter than the disk as the target: the job is refused
    up front, or it ends with the whole disk in the target (QEMU's commit grows
    the target); it must not start and then fail."""
    spec = ShapeSpec(2 * MiB, (
        v3(64 * KiB, 1 * MiB, ("data", 0, 1 * MiB, 1)),
        v3(64 * KiB, 2 * MiB, ("data", 1536 * KiB, 64 * KiB, 2)),
    ))
    built = build(spec, tmp_path)
    disk = open_disk(str(built.top))
    try:
        try:
            job = MirrorJob(disk, 1).start()
        except ImageError as e:
            assert "\n" not in str(e)
            return
        state = job.wait((State.READY,), 30)
        assert state is State.READY, f"the job started, then {state.value}: {job.error}"
        job.complete()
        verify_view(disk.read, built.initial, "after the pivot")
    finally:
        disk.close()
    jobcheck.qemu_final(built.paths[0], built.initial, tmp_path / "m.raw", "the target")


def test_zero_clears_a_compressed_cluster_at_an_odd_offset(tmp_path: Path) -> None:
    """Two compressed clusters; the second one's data starts at an odd byte (its
    L2 entry has bit 0 set, which in a compressed entry is part of the offset,
    not the zero flag). A write of zeros (no trim) must clear both."""
    img = tmp_path / "c.qcow2"
    built = _compressed_pair(img)
    disk = open_disk(str(img))
    try:
        e = disk.top.entry(1) if disk.top else 0
        assert e & 1, f"the second compressed cluster starts at an even byte: {e:#x}"
        disk.zero(8 * KiB, 0, may_trim=False)
        got = disk.read(8 * KiB, 0)
        assert got == bytes(8 * KiB), \
            f"after zero: {jobcheck.first_difference(got, bytes(8 * KiB))}"
    finally:
        disk.close()
    jobcheck.qemu_final(img, bytes(8 * KiB) + built[8 * KiB:], tmp_path / "m.raw", "zeroed")


def _compressed_pair(img: Path) -> bytes:
    from vdisk import qemu_img, qemu_io

    qemu_img.create(img, "qcow2", 1 * MiB, options={"cluster_size": 4 * KiB})
    cmds = []
    for k in range(2):
        src = img.parent / f"src{k}"
        src.write_bytes(random.Random(k).randbytes(101).ljust(4 * KiB, b"\0"))
        cmds.append(f"write -c -s {src} {k * 4 * KiB} 4k")
    qemu_io.run(img, *cmds)
    for k in range(2):
        os.unlink(img.parent / f"src{k}")
    return jobcheck.on_disk_view(img, img.parent / "view.raw")


class _SyncingOs:
    """The os module as the copy pass (mirrorcopy.py) sees it, but the copy
    thread's fdatasync keeps the file in use (as the system call does) until
    the test lets it finish."""

    def __init__(self) -> None:
        self.syncing = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdatasync(self, fd: int) -> None:
        if threading.current_thread().name != "vdisk-mirror":
            os.fdatasync(fd)
            return
        held = os.dup(fd)               # the file stays open while the call runs
        try:
            self.syncing.set()
            self.release.wait(10)
            os.fdatasync(held)
        finally:
            os.close(held)


def test_cancel_while_the_copy_syncs_the_target(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ShapeSpec(2 * MiB, (v3(64 * KiB, 2 * MiB, ("data", 0, 2 * MiB, 1)),
                               v3(64 * KiB, 2 * MiB, ("data", 256 * KiB, 512 * KiB, 2))))
    built = build(spec, tmp_path)
    slow = _SyncingOs()
    monkeypatch.setattr(mirrorcopy, "os", slow)
    disk = open_disk(str(built.top))
    try:
        job = MirrorJob(disk, 1).start()
        assert slow.syncing.wait(10), "the copy pass never synced the target"
        try:
            job.cancel()
            error = None
        except ImageError as e:
            error = str(e)
        finally:
            slow.release.set()
        assert error is None, f"cancel while the copy syncs: {error}"
        assert job.wait((State.CANCELLED,), 10) is State.CANCELLED, job.state
        assert disk.job is None
        verify_view(disk.read, built.initial, "after the cancel")
    finally:
        slow.release.set()
        disk.close()
    jobcheck.qemu_final(built.top, built.initial, tmp_path / "m.raw", "after the cancel")
