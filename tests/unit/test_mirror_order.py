"""The order of guest changes and the copy of a mirror job, made deterministic.

The copy thread is stopped at its first data transfer (a gate on the system
calls that move data, seen from that thread), with one chunk in flight:
[0, 1 MiB), the whole copy set. Meanwhile:

    guest change of [256 KiB, 320 KiB)   overlaps the chunk: waits for it, then
                                         lands after it (write, zero or trim)
    guest write of [4 MiB, 4 MiB + 64 KiB) does not overlap: done at once

and a cancel or a failure waits for the data in flight before it lets the
target go.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_matches_oracle

from vdisk import qemu_img, qemu_io
from vdisk_block import Disk
from vdisk_block.chainops import snapshot
from vdisk_block.mirror import JOB_SWITCH_INTERVAL_S, MirrorJob, State

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB
OVERLAP = (256 * KiB, 64 * KiB)
ELSEWHERE = (4 * MiB, 64 * KiB)
COPY_THREAD = "vdisk-mirror"


class _GatedOs:
    """The os module as the engine sees it, with a gate on the calls that move
    data: the copy thread's first one waits until the gate opens. Every data
    call that returns is logged with its thread's name, in order."""

    GATED = ("preadv", "pwrite", "copy_file_range")

    def __init__(self) -> None:
        self.open = threading.Event()
        self.in_flight = threading.Event()
        self.log: list[str] = []

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name not in self.GATED:
            return real

        def call(*args):
            me = threading.current_thread().name
            if me == COPY_THREAD and not self.open.is_set():
                self.in_flight.set()
                assert self.open.wait(30), "the gate was never opened"
            out = real(*args)
            self.log.append(me)
            return out
        return call


class _OsWith:
    """The os module with some functions replaced (for one module's eyes)."""

    def __init__(self, **replaced: Callable[..., int]) -> None:
        self.replaced = replaced

    def __getattr__(self, name: str):
        return self.replaced.get(name) or getattr(os, name)


@pytest.fixture
def gated(monkeypatch) -> _GatedOs:
    import vdisk_block.chunkcopy as chunkcopy
    import vdisk_block.disk as disk_module

    gate = _GatedOs()
    monkeypatch.setattr(disk_module, "os", gate)
    monkeypatch.setattr(chunkcopy, "os", gate)
    yield gate
    gate.open.set()


@pytest.fixture
def one_chunk(tmp_path: Path, opened) -> tuple[Disk, bytearray]:
    """base (8 MiB of 0x11, every cluster allocated: the copy writes in place)
    <- top with 0xaa in [0, 1 MiB): a copy set of one 1 MiB chunk."""
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=SIZE)
    qemu_io.run(base, "write -P 0x11 0 8M")
    disk = opened(base)
    snapshot(disk, str(tmp_path / "top.qcow2"))
    disk.write(b"\xaa" * MiB, 0)
    disk.flush()
    return disk, bytearray(b"\xaa" * MiB + b"\x11" * (SIZE - MiB))


def _started(disk: Disk, gate: _GatedOs) -> MirrorJob:
    job = MirrorJob(disk, 1, chunk=MiB).start()
    assert gate.in_flight.wait(10), "the copy never reached its first transfer"
    return job


def _in_thread(fn: Callable[[], None], name: str) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:      # noqa: BLE001 - reported by the caller
            errors.append(e)

    t = threading.Thread(target=run, name=name)
    t.errors = errors                   # type: ignore[attr-defined]
    t.start()
    return t


def _change(disk: Disk, oracle: bytearray, kind: str) -> Callable[[], None]:
    """The guest change of OVERLAP, applied to the oracle as it will read."""
    off, n = OVERLAP
    if kind == "write":
        oracle[off:off + n] = b"\xcc" * n
        return lambda: disk.write(b"\xcc" * n, off)
    oracle[off:off + n] = bytes(n)
    if kind == "zero":
        return lambda: disk.zero(n, off)
    return lambda: disk.trim(n, off)


@pytest.mark.parametrize("kind", ["write", "zero", "trim"])
def test_a_change_of_a_range_in_flight_waits_and_lands_after_the_copy(
        one_chunk, gated: _GatedOs, tmp_path: Path, kind: str) -> None:
    disk, oracle = one_chunk
    job = _started(disk, gated)
    # a write elsewhere is done while the copy is still stopped
    elsewhere = _in_thread(lambda: disk.write(b"\xbb" * ELSEWHERE[1], ELSEWHERE[0]), "other")
    elsewhere.join(10)
    assert not elsewhere.is_alive(), "a write that overlaps no copy waited for one"
    assert not elsewhere.errors                             # type: ignore[attr-defined]
    oracle[ELSEWHERE[0]:sum(ELSEWHERE)] = b"\xbb" * ELSEWHERE[1]
    # a change of the chunk in flight waits, without holding the disk lock
    overlap = _in_thread(_change(disk, oracle, kind), "overlap")
    overlap.join(0.5)
    assert overlap.is_alive(), f"a {kind} of a range being copied did not wait for the copy"
    assert disk.read(OVERLAP[1], OVERLAP[0]) == b"\xaa" * OVERLAP[1]
    gated.open.set()
    overlap.join(10)
    assert not overlap.is_alive() and not overlap.errors     # type: ignore[attr-defined]
    # the copy's data landed first, then the change (and its mirror)
    first_change = gated.log.index("overlap") if "overlap" in gated.log else len(gated.log)
    assert COPY_THREAD in gated.log[:first_change]
    assert job.wait((State.READY,), 10) is State.READY
    assert job.stats.bytes_copied == MiB
    job.complete()
    assert disk.read(SIZE, 0) == oracle
    disk.close()
    assert_matches_oracle(tmp_path / "base.qcow2", oracle, tmp_path)


def test_cancel_waits_for_the_data_in_flight(one_chunk, gated: _GatedOs,
                                             tmp_path: Path) -> None:
    """The target's descriptor is closed only once no copy uses it."""
    disk, oracle = one_chunk
    job = _started(disk, gated)
    cancel = _in_thread(job.cancel, "cancel")
    cancel.join(0.5)
    assert cancel.is_alive(), "cancel let the target go while a copy was writing to it"
    gated.open.set()
    cancel.join(10)
    assert not cancel.is_alive() and not cancel.errors       # type: ignore[attr-defined]
    assert job.state is State.CANCELLED and disk.job is None
    disk.write(b"\xcc" * OVERLAP[1], OVERLAP[0])
    oracle[OVERLAP[0]:sum(OVERLAP)] = b"\xcc" * OVERLAP[1]
    assert disk.read(SIZE, 0) == oracle
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", oracle, tmp_path)
    qemu_img.check_clean(tmp_path / "base.qcow2")


def test_a_failed_transfer_fails_the_job_not_the_guest(one_chunk, monkeypatch,
                                                       tmp_path: Path) -> None:
    import vdisk_block.chunkcopy as chunkcopy

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chunkcopy, "os", _OsWith(copy_file_range=no_space, pwrite=no_space))
    disk, oracle = one_chunk
    job = MirrorJob(disk, 1, chunk=MiB).start()
    assert job.wait((State.READY,), 10) is State.FAILED and "No space" in (job.error or "")
    assert disk.job is None
    disk.write(b"\xcc" * OVERLAP[1], OVERLAP[0])
    oracle[OVERLAP[0]:sum(OVERLAP)] = b"\xcc" * OVERLAP[1]
    assert disk.read(SIZE, 0) == oracle
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", oracle, tmp_path)


def test_copy_through_a_buffer_where_copy_file_range_is_refused(
        one_chunk, monkeypatch, tmp_path: Path) -> None:
    import vdisk_block.chunkcopy as chunkcopy

    def cross_device(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(chunkcopy, "os", _OsWith(copy_file_range=cross_device))
    disk, oracle = one_chunk
    job = MirrorJob(disk, 1, chunk=256 * KiB).start()
    assert job.wait((State.READY,), 10) is State.READY
    job.complete()
    disk.close()
    assert_matches_oracle(tmp_path / "base.qcow2", oracle, tmp_path)


def test_the_switch_interval_is_short_while_a_job_runs(one_chunk) -> None:
    disk, _ = one_chunk
    before = sys.getswitchinterval()
    job = MirrorJob(disk, 1).start()
    assert sys.getswitchinterval() == pytest.approx(min(before, JOB_SWITCH_INTERVAL_S), abs=1e-7)
    assert job.wait((State.READY,), 10) is State.READY
    job.complete()
    assert sys.getswitchinterval() == before
