"""Copying one qcow2 layer to a compact file, checked against QEMU.

Each layer of a chain QEMU wrote is copied with its backing set to the
original parent; the chain through the copy must read as the chain through
the original (``qemu-img compare``), check clean, and map the same clusters
as data or zero. Identity and refusal cases use the driver directly.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from qchain import Chain, KiB, Layer, MiB, build_chain, vdisk_write

from vdisk import qemu_img, qemu_io
from vdisk_block import identity, open_disk
from vdisk_block.create import create_qcow2
from vdisk_block.errors import MalformedImage
from vdisk_block.layercopy import copy_layer, plan_bytes

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63


def chain_io(cs: int, size: int) -> list[tuple[str, ...]]:
    """qemu-io commands for base, middle and top, in units of the cluster size."""
    near_end = (size // cs - 2) * cs
    return [
        (f"write -P 0x11 0 {size // 2}",
         f"write -P 0x12 {size - 4 * KiB} 4k"),             # the partial last cluster
        (f"write -P 0x21 {3 * cs} {5 * cs + 1024}",
         f"write -z {cs} {2 * cs}",                         # zero flags over base data
         f"write -P 0x22 {near_end + 100} 300"),
        (f"write -P 0x31 {4 * cs} {3 * cs}",
         f"write -z {5 * cs} {cs}",                         # zero over its own allocation
         f"write -z {near_end} {cs}",
         f"write -P 0x32 {size - 3 * cs} 512"),
    ]


CHAINS = {
    # 512-byte clusters: an L2 table spans 32 KiB, so dozens of L1 entries are used
    "512": (512, 2 * MiB),
    "64k": (64 * KiB, 3 * MiB + 3584),
    "2m": (2 * MiB, 21 * MiB + 512),
}


def layer_map(path: Path) -> list[tuple[int, int, str]]:
    """(start, length, "data" | "zero") of the clusters the layer itself allocates."""
    out: list[tuple[int, int, str]] = []
    for e in qemu_img.map(path, force_share=True):
        if e["depth"] != 0 or not e["present"]:
            continue
        kind = "data" if e["data"] else "zero"
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], kind)
        else:
            out.append((e["start"], e["length"], kind))
    return out


def data_clusters(extents: list[tuple[int, int, str]], cs: int) -> int:
    return sum(-(-(s + n) // cs) - s // cs for s, n, kind in extents if kind == "data")


def l2_tables(extents: list[tuple[int, int, str]], cs: int) -> int:
    span = cs * (cs // 8)
    return len({i for s, n, _kind in extents for i in range(s // span, (s + n - 1) // span + 1)})


def assert_replaces(original: Path, copy: Path, cs: int, size: int) -> None:
    """The copy reads, checks and maps as the layer it stands for, and is compact."""
    qemu_img.compare(copy, original)
    result = qemu_img.check(copy)
    assert result["corruptions"] == 0 and result["leaks"] == 0, result
    assert result.get("check-errors", 0) == 0, result
    extents = layer_map(original)
    assert layer_map(copy) == extents
    l1_clusters = -(-max(1, -(-size // (cs * (cs // 8)))) * 8 // cs)
    structures = 1 + l1_clusters + l2_tables(extents, cs) + data_clusters(extents, cs)
    clusters = copy.stat().st_size // cs
    assert copy.stat().st_size % cs == 0
    refcount_clusters = -(-clusters // (cs // 2)) + 1          # blocks + one table cluster
    assert clusters <= structures + refcount_clusters


def copy_chain(chain: Chain, replica: Path, direct: bool = True) -> list[Path]:
    """Copy every layer; odd layers name their parent relative, even ones absolute."""
    replica.mkdir()
    copies = []
    for i, path in enumerate(chain.paths):
        parent = chain.paths[i - 1] if i else None
        backing = None
        if parent is not None:
            backing = os.path.relpath(parent, replica) if i % 2 else str(parent)
        dst = replica / path.name
        moved: list[int] = []
        result = copy_layer(str(path), str(dst), backing=backing,
                            backing_format="qcow2" if parent else None,
                            progress=moved.append, direct=direct)
        assert sum(moved) == result.data_bytes == plan_bytes(str(path))
        assert result.data_bytes == result.clusters * chain.layers[i].cluster_size
        assert result.bytes_moved == dst.stat().st_size
        copies.append(dst)
    return copies


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("name", CHAINS)
def test_every_layer_copies_exactly(workdir: Path, name: str, direct: bool) -> None:
    cs, size = CHAINS[name]
    layers = [Layer(cluster_size=cs, io=io) for io in chain_io(cs, size)]
    chain = build_chain(workdir / "chain", layers, size)
    copies = copy_chain(chain, workdir / "replica", direct)
    for original, copy in zip(chain.paths, copies, strict=True):
        assert_replaces(original, copy, cs, size)
    assert identity.read(str(copies[-1]))[1].state == identity.UNKNOWN


def test_compressed_base_is_inflated(workdir: Path) -> None:
    cs, size = 64 * KiB, 4 * MiB
    chain = build_chain(workdir / "chain", [
        Layer(cluster_size=cs, compressed=True,
              io=("write -P 0x41 0 1M", "write -P 0x42 2M 640k", "write -z 3M 64k")),
        Layer(cluster_size=cs, io=("write -P 0x51 960k 128k", "write -z 2M 64k")),
    ], size)
    assert qemu_img.check(chain.paths[0])["compressed-clusters"] > 0
    copies = copy_chain(chain, workdir / "replica")
    for original, copy in zip(chain.paths, copies, strict=True):
        assert_replaces(original, copy, cs, size)
    assert qemu_img.check(copies[0]).get("compressed-clusters", 0) == 0


def test_copies_keep_identity_and_form_a_chain(workdir: Path) -> None:
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    create_qcow2(str(base), 4 * MiB)
    vdisk_write(base, os.urandom(MiB + 3000), 0)
    base_id = identity.read(str(base))[1].content_id
    create_qcow2(str(top), 4 * MiB, backing="base.qcow2", backing_format="qcow2",
                 parent_id=base_id)
    vdisk_write(top, os.urandom(2 * MiB), 700 * KiB)
    replica = workdir / "replica"
    replica.mkdir()
    copy_layer(str(base), str(replica / "base.qcow2"), backing=None, backing_format=None)
    copy_layer(str(top), str(replica / "top.qcow2"), backing="base.qcow2",
               backing_format="qcow2")
    for name in ("base.qcow2", "top.qcow2"):
        source = identity.read(str(workdir / name))[1]
        copied = identity.read(str(replica / name))[1]
        assert source.valid and copied == source
    assert identity.read(str(replica / "top.qcow2"))[1].parent_id == base_id
    disk = open_disk(str(replica / "top.qcow2"), readonly=True)   # parent IDs match
    disk.close()
    qemu_img.compare(replica / "top.qcow2", top)




def test_fallback_to_pread_pwrite(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cs, size = 64 * KiB, 3 * MiB + 3584
    chain = build_chain(workdir / "chain", [Layer(io=chain_io(cs, size)[0])], size)
    calls: list[int] = []

    def cross_device(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    copy_chain(chain, workdir / "replica", direct=False)
    assert len(calls) == 1                   # not tried again after the first refusal
    assert_replaces(chain.paths[0], workdir / "replica" / chain.paths[0].name, cs, size)


def test_short_copy_file_range_returns(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cs, size = 64 * KiB, 3 * MiB + 3584
    chain = build_chain(workdir / "chain", [Layer(io=chain_io(cs, size)[0])], size)
    real = os.copy_file_range

    def short(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        return real(src, dst, min(count, 12345), offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", short)
    copy_chain(chain, workdir / "replica", direct=False)
    assert_replaces(chain.paths[0], workdir / "replica" / chain.paths[0].name, cs, size)


# -- direct I/O ------------------------------------------------------------------------------


class DirectSpy:
    """Counts switches of a descriptor to O_DIRECT and the bytes written while it is
    on; can refuse the switch, make such a write fail (errno) at a given call, or
    take 0.5 s at another."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None,
                 errno_: int = errno.EINVAL, refuse_switch: bool = False,
                 slow_at: int | None = None) -> None:
        self.switches = self.writes = self.bytes = 0
        self.last_write_end = 0.0
        real_fcntl, real_pwrite = fcntl.fcntl, os.pwrite

        def direct(fd: int) -> bool:
            return bool(real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

        def spy_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
            if cmd == fcntl.F_SETFL and arg & os.O_DIRECT and not direct(fd):
                self.switches += 1
                if refuse_switch:
                    raise OSError(errno.EINVAL, "Invalid argument")
            return real_fcntl(fd, cmd, arg)

        def spy_pwrite(fd: int, data: bytes, offset: int) -> int:
            if not direct(fd):
                return real_pwrite(fd, data, offset)
            self.writes += 1
            if self.writes == fail_at:
                raise OSError(errno_, os.strerror(errno_))
            try:
                if self.writes == slow_at:
                    time.sleep(0.5)
                n = real_pwrite(fd, data, offset)
            finally:                    # a write that failed (a closed fd) counts too
                self.last_write_end = time.monotonic()
            self.bytes += n
            return n

        monkeypatch.setattr(fcntl, "fcntl", spy_fcntl)
        monkeypatch.setattr(os, "pwrite", spy_pwrite)


def direct_io_works(directory: Path) -> bool:
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        try:
            fd = os.open(Path(scratch) / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        except OSError:
            return False
        os.close(fd)
        return True


# the tests' directories are made under the temporary directory
needs_direct_io = pytest.mark.skipif(not direct_io_works(Path(tempfile.gettempdir())),
                                     reason="the temporary directory refuses O_DIRECT")


def one_layer(workdir: Path, compressed: bool = False) -> tuple[Chain, int, int]:
    cs, size = 64 * KiB, 3 * MiB + 3584
    io = chain_io(cs, size)[0]
    return build_chain(workdir / "chain", [Layer(io=io, compressed=compressed)], size), cs, size


@needs_direct_io
@pytest.mark.parametrize("compressed", [False, True], ids=["data", "compressed"])
def test_data_is_written_with_direct_io(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                        compressed: bool) -> None:
    chain, cs, size = one_layer(workdir, compressed)
    spy = DirectSpy(monkeypatch)
    calls: list[int] = []
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(1) or 0)
    result = copy_layer(str(chain.paths[0]), str(workdir / "copy.qcow2"), backing=None,
                        backing_format=None)
    monkeypatch.undo()
    assert spy.switches == 1 and spy.bytes == result.data_bytes and not calls
    assert_replaces(chain.paths[0], workdir / "copy.qcow2", cs, size)


@pytest.mark.parametrize("refuse_switch", [True, False], ids=["at-switch", "at-first-write"])
def test_direct_io_refused_falls_back_to_the_page_cache(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, refuse_switch: bool) -> None:
    chain, cs, size = one_layer(workdir)
    spy = DirectSpy(monkeypatch, fail_at=None if refuse_switch else 1,
                    refuse_switch=refuse_switch)
    copy_chain(chain, workdir / "replica")
    monkeypatch.undo()
    assert spy.switches == 1 and spy.bytes == 0 and spy.writes == (0 if refuse_switch else 1)
    assert_replaces(chain.paths[0], workdir / "replica" / chain.paths[0].name, cs, size)


@needs_direct_io
def test_direct_write_error_after_a_good_one_fails_the_copy(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL after a direct write succeeded is an error, not a reason to switch paths;
    the partial file goes."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    qemu_img.create(src, size=32 * MiB)
    qemu_io.run(src, "write -P 0x11 0 12M")             # three 4 MiB writes
    DirectSpy(monkeypatch, fail_at=2)
    with pytest.raises(OSError, match="Invalid argument"):
        copy_layer(str(src), str(dst), backing=None, backing_format=None)
    monkeypatch.undo()
    assert sorted(p.name for p in workdir.iterdir()) == ["src.qcow2"]


@needs_direct_io
def test_interrupt_while_stopping_waits_for_the_writers(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel with chunks in flight, then a Ctrl-C while the mover waits for them:
    the mover still waits, so no write lands after the copy is removed."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    qemu_img.create(src, size=32 * MiB)
    qemu_io.run(src, "write -P 0x11 0 16M")
    spy = DirectSpy(monkeypatch, slow_at=3)     # a worker's write, still going at the cancel
    real_shutdown = ThreadPoolExecutor.shutdown
    interrupts: list[int] = []

    def interrupted_once(pool: ThreadPoolExecutor, wait: bool = True, *,
                         cancel_futures: bool = False) -> None:
        if not interrupts:
            interrupts.append(1)
            raise KeyboardInterrupt
        real_shutdown(pool, wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(ThreadPoolExecutor, "shutdown", interrupted_once)
    reports: list[int] = []

    def cancel_on_second(n: int) -> None:
        reports.append(n)
        if len(reports) == 2:           # the first chunk from a worker: another in flight
            raise Cancelled

    with pytest.raises(KeyboardInterrupt):
        copy_layer(str(src), str(dst), backing=None, backing_format=None,
                   progress=cancel_on_second)
    returned = time.monotonic()
    time.sleep(0.7)                     # a write still going would end in here
    monkeypatch.undo()
    assert interrupts and spy.writes >= 3
    assert spy.last_write_end < returned
    assert sorted(p.name for p in workdir.iterdir()) == ["src.qcow2"]


@needs_direct_io
def test_the_copy_is_opened_once(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct I/O switches the creating descriptor: a second open of the copy would
    check its permissions again (created 0400 under umask 0277, it would fail for
    anyone but root)."""
    chain, cs, size = one_layer(workdir)
    dst = workdir / "copy.qcow2"
    opened: list[int] = []
    real_open = os.open

    def spy_open(path: str, flags: int, *args: object) -> int:
        if os.fspath(path) == str(dst):
            opened.append(flags)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", spy_open)
    spy = DirectSpy(monkeypatch)
    copy_layer(str(chain.paths[0]), str(dst), backing=None, backing_format=None)
    monkeypatch.undo()
    assert len(opened) == 1 and opened[0] & os.O_EXCL and spy.bytes > 0
    assert_replaces(chain.paths[0], dst, cs, size)


def test_data_past_the_end_of_the_source_reads_as_zeros(workdir: Path) -> None:
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    qemu_img.create(src, size=MiB)
    qemu_io.run(src, "write -P 0x61 0 64k", "write -P 0x62 960k 64k")
    last = max(e["offset"] for e in qemu_img.map(src) if e["data"])
    assert last + 64 * KiB == src.stat().st_size
    os.truncate(src, last + 1000)                       # the last cluster is cut short
    copy_layer(str(src), str(dst), backing=None, backing_format=None)
    qemu_img.compare(dst, src)
    assert_replaces(src, dst, 64 * KiB, MiB)


# -- refusals -----------------------------------------------------------------------------


def test_existing_destination_is_refused(workdir: Path) -> None:
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    qemu_img.create(src, size=MiB)
    qemu_io.run(src, "write -P 0x11 0 64k")
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        copy_layer(str(src), str(dst), backing=None, backing_format=None)
    assert dst.read_bytes() == b"precious"


def l2_entry_position(path: Path, cluster: int) -> int:
    """File offset of the L2 entry of a guest cluster (in the first L2 table)."""
    head = path.read_bytes()[:64 * KiB]
    cs = 1 << struct.unpack_from(">I", head, 20)[0]
    l1_offset = struct.unpack_from(">Q", head, 40)[0]
    with path.open("rb") as f:
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & OFFSET_MASK
    assert l2_offset and cluster < cs // 8
    return l2_offset + 8 * cluster


def poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def test_entry_past_the_end_is_refused(workdir: Path) -> None:
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    qemu_img.create(src, size=MiB)
    qemu_io.run(src, "write -P 0x11 0 256k")
    beyond = (src.stat().st_size + 10 * 64 * KiB) & ~(64 * KiB - 1)
    poke(src, l2_entry_position(src, 2), struct.pack(">Q", COPIED | beyond))
    with pytest.raises(MalformedImage, match="outside the image data"):
        plan_bytes(str(src))
    with pytest.raises(MalformedImage, match="outside the image data"):
        copy_layer(str(src), str(dst), backing=None, backing_format=None)
    assert sorted(p.name for p in workdir.iterdir()) == ["src.qcow2"]


def test_failure_while_copying_removes_the_copy(workdir: Path) -> None:
    """Damage found only when the data moves (bad deflate stream) leaves nothing behind."""
    scratch, src, dst = (workdir / n for n in ("scratch.qcow2", "src.qcow2", "dst.qcow2"))
    qemu_img.create(scratch, size=MiB)
    qemu_io.run(scratch, "write -P 0x11 0 1M")
    qemu_img.convert(scratch, src, "qcow2", compressed=True)
    scratch.unlink()
    with src.open("rb") as f:
        f.seek(l2_entry_position(src, 3))
        entry = struct.unpack(">Q", f.read(8))[0]
    x = 62 - (16 - 8)
    poke(src, entry & ((1 << x) - 1), os.urandom(64))
    with pytest.raises(MalformedImage, match="compressed cluster"):
        copy_layer(str(src), str(dst), backing=None, backing_format=None)
    assert sorted(p.name for p in workdir.iterdir()) == ["src.qcow2"]


class Cancelled(Exception):
    pass


def test_cancelled_by_progress_removes_the_copy(workdir: Path) -> None:
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    qemu_img.create(src, size=MiB)
    qemu_io.run(src, "write -P 0x11 0 1M")

    def cancel(n: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        copy_layer(str(src), str(dst), backing=None, backing_format=None, progress=cancel)
    assert sorted(p.name for p in workdir.iterdir()) == ["src.qcow2"]
