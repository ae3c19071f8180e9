"""The pivot of a mirror job: what the served disk reads and keeps across it.

Regression tests for three ways a pivot went wrong: a change of the map's
granularity the read path did not follow, a target that reused a host
cluster the served map still pointed at, and a drain that let requests run
in the middle of the switch (threads=parallel).
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from conftest import assert_matches_oracle, raw_view

from vdisk import qemu_img, qemu_io
from vdisk_block.chainops import snapshot
from vdisk_block.mirror import MirrorJob, State

KiB = 1 << 10
MiB = 1 << 20


def _pattern(size: int, seed: int) -> bytes:
    """Data where every 4 KiB block differs from every other (and compresses)."""
    rnd = random.Random(seed)
    out = bytearray()
    for block in range(size // (4 * KiB)):
        word = block.to_bytes(4, "big") + rnd.randbytes(4)
        out += word * (4 * KiB // len(word))
    return bytes(out)


def test_pivot_to_a_coarser_map_reads_every_block_where_it_is(tmp_path: Path, opened) -> None:
    """A 4 KiB-cluster top consolidated into a 64 KiB-cluster base: after the
    pivot the map's granularity is 64 KiB, and 4 KiB reads (the fast path)
    must index it with that granularity."""
    size = 4 * MiB
    raw = tmp_path / "base.raw"
    raw.write_bytes(_pattern(size, 1))
    base = tmp_path / "base.qcow2"
    qemu_img.run(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
                  str(raw), str(base)])
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=size, backing="base.qcow2", backing_fmt="qcow2",
                    options={"cluster_size": 4096})
    qemu_io.run(top, "write -P 0x5a 68k 4k", "write -P 0x5b 1M 12k")
    oracle = raw_view(top, tmp_path)
    disk = opened(top)
    assert disk.map.g == 4 * KiB
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 10) is State.READY
    job.complete()
    assert disk.map.g == 64 * KiB
    for off in range(0, size, 4 * KiB):
        assert disk.read(4 * KiB, off) == oracle[off:off + 4 * KiB], f"block at {off}"
    disk.close()
    assert_matches_oracle(base, oracle, tmp_path)


def test_into_a_compressed_target_keeps_what_the_served_map_reads(tmp_path: Path,
                                                                 opened) -> None:
    """Consolidating small clusters into a target of compressed 64 KiB clusters:
    copy-on-write in the target frees compressed clusters that the served map
    still reads until the pivot; they must not be reused meanwhile."""
    size = 8 * MiB
    raw = tmp_path / "base.raw"
    raw.write_bytes(_pattern(size // 2, 2) + bytes(size // 2))   # the second half unallocated
    base = tmp_path / "base.qcow2"
    qemu_img.run(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                  "cluster_size=65536", str(raw), str(base)])
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=size, backing="base.qcow2", backing_fmt="qcow2",
                    options={"cluster_size": 4096})
    # one 4 KiB block in every compressed 64 KiB cluster: the copy makes each a
    # COW in the target, which frees every compressed extent at the ready flush
    qemu_io.run(top, *(f"write -P 0x{(k % 200) + 1:x} {k * 64 + 8}k 4k"
                       for k in range(size // 2 // (64 * KiB))))
    oracle = bytearray(raw_view(top, tmp_path))
    disk = opened(top)
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 30) is State.READY
    rnd = random.Random(3)
    for _ in range(64):                   # mirrored writes allocate in the target
        off = rnd.randrange(size // 2 // (4 * KiB), size // (4 * KiB)) * 4 * KiB
        data = os.urandom(4 * KiB)
        disk.write(data, off)
        oracle[off:off + len(data)] = data
        disk.flush()
    assert disk.read(size, 0) == oracle, "the served view changed while ready"
    job.complete()
    assert disk.read(size, 0) == oracle
    disk.close()
    assert_matches_oracle(base, oracle, tmp_path)


class _GatedOs:
    """The os module as disk.py sees it, with a gate on preadv: a read of the
    gated thread stays in flight until the gate opens."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.in_flight = threading.Event()
        self.thread: threading.Thread | None = None

    def __getattr__(self, name: str):
        return getattr(os, name)

    def preadv(self, fd: int, buffers, offset: int) -> int:
        if threading.current_thread() is self.thread and not self.open.is_set():
            self.in_flight.set()
            assert self.open.wait(30)
        return os.preadv(fd, buffers, offset)


def test_pivot_waits_for_a_read_in_flight_without_letting_writes_in(
        tmp_path: Path, opened, monkeypatch) -> None:
    """threads=parallel: a read outside the disk lock is in flight when the
    pivot starts. The pivot waits for it holding the lock: a write and flush
    issued meanwhile run after the switch, on the new chain, and what they
    acknowledged is on disk without any later flush."""
    import vdisk_block.disk as disk_module

    size = 4 * MiB
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=size)
    qemu_io.run(base, "write -P 0x11 0 4M")
    disk = opened(base)
    disk.concurrent_reads = True
    snapshot(disk, str(tmp_path / "top.qcow2"))
    disk.write(b"\x22" * 4096, 0)
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 10) is State.READY

    gate = _GatedOs()
    monkeypatch.setattr(disk_module, "os", gate)
    order: list[str] = []
    reader = gate.thread = threading.Thread(target=disk.read, args=(4096, 8192))
    reader.start()
    assert gate.in_flight.wait(10)
    gate.in_flight.clear()

    def persist(_path: str) -> None:
        order.append("persist")

    pivot = threading.Thread(target=job.complete, args=(persist,))
    pivot.start()
    deadline = 100
    while job.state is not State.PIVOTING and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    assert job.state is State.PIVOTING

    def write_and_flush() -> None:
        disk.write(b"\x33" * 4096, 1 * MiB)
        disk.flush()
        order.append("flushed")

    writer = threading.Thread(target=write_and_flush)
    writer.start()
    writer.join(0.5)
    assert writer.is_alive(), "a write ran in the middle of the pivot"
    gate.open.set()
    for t in (reader, pivot, writer):
        t.join(30)
    assert order == ["persist", "flushed"]
    assert job.state is State.DONE and disk.path == str(base)
    out = tmp_path / "view.raw"
    qemu_img.run(["convert", "-q", "-U", "-O", "raw", str(base), str(out)])
    view = out.read_bytes()
    assert view[1 * MiB:1 * MiB + 4096] == b"\x33" * 4096, "a flushed write is not on disk"
    assert view[:4096] == b"\x22" * 4096


def test_parallel_pivots_under_steady_reads_keep_every_flushed_write(tmp_path: Path,
                                                                   opened) -> None:
    """threads=parallel under load: readers keep reads in flight outside the
    disk lock while a writer writes and flushes and the disk pivots four
    times. No pivot is starved, and every write acknowledged before a
    completed flush is on the final target as QEMU reads the files, without
    any later flush."""
    size = 8 * MiB
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=size)
    qemu_io.run(base, "write -P 0x11 0 8M")
    disk = opened(base)
    disk.concurrent_reads = True
    stop = threading.Event()
    errors: list[BaseException] = []
    durable: dict[int, int] = {}          # block -> pattern byte, acknowledged then flushed
    blocks = iter(range(size // (4 * KiB)))

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                disk.read(4 * KiB, rnd.randrange(0, size // (4 * KiB)) * 4 * KiB)
        except BaseException as e:        # noqa: BLE001 - reported below
            errors.append(e)

    def writer() -> None:
        try:
            pending: dict[int, int] = {}
            while not stop.is_set():
                block = next(blocks, None)
                if block is None:
                    return
                value = block % 250 + 1
                disk.write(bytes([value]) * (4 * KiB), block * 4 * KiB)
                pending[block] = value
                disk.flush()
                durable.update(pending)
                pending.clear()
        except BaseException as e:        # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    try:
        for i in range(4):
            snapshot(disk, str(tmp_path / f"snap{i}.qcow2"))
            job = MirrorJob(disk, 1).start()
            assert job.wait((State.READY,), 30) is State.READY
            job.complete()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    # what QEMU reads from the files now: no flush after the writer stopped
    out = tmp_path / "view.raw"
    qemu_img.run(["convert", "-q", "-U", "-O", "raw", disk.path, str(out)])
    view = out.read_bytes()
    lost = [b for b, v in durable.items() if view[b * 4 * KiB] != v]
    assert not lost, f"{len(lost)} flushed writes missing, first at block {lost[0]}"


def test_cancelled_into_job_leaves_no_leak_and_a_second_job_reads_right(tmp_path: Path,
                                                                       opened) -> None:
    """Cancelling at ready after the target moved compressed clusters: the
    served map reads the moved ones, so the old places are freed (no leak),
    and a second job into the same target cannot reuse a place still read."""
    size = 4 * MiB
    raw = tmp_path / "base.raw"
    raw.write_bytes(_pattern(size // 2, 4) + bytes(size // 2))
    base = tmp_path / "base.qcow2"
    qemu_img.run(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                  "cluster_size=65536", str(raw), str(base)])
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=size, backing="base.qcow2", backing_fmt="qcow2",
                    options={"cluster_size": 4096})
    qemu_io.run(top, *(f"write -P 0x{k + 1:x} {k * 64 + 4}k 4k"
                       for k in range(size // 2 // (64 * KiB))))
    oracle = bytearray(raw_view(top, tmp_path))
    disk = opened(top)
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 30) is State.READY
    job.cancel()
    for k in range(16):                   # the top allocates; nothing moves in the base
        data = bytes([k + 7]) * 4096
        disk.write(data, size // 2 + k * 8192)
        oracle[size // 2 + k * 8192:size // 2 + k * 8192 + 4096] = data
    assert disk.read(size, 0) == oracle
    job = MirrorJob(disk, 1).start()
    assert job.wait((State.READY,), 30) is State.READY
    for k in range(16):                   # mirrored writes allocate in the target
        data = bytes([k + 100]) * 4096
        disk.write(data, size // 2 + k * 8192 + 4096)
        oracle[size // 2 + k * 8192 + 4096:size // 2 + k * 8192 + 8192] = data
    assert disk.read(size, 0) == oracle
    job.complete()
    disk.close()
    assert_matches_oracle(base, oracle, tmp_path)
    assert qemu_img.check(base)["leaks"] == 0


def test_a_flush_frees_no_cluster_a_read_outside_the_lock_still_reads(tmp_path: Path, opened,
                                                                      monkeypatch) -> None:
    """threads=parallel: a read is in flight on a cluster when a trim drops it
    and a flush frees it; a write elsewhere must not reuse it under the read."""
    import vdisk_block.disk as disk_module

    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=4 * MiB)
    qemu_io.run(top, "write -P 0xaa 0 64k")
    disk = opened(top)
    disk.concurrent_reads = True
    gate = _GatedOs()
    monkeypatch.setattr(disk_module, "os", gate)
    got: list[bytes] = []
    reader = gate.thread = threading.Thread(target=lambda: got.append(disk.read(4096, 0)))
    reader.start()
    assert gate.in_flight.wait(10)
    disk.trim(65536, 0)                     # the cluster the read is on: freed at flush
    flusher = threading.Thread(target=disk.flush)
    flusher.start()
    flusher.join(0.5)
    if not flusher.is_alive():              # (the bug: freed under the read) ...
        disk.write(b"\xbb" * 65536, 2 * MiB)    # ... and reused by this allocation
    gate.open.set()
    for t in (reader, flusher):
        t.join(30)
    assert got == [b"\xaa" * 4096], "a read returned data of a cluster freed under it"
