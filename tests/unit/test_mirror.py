"""The mirror job: one test per state transition, QEMU as the oracle."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_matches_oracle, raw_view

from vdisk import qemu_img, qemu_io
from vdisk_block import Disk, ImageError
from vdisk_block.chainops import snapshot
from vdisk_block.mirror import MirrorJob, State

MiB = 1 << 20
SIZE = 16 * MiB


class Guest:
    """Random writes, zeroes and trims with an in-memory oracle."""

    def __init__(self, disk: Disk, oracle: bytearray, seed: int = 1) -> None:
        self.disk, self.oracle, self.rnd = disk, oracle, random.Random(seed)

    def step(self) -> None:
        d, rnd = self.disk, self.rnd
        off = rnd.randrange(d.size)
        n = rnd.randrange(1, min(150_000, d.size - off) + 1)
        kind = rnd.random()
        if kind < 0.7:
            data = os.urandom(n)
            d.write(data, off)
            self.oracle[off:off + n] = data
        elif kind < 0.9:
            d.zero(n, off, may_trim=rnd.random() < 0.5)
            self.oracle[off:off + n] = bytes(n)
        else:                          # v3 top: whole clusters covered read zeros
            cs = d.cluster_size
            d.trim(n, off)
            first, end = -(-off // cs), (off + n) // cs
            self.oracle[first * cs:end * cs] = bytes(max(0, end - first) * cs)


@pytest.fixture
def chain(tmp_path: Path, opened):
    """base (data in the first half) <- snap1 (frozen, random data) <- top; and a Guest."""
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=SIZE)
    qemu_io.run(base, "write -P 0x11 0 8M")
    oracle = bytearray(raw_view(base, tmp_path))
    disk = opened(base)
    guest = Guest(disk, oracle)
    for _ in range(60):
        guest.step()
    snapshot(disk, str(tmp_path / "snap1.qcow2"))
    for _ in range(60):
        guest.step()
    snapshot(disk, str(tmp_path / "top.qcow2"))
    for _ in range(30):
        guest.step()
    return disk, guest


def _writable_by_qemu(path: Path) -> bool:
    r = subprocess.run(["qemu-io", "-c", "write 0 512", str(path)], capture_output=True,
                       check=False)
    return r.returncode == 0


def test_copying_ready_pivoting_done_under_load(chain, tmp_path: Path) -> None:
    disk, guest = chain
    seen: list[State] = []
    job = MirrorJob(disk, 1, chunk=64 * 1024, on_change=lambda j, st: seen.append(st)).start()
    while job.state is State.COPYING:
        guest.step()
    assert job.wait((State.READY,), 10) is State.READY
    for _ in range(20):
        guest.step()                      # mirrored while ready
    snap1 = tmp_path / "snap1.qcow2"
    dropped = job.complete()
    assert seen == [State.COPYING, State.READY, State.PIVOTING, State.DONE]
    assert dropped == [str(tmp_path / "top.qcow2")]
    assert disk.path == str(snap1)
    s = job.stats
    assert s.passes == 1 and 0 < s.bytes_copied <= s.copy_set_bytes and s.bytes_mirrored > 0
    assert disk.read(disk.size, 0) == guest.oracle
    for _ in range(20):
        guest.step()                      # the disk goes on on the target
    disk.close()
    assert len(qemu_img.info(snap1, backing_chain=True)) == 2
    assert_matches_oracle(snap1, guest.oracle, tmp_path)


def test_cancel_while_copying_changes_nothing_visible(chain, tmp_path: Path) -> None:
    disk, guest = chain
    before = disk.read(disk.size, 0)
    with disk.lock:                       # the copy thread cannot take a step yet
        job = MirrorJob(disk, 1, chunk=4096).start()
        job.cancel()
    assert job.state is State.CANCELLED and job.stats.bytes_copied == 0
    assert disk.job is None and disk.read(disk.size, 0) == before
    assert not _writable_by_qemu(tmp_path / "snap1.qcow2"), "the read lock must be back"
    guest.step()
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", guest.oracle, tmp_path)


def test_cancel_when_ready_keeps_the_chain(chain, tmp_path: Path) -> None:
    disk, guest = chain
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 10) is State.READY
    guest.step()
    job.cancel()
    assert job.state is State.CANCELLED
    with pytest.raises(ImageError):
        job.complete()
    guest.step()
    assert disk.read(disk.size, 0) == guest.oracle
    disk.close()
    top = tmp_path / "top.qcow2"
    assert len(qemu_img.info(top, backing_chain=True)) == 3
    for name in ("base.qcow2", "snap1.qcow2"):
        qemu_img.check_clean(tmp_path / name)
    assert_matches_oracle(top, guest.oracle, tmp_path)


def test_new_image_target_collapses_two_layers(chain, tmp_path: Path) -> None:
    disk, guest = chain
    new = tmp_path / "merged.qcow2"
    job = MirrorJob(disk, 2, new_path=str(new)).start()
    while job.state is State.COPYING:
        guest.step()
    assert sorted(job.complete()) == sorted(str(tmp_path / n) for n in
                                            ("top.qcow2", "snap1.qcow2"))
    guest.step()
    disk.close()
    info = qemu_img.info(new, backing_chain=True)
    assert [Path(i["filename"]).name for i in info] == ["merged.qcow2", "base.qcow2"]
    assert_matches_oracle(new, guest.oracle, tmp_path)


def test_cancelled_new_image_is_removed(chain, tmp_path: Path) -> None:
    disk, _ = chain
    new = tmp_path / "merged.qcow2"
    job = MirrorJob(disk, 1, new_path=str(new)).start()
    job.wait((State.READY,), 10)
    job.cancel()
    assert not new.exists()


def test_target_write_error_fails_the_job_not_the_guest(chain, tmp_path: Path) -> None:
    disk, guest = chain
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 10) is State.READY

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # the target's filesystem is full (a write to it alone, or mirrored)
    job._target.write = job._target.write_top = full
    for _ in range(1000):
        guest.step()
        if job.state is not State.READY:
            break
    assert job.state is State.FAILED and "No space left" in job.error
    assert disk.job is None
    for _ in range(10):
        guest.step()
    assert disk.read(disk.size, 0) == guest.oracle
    disk.close()
    for name in ("base.qcow2", "snap1.qcow2"):
        qemu_img.check_clean(tmp_path / name)
    assert_matches_oracle(tmp_path / "top.qcow2", guest.oracle, tmp_path)


def test_refusals(chain, tmp_path: Path) -> None:
    disk, _ = chain
    job = MirrorJob(disk, 1)
    with pytest.raises(ImageError):
        job.complete()                    # not ready
    job.start()
    with pytest.raises(ImageError):
        MirrorJob(disk, 1).start()        # one job per disk
    with pytest.raises(ImageError):
        snapshot(disk, str(tmp_path / "x.qcow2"))
    job.wait((State.READY,), 10)
    job.cancel()
    with pytest.raises(ImageError):
        MirrorJob(disk, 3)                # the base has nothing below to collapse into


def test_smaller_middle_layer_hides_target_data(tmp_path: Path, opened) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=8 * MiB)
    qemu_io.run(base, "write -P 0x21 0 8M")
    mid = tmp_path / "mid.qcow2"
    qemu_img.create(mid, size=4 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=8 * MiB, backing="mid.qcow2", backing_fmt="qcow2")
    oracle = bytearray(raw_view(top, tmp_path))
    assert oracle[6 * MiB] == 0
    disk = opened(top)
    job = MirrorJob(disk, 2).start()
    job.wait((State.READY,), 10)
    job.complete()
    assert disk.read(disk.size, 0) == oracle
    disk.close()
    assert_matches_oracle(base, oracle, tmp_path)


def test_concurrent_writer_thread(chain, tmp_path: Path) -> None:
    """Guest writes from another thread while the copy runs: ordering under the lock."""
    disk, guest = chain
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            guest.step()

    t = threading.Thread(target=run)
    t.start()
    try:
        job = MirrorJob(disk, 2, chunk=32 * 1024).start()
        assert job.wait((State.READY,), 30) is State.READY
    finally:
        stop.set()
        t.join(10)
    job.complete()
    assert disk.read(disk.size, 0) == guest.oracle
    disk.close()
    assert_matches_oracle(tmp_path / "base.qcow2", guest.oracle, tmp_path)


@pytest.mark.parametrize("cluster", [4096, 65536])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("last", ["written", "compressed"])
def test_a_target_from_before_the_disk_grew_grows_with_it(
        tmp_path: Path, opened, cluster: int, compat: str, last: str) -> None:
    """A layer made before a grow is shorter than the disk; consolidating into
    it grows it, and the part its own (longer) backing file would show through
    reads zeros, as the disk read it."""
    lowest = tmp_path / "lowest.qcow2"
    qemu_img.create(lowest, size=6 * MiB, options={"cluster_size": 65536})
    qemu_io.run(lowest, "write -P 0x31 0 6M")
    target = tmp_path / "target.qcow2"
    short = 2 * MiB + 1536
    qemu_img.create(target, size=short, options={"cluster_size": cluster, "compat": compat})
    qemu_io.run(target, f"write -P 0x32 {MiB} {MiB}",      # a compressed last cluster
                f"write {'-c ' if last == 'compressed' else ''}-P 0x36 {2 * MiB} 1536")
    qemu_img.run(["rebase", "-u", "-b", "lowest.qcow2", "-F", "qcow2", str(target)])
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=8 * MiB, backing="target.qcow2", backing_fmt="qcow2",
                    options={"compat": compat})
    qemu_io.run(top, "write -P 0x33 512k 64k", "write -P 0x34 5M 1M")
    oracle = bytearray(raw_view(top, tmp_path))
    assert oracle[3 * MiB] == 0 and oracle[5 * MiB] == 0x34
    disk = opened(top)
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 30) is State.READY
    disk.write(b"\x35" * 8192, 7 * MiB)                 # mirrored past the old end
    oracle[7 * MiB:7 * MiB + 8192] = b"\x35" * 8192
    job.complete()
    assert disk.read(disk.size, 0) == oracle
    disk.close()
    assert qemu_img.info(target)["virtual-size"] == 8 * MiB
    assert_matches_oracle(target, oracle, tmp_path)


def test_cancel_with_a_chunk_in_flight_leaks_nothing_in_the_target(
        tmp_path: Path, opened, monkeypatch) -> None:
    """The target (a backing image that stays in the chain) gets back the
    clusters placed for a chunk whose copy the cancel overtook."""
    import vdisk_block.mirrorcopy as mirrorcopy

    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=16 * MiB)
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io.run(top, "write -P 0x7c 0 8M")
    oracle = raw_view(top, tmp_path)
    disk = opened(top)
    moving, go = threading.Event(), threading.Event()
    transfer = mirrorcopy.transfer

    def held(c, zeros):
        moving.set()
        go.wait(10)
        return transfer(c, zeros)

    monkeypatch.setattr(mirrorcopy, "transfer", held)
    job = MirrorJob(disk, 1, chunk=4 * MiB).start()
    assert moving.wait(10)
    cancel = threading.Thread(target=job.cancel)
    cancel.start()
    time.sleep(0.2)                 # the cancel waits for the chunk's copy
    go.set()
    cancel.join(10)
    assert job.state is State.CANCELLED
    assert disk.read(disk.size, 0) == oracle
    disk.close()
    qemu_img.check_clean(base, allow_leaks=False)
    assert_matches_oracle(top, oracle, tmp_path)
