"""Where a guest change goes while a job runs (mirrorroute.py), QEMU as the oracle.

Into the image below the top (collapse 1), the copy hands down what it copied
and the guest's writes where the top holds nothing go to the target alone;
ahead of the copy, the top alone takes them. Each test checks what lands
where, and that the chain reads the same whatever happens to the job.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest
from conftest import assert_matches_oracle, raw_view

from vdisk import qemu_img, qemu_io
from vdisk_block import Disk
from vdisk_block.chainops import snapshot
from vdisk_block.errors import RequestError
from vdisk_block.image import COPIED
from vdisk_block.mirror import MirrorJob, State
from vdisk_block.resize import resize

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB


def _held(disk: Disk) -> list[int]:
    """The top's clusters that hold something (data, zeros, compressed)."""
    top = disk.top
    assert top is not None
    return [i * top.span + k for i, l2 in top.l2.items() for k, e in enumerate(l2)
            if e & ~COPIED]


@pytest.fixture
def chain(tmp_path: Path, opened) -> tuple[Disk, bytearray]:
    """base (0x11 in the first 4 MiB) <- top (random writes over the disk)."""
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=SIZE)
    qemu_io.run(base, "write -P 0x11 0 4M")
    disk = opened(base)
    snapshot(disk, str(tmp_path / "top.qcow2"))
    oracle = bytearray(raw_view(base, tmp_path))
    rnd = random.Random(7)
    for _ in range(40):
        off = rnd.randrange(SIZE - 200 * KiB)
        data = rnd.randbytes(rnd.randrange(1, 200 * KiB))
        disk.write(data, off)
        oracle[off:off + len(data)] = data
    disk.flush()
    return disk, oracle


def _ready(disk: Disk, **kw) -> MirrorJob:
    job = MirrorJob(disk, 1, chunk=256 * KiB, **kw).start()
    assert job.wait((State.READY,), 20) is State.READY, job.error
    return job


def _random_changes(disk: Disk, oracle: bytearray, seed: int, n: int = 60) -> None:
    rnd = random.Random(seed)
    cs = disk.cluster_size
    for _ in range(n):
        off = rnd.randrange(SIZE)
        k = rnd.randrange(1, min(300 * KiB, SIZE - off) + 1)
        kind = rnd.random()
        if kind < 0.7:
            data = rnd.randbytes(k)
            disk.write(data, off)
            oracle[off:off + k] = data
        elif kind < 0.85:
            disk.zero(k, off, may_trim=rnd.random() < 0.5)
            oracle[off:off + k] = bytes(k)
        else:
            disk.trim(k, off)
            first, end = -(-off // cs), (off + k) // cs
            oracle[first * cs:end * cs] = bytes(max(0, end - first) * cs)


@pytest.mark.parametrize("end", ["pivot", "cancel"])
def test_once_ready_the_top_holds_nothing_and_takes_nothing(chain, tmp_path: Path,
                                                            end: str) -> None:
    disk, oracle = chain
    assert _held(disk)
    job = _ready(disk)
    assert _held(disk) == [], "the copy hands down every cluster it copied"
    assert job.stats.bytes_handed_down == job.stats.copy_set_bytes
    _random_changes(disk, oracle, seed=1)
    assert _held(disk) == [], "writes where the top holds nothing go to the target alone"
    assert job.stats.bytes_direct > 0 and job.stats.bytes_direct == job.stats.bytes_mirrored
    assert disk.read(SIZE, 0) == oracle
    disk.flush()
    if end == "pivot":
        job.complete()
        assert disk.path == str(tmp_path / "base.qcow2")
    else:
        job.cancel()
        assert disk.path == str(tmp_path / "top.qcow2")
    assert disk.read(SIZE, 0) == oracle
    _random_changes(disk, oracle, seed=2, n=20)
    assert disk.read(SIZE, 0) == oracle
    top = Path(disk.path)
    disk.close()
    assert_matches_oracle(top, oracle, tmp_path)
    qemu_img.check_clean(tmp_path / "base.qcow2")


def test_ahead_of_the_copy_the_top_alone_takes_a_write(chain, monkeypatch) -> None:
    """The copy stopped before its first chunk: a write into the copy set
    lands in the top alone (the copy reads it later), once."""
    import vdisk_block.mirrorcopy as mirrorcopy

    disk, oracle = chain
    go, waiting = threading.Event(), threading.Event()
    claim = mirrorcopy.CopyPass._claim

    def held_claim(self, target, a, b):
        waiting.set()
        disk.lock.release()             # (held by the pass around the claim)
        try:
            assert go.wait(20)
        finally:
            disk.lock.acquire()
        return claim(self, target, a, b)

    monkeypatch.setattr(mirrorcopy.CopyPass, "_claim", held_claim)
    job = MirrorJob(disk, 1, chunk=256 * KiB).start()
    try:
        assert waiting.wait(10)
        held = _held(disk)
        c = held[-1]
        data = os.urandom(disk.cluster_size)
        disk.write(data, c * disk.cluster_size)
        oracle[c * disk.cluster_size:(c + 1) * disk.cluster_size] = data
        assert job.stats.bytes_mirrored == 0, "ahead of the copy: the top alone"
    finally:
        go.set()
    assert job.wait((State.READY,), 20) is State.READY, job.error
    assert job.stats.bytes_copied <= job.stats.copy_set_bytes and job.stats.passes == 1
    job.complete()
    assert disk.read(SIZE, 0) == oracle


def test_the_top_lets_go_only_of_clusters_synced_in_the_target(chain, monkeypatch) -> None:
    """Every cluster the top lets go of was synced in the target after the
    copy wrote it there: no power loss can leave the top without a cluster
    that the target does not hold either."""
    import vdisk_block.chunkcopy as chunkcopy
    import vdisk_block.disk as disk_module
    import vdisk_block.mirrorcopy as mirrorcopy
    import vdisk_block.top as top_module

    disk, _oracle = chain
    events: list[tuple[str, int]] = []
    real = os

    class Os:
        def __getattr__(self, name: str):
            f = getattr(real, name)
            if name == "fdatasync":
                return lambda fd: (events.append(("sync", fd)), f(fd))[1]
            if name in ("copy_file_range", "pwrite"):
                def call(*args):
                    if threading.current_thread().name == "vdisk-mirror":
                        events.append(("copy", args[1] if name == "copy_file_range" else args[0]))
                    return f(*args)
                return call
            return f

    monkeypatch.setattr(chunkcopy, "os", Os())
    monkeypatch.setattr(mirrorcopy, "os", Os())
    monkeypatch.setattr(top_module, "os", Os())
    monkeypatch.setattr(disk_module, "os", Os())
    top = disk.top
    assert top is not None
    set_entry = top.set_entry

    def watched(c: int, value: int) -> None:
        if not value:
            events.append(("let go", c))
        set_entry(c, value)

    monkeypatch.setattr(top, "set_entry", watched)
    job = MirrorJob(disk, 1, chunk=64 * KiB).start()
    assert job.wait((State.READY,), 20) is State.READY, job.error
    target_fd = job._target.top.fd
    unsynced = False
    let_go = 0
    for what, x in events:
        if what == "copy" and x == target_fd:
            unsynced = True
        elif what == "sync" and x == target_fd:
            unsynced = False
        elif what == "let go":
            let_go += 1
            assert not unsynced, f"cluster {x} let go of before the target's sync"
    assert let_go == len({x for what, x in events if what == "let go"}), "each once"
    assert let_go > 1 and sum(e[0] == "sync" and e[1] == target_fd for e in events) > 1
    job.cancel()


def test_a_write_the_target_refuses_goes_to_the_top(chain, tmp_path: Path,
                                                    monkeypatch) -> None:
    disk, oracle = chain
    job = _ready(disk)
    target = job._target

    def full(data, offset) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, "write_top", full)
    data = os.urandom(100 * KiB)
    disk.write(data, 5 * MiB + 123)
    oracle[5 * MiB + 123:5 * MiB + 123 + len(data)] = data
    assert job.state is State.FAILED and "No space" in (job.error or "")
    assert disk.job is None
    assert disk.read(SIZE, 0) == oracle
    _random_changes(disk, oracle, seed=3, n=20)
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", oracle, tmp_path)


def test_a_guest_flush_syncs_the_target_first(chain, monkeypatch) -> None:
    import vdisk_block.refcounts as refcounts
    import vdisk_block.top as top_module

    disk, oracle = chain
    job = _ready(disk)
    disk.write(b"\x5a" * MiB, 6 * MiB)
    synced: list[int] = []
    real = os

    class Os:
        def __getattr__(self, name: str):
            f = getattr(real, name)
            if name == "fdatasync":
                return lambda fd: (synced.append(fd), f(fd))[1]
            return f

    monkeypatch.setattr(top_module, "os", Os())
    monkeypatch.setattr(refcounts, "os", Os())
    disk.flush()
    assert job._target is not None and disk.top is not None
    assert synced and synced[0] == job._target.top.fd, synced
    job.cancel()


def _write_alone_then_cancel(disk: Disk, oracle: bytearray, writes: list[tuple[int, int]],
                             tmp_path: Path) -> None:
    """Once the job is ready, the writes go to the target alone; the chain
    reads them before and after a cancel, as QEMU does."""
    job = _ready(disk)
    for off, n in writes:
        disk.write(b"\x44" * n, off)
        oracle[off:off + n] = b"\x44" * n
    assert job.stats.bytes_direct == sum(n for _off, n in writes)
    assert disk.read(SIZE, 0) == oracle
    job.cancel()
    assert disk.read(SIZE, 0) == oracle
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", oracle, tmp_path)


def test_writes_past_a_shorter_target_s_old_end(tmp_path: Path, opened) -> None:
    """The target grew to the disk's size as the job started: the served
    chain reads what the target alone took past its old end."""
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=4 * MiB)
    qemu_io.run(base, "write -P 0x22 0 4M")
    disk = opened(base)
    snapshot(disk, str(tmp_path / "top.qcow2"))
    resize(disk, SIZE)
    disk.write(b"\x33" * MiB, 0)
    oracle = bytearray(b"\x33" * MiB + b"\x22" * (3 * MiB) + bytes(4 * MiB))
    _write_alone_then_cancel(disk, oracle, [(6 * MiB, MiB)], tmp_path)


def test_in_place_writes_where_the_target_grew_over_a_longer_layer(tmp_path: Path,
                                                                  opened) -> None:
    """The target grows as the job starts and zeroes what the longer layer
    below would show, its last cluster as data (zeros written in it): the
    served map must read that cluster from the target, which takes the
    guest's writes there in place."""
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=SIZE)
    qemu_io.run(base, "write -P 0x11 0 8M")
    mid = tmp_path / "mid.qcow2"
    old_end = 4 * MiB + 2560
    qemu_img.create(mid, size=old_end, backing="base.qcow2", backing_fmt="qcow2",
                    options={"cluster_size": 4096})
    qemu_img.create(tmp_path / "top.qcow2", size=SIZE, backing="mid.qcow2",
                    backing_fmt="qcow2")
    disk = opened(tmp_path / "top.qcow2")
    disk.write(b"\x33" * MiB, 0)
    oracle = bytearray(b"\x33" * MiB + b"\x11" * (old_end - MiB) + bytes(SIZE - old_end))
    assert disk.read(SIZE, 0) == oracle
    writes = [(old_end + 100, 300), (old_end - 2000, 300), (6 * MiB, 300)]
    _write_alone_then_cancel(disk, oracle, writes, tmp_path)


def test_a_cancelled_job_s_target_maps_again_when_the_disk_grows(tmp_path: Path,
                                                                  opened) -> None:
    """The target took a write alone where it had no L2 table; after a cancel
    the served chain's handle of that image reads its tables again, so a
    resize that maps the chain again (the base is longer than the disk)
    still finds that write."""
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=2 * SIZE, options={"cluster_size": 4096})  # L2: 2 MiB
    qemu_io.run(base, "write -P 0x11 0 1M")
    disk = opened(base)
    snapshot(disk, str(tmp_path / "top.qcow2"))
    resize(disk, SIZE)
    disk.write(b"\x22" * MiB, 512 * KiB)
    oracle = bytearray(b"\x11" * (512 * KiB) + b"\x22" * MiB + bytes(SIZE - 1536 * KiB))
    job = _ready(disk)
    data = os.urandom(MiB)
    disk.write(data, 6 * MiB)
    oracle[6 * MiB:7 * MiB] = data
    assert job.stats.bytes_direct == MiB
    job.cancel()
    resize(disk, SIZE + SIZE // 2)
    oracle += bytes(SIZE // 2)
    assert disk.read(len(oracle), 0) == oracle
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", oracle, tmp_path)


def test_a_second_job_after_a_cancel_and_a_zero_in_the_top(tmp_path: Path, opened) -> None:
    """Job 1 writes to the target alone (it allocates its whole 64 KiB
    cluster); after a cancel the top takes a write next to it and lets go of
    it again (zero, may trim): the served map reads zeros there through no
    entry. Job 2's write to the target alone lands in place in that cluster,
    and must be read from it."""
    qemu_img.create(tmp_path / "base.qcow2", size=4 * MiB, options={"cluster_size": 65536})
    qemu_img.create(tmp_path / "top.qcow2", size=4 * MiB, backing="base.qcow2",
                    backing_fmt="qcow2", options={"cluster_size": 4096})
    disk = opened(tmp_path / "top.qcow2")
    oracle = bytearray(4 * MiB)
    x = MiB
    job = _ready(disk)
    disk.write(b"\x11" * 4096, x)
    oracle[x:x + 4096] = b"\x11" * 4096
    job.cancel()
    disk.write(b"\x22" * 4096, x + 4096)
    disk.zero(4096, x + 4096, may_trim=True)
    job = _ready(disk)
    disk.write(b"\x33" * 4096, x + 4096)
    oracle[x + 4096:x + 8192] = b"\x33" * 4096
    assert job.stats.bytes_direct == 4096
    assert disk.read(4 * MiB, 0) == oracle
    job.cancel()
    assert disk.read(4 * MiB, 0) == oracle
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", oracle, tmp_path)


def test_a_target_whose_old_end_is_inside_its_cluster(tmp_path: Path, opened) -> None:
    """low (512-byte clusters, all 0x33) <- base (4 KiB clusters, shorter,
    its end inside a cluster) <- top: the target grows as the job starts; a
    write to it alone in the cluster that held its old end reads back."""
    size, old_end = 2 * MiB, 698880
    qemu_img.create(tmp_path / "low.qcow2", size=size, options={"cluster_size": 512})
    qemu_io.run(tmp_path / "low.qcow2", f"write -P 0x33 0 {size}")
    qemu_img.create(tmp_path / "base.qcow2", size=old_end, backing="low.qcow2",
                    backing_fmt="qcow2", options={"cluster_size": 4096})
    qemu_img.create(tmp_path / "top.qcow2", size=size, backing="base.qcow2",
                    backing_fmt="qcow2")
    disk = opened(tmp_path / "top.qcow2")
    oracle = bytearray(b"\x33" * old_end + bytes(size - old_end))
    assert disk.read(size, 0) == oracle
    job = MirrorJob(disk, 1, chunk=65536).start()
    assert job.wait((State.READY,), 20) is State.READY, job.error
    off = old_end // 4096 * 4096
    disk.write(b"\xaa" * 4096, off)
    oracle[off:off + 4096] = b"\xaa" * 4096
    assert disk.read(size, 0) == oracle
    job.cancel()
    assert disk.read(size, 0) == oracle
    disk.close()
    assert_matches_oracle(tmp_path / "top.qcow2", oracle, tmp_path)


class _Errseq:
    """os.fdatasync with one writeback error of a file, as Linux reports
    it: once to each descriptor of the file open before it, then never."""

    def __init__(self, path: Path) -> None:
        self.path = os.path.realpath(path)
        self.failed = False
        self.seen: set[int] = set()
        self.armed = False

    def __call__(self, fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}") == self.path:
            if self.armed and not self.failed:
                self.failed = True
                self.seen.add(fd)
                raise OSError(errno.EIO, "Input/output error")
            if self.failed and fd not in self.seen:
                self.seen.add(fd)
                raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)


@pytest.mark.parametrize("where", ["pivot", "allocation"])
def test_a_lost_sync_of_the_target_fails_the_guest_s_next_flush(chain, monkeypatch,
                                                                where: str) -> None:
    """The target's writeback fails once it holds guest writes the top does
    not: in the sync before the pivot, or in a sync the target's cluster
    allocation makes (then whoever sees it next is the served chain's own
    descriptor of the file). The job fails, and the guest's next flush says
    so (a later sync of the file would succeed without the data)."""
    import vdisk_block.mirror as mirror_module
    import vdisk_block.mirrorcopy as mirrorcopy
    import vdisk_block.refcounts as refcounts
    import vdisk_block.top as top_module

    disk, _oracle = chain
    errseq = _Errseq(Path(disk.layers[1].path))
    real = os

    class Os:
        def __getattr__(self, name: str):
            return errseq if name == "fdatasync" else getattr(real, name)

    for module in (mirror_module, mirrorcopy, refcounts, top_module):
        monkeypatch.setattr(module, "os", Os())
    job = _ready(disk)
    disk.write(os.urandom(MiB), 7 * MiB)            # to the target alone
    errseq.armed = True
    if where == "pivot":
        with pytest.raises(RequestError, match="syncing the target failed"):
            job.complete()
    else:
        data = os.urandom(3 * MiB)          # new clusters: the target's reserve grows
        disk.write(data, 4 * MiB)
        assert disk.read(len(data), 4 * MiB) == data    # (the top took it)
    assert job.state is State.FAILED and disk.job is None
    with pytest.raises(RequestError, match="may be lost") as e:
        disk.flush()
    assert e.value.errno == errno.EIO
    disk.flush()                                    # (reported once, as the kernel does)


def _short_target_chain(tmp_path: Path, cs_base: int, cs_target: int, cs_top: int,
                        mid: bool = False) -> Path:
    """base (1 MiB of 0xbb) <- target (100 KiB: its end inside a cluster)
    [<- mid (0x11 at 512 KiB)] <- top (1 MiB, 0x22 at 768 KiB)."""
    k = 1024
    qemu_img.create(tmp_path / "base.qcow2", size=MiB, options={"cluster_size": cs_base})
    qemu_io.run(tmp_path / "base.qcow2", "write -P 0xbb 0 1M")
    qemu_img.create(tmp_path / "target.qcow2", size=100 * k, backing="base.qcow2",
                    backing_fmt="qcow2", options={"cluster_size": cs_target})
    below = "target.qcow2"
    if mid:
        qemu_img.create(tmp_path / "mid.qcow2", size=MiB, backing=below, backing_fmt="qcow2",
                        options={"cluster_size": cs_top})
        qemu_io.run(tmp_path / "mid.qcow2", "write -P 0x11 512K 64K")
        below = "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=MiB, backing=below, backing_fmt="qcow2",
                    options={"cluster_size": cs_top})
    qemu_io.run(top, "write -P 0x22 768K 64K")
    return top


@pytest.mark.parametrize("sizes", [(65536, 65536, 4096), (4096, 65536, 65536)],
                         ids=["small top clusters", "small base clusters"])
def test_a_target_grown_over_a_longer_layer_with_other_cluster_sizes(
        tmp_path: Path, opened, sizes: tuple[int, int, int]) -> None:
    """The target grows as the job starts (its last cluster copied on write
    to zero its tail); the served chain reads it as a reopen would, and a
    write to the target alone there reads back, before and after a cancel
    and a later small write in the same cluster of the top."""
    top = _short_target_chain(tmp_path, *sizes)
    oracle = bytearray(raw_view(top, tmp_path))
    disk = opened(top)
    assert disk.read(MiB, 0) == oracle
    job = _ready(disk)
    assert disk.read(MiB, 0) == oracle
    disk.write(b"\x77" * 4096, 80 * KiB)
    oracle[80 * KiB:84 * KiB] = b"\x77" * 4096
    assert disk.read(MiB, 0) == oracle
    job.cancel()
    disk.write(b"\x55" * 512, 82 * KiB)
    oracle[82 * KiB:82 * KiB + 512] = b"\x55" * 512
    assert disk.read(MiB, 0) == oracle
    disk.close()
    assert_matches_oracle(top, oracle, tmp_path)


def test_collapsing_two_layers_onto_a_shorter_target(tmp_path: Path, opened) -> None:
    """Collapse 2 into a target shorter than the disk over a longer base: the
    base's data past the target's old end never shows, during the job, after
    a cancel, or after a small write next to it."""
    top = _short_target_chain(tmp_path, 65536, 65536, 65536, mid=True)
    oracle = bytearray(raw_view(top, tmp_path))
    disk = opened(top)
    job = MirrorJob(disk, 2, chunk=65536).start()
    assert job.wait((State.READY,), 20) is State.READY, job.error
    assert disk.read(MiB, 0) == oracle
    job.cancel()
    assert disk.read(MiB, 0) == oracle
    disk.write(b"\x55" * 512, 96 * KiB)
    oracle[96 * KiB:96 * KiB + 512] = b"\x55" * 512
    disk.close()
    assert_matches_oracle(top, oracle, tmp_path)
