"""Content identity of served chains (docs/content-id.md), through nbdkit.

A chain whose parent changed since its child was created is refused by name;
a write through NBD gives the top a fresh content ID; consolidation into an
image of the chain (and the recovery of one that died half-way) leaves links
that a restarted server accepts. QEMU has the last word on the images.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from nbdharness import MiB, first_difference, pattern, read_all
from qchain import vdisk_write

from vdisk import qemu_img, qemu_io
from vdisk.errors import NbdkitError
from vdisk.routing import open_service
from vdisk_block import ImageError, open_chain
from vdisk_block import identity as ident
from vdisk_block.catalog import Catalog
from vdisk_block.create import create_qcow2
from vdisk_block.diskservice import DiskService

SIZE = 8 * MiB
MODIFIED = "modified since the child was created"
DEADLINE = 60.0


def identity_of(path: Path) -> ident.Identity:
    return ident.read(str(path))[1]




def assert_chain_opens(top: Path) -> None:
    for f in open_chain(str(top), readonly=True):
        f.close()


def check_chain(top: Path, expected: bytes, scratch: Path) -> None:
    """qemu-img check of every image of the chain, then compare with expected."""
    for info in qemu_img.info(top, backing_chain=True):
        r = qemu_img.check(info["filename"])
        assert r["corruptions"] == 0 and r["leaks"] == 0, (info["filename"], r)
    scratch.write_bytes(expected)
    try:
        qemu_img.compare(top, scratch, fmt_b="raw")
    finally:
        scratch.unlink()


def vdisk_chain(directory: Path, names: list[str]) -> list[Path]:
    """A chain made by vdisk, base first in names, each image with data of its own
    written by vdisk; returns it top first."""
    paths: list[Path] = []
    parent: bytes | None = None
    for i, name in enumerate(names):
        path = directory / name
        backing = paths[0].name if paths else None
        create_qcow2(str(path), SIZE, backing=backing,
                     backing_format="qcow2" if backing else None, parent_id=parent)
        vdisk_write(path, pattern(i, 1 * MiB + 5000), i * 2 * MiB + 777)
        parent = identity_of(path).content_id
        paths.insert(0, path)
    return paths


# -- datastores ------------------------------------------------------------------------------


class Datastore:
    """A datastore directory (catalog + images/) built offline, served on demand."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.images = root / "images"
        self.images.mkdir(parents=True)
        Catalog.init(str(root)).close()

    def register(self, name: str, top: Path) -> None:
        cat = Catalog(str(self.dir))
        try:
            cat.add_disk(name, os.path.relpath(top, self.dir))
        finally:
            cat.close()

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.dir)

    def top(self, name: str) -> Path:
        cat = Catalog(str(self.dir))
        try:
            return self.dir / cat.disk(name)["top"]
        finally:
            cat.close()

    def add_job(self, disk: str, target: Path, top: Path, **fields: Any) -> int:
        """A job row as consolidate writes it before the job starts (state copying)."""
        cat = Catalog(str(self.dir))
        try:
            return cat.add_job(disk, "consolidate", target=self.rel(target), new_image=0,
                               collapse=1, top_before=self.rel(top), **fields)
        finally:
            cat.close()

    @contextlib.contextmanager
    def serve(self, workdir: Path) -> Iterator[ServedDatastore]:
        served = ServedDatastore(self, workdir)
        try:
            yield served
        finally:
            served.stop()


class ServedDatastore:
    """``vdisk serve`` on the datastore (one worker per disk, their sockets in
    workdir); commands go where ``vdisk`` sends them (vdisk.routing)."""

    def __init__(self, ds: Datastore, workdir: Path) -> None:
        self.ds = ds
        self.rundir = workdir
        self.log = workdir / "serve.stderr"
        with open(self.log, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vdisk.cli", "serve", "-d", str(ds.dir),
                 "--unix-dir", str(workdir), "--json"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise AssertionError(f"vdisk serve did not start: {self.stderr_text()}")
        self.info = json.loads(line)
        self.service = open_service(ds.dir)

    def stop(self) -> None:
        if getattr(self, "service", None) is not None:
            self.service.close()
            self.service = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stderr_text(self) -> str:
        """The server's log and every worker's."""
        logs = [self.log, *sorted(self.rundir.glob("*.log"))]
        return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        return self.service.execute(command, arguments)

    def job(self, job_id: int) -> dict[str, Any]:
        return self.execute("query-jobs", id=job_id)["jobs"][0]

    def wait_job(self, job_id: int, states: tuple[str, ...]) -> dict[str, Any]:
        end = time.monotonic() + DEADLINE
        while True:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            assert job["state"] in ("copying", "ready", "pivoting"), job
            assert time.monotonic() < end, f"job {job_id} never reached {states}: {job}"
            time.sleep(0.05)

    def socket(self, export: str) -> Path:
        return self.rundir / f"{export}.sock"

    def connect(self, export: str) -> nbd.NBD:
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(str(self.socket(export)))
        return h

    def read(self, export: str) -> bytes:
        h = self.connect(export)
        try:
            return read_all(h)
        finally:
            h.shutdown()


@pytest.fixture
def sockdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for nbdkit's sockets (the kernel limits their paths)."""
    return tmp_path_factory.mktemp("s")


# -- refusal --------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["qemu-io", "vdisk"])
def test_serving_a_chain_whose_parent_changed_is_refused(serve, workdir: Path,
                                                         writer: str) -> None:
    top, mid, _base = vdisk_chain(workdir, ["base.qcow2", "mid.qcow2", "top.qcow2"])
    if writer == "qemu-io":
        qemu_io.run(mid, "write -P 0x77 0 4k")
    else:
        vdisk_write(mid, b"\x77" * 4096, 0)
    files = {p: p.read_bytes() for p in workdir.iterdir()}
    with pytest.raises(NbdkitError) as excinfo:
        serve(top)
    e = excinfo.value
    assert e.returncode is not None and e.returncode > 0, e
    assert "Traceback" not in e.stderr, e.stderr
    lines = [line for line in e.stderr.splitlines() if MODIFIED in line]
    assert lines, e.stderr
    assert f"parent {mid} {MODIFIED}" in lines[0], lines[0]
    assert {p: p.read_bytes() for p in workdir.iterdir()} == files, "the refusal wrote"


def test_serving_a_datastore_refuses_the_disk_not_the_server(
        tmp_path: Path, sockdir: Path) -> None:
    """A disk whose chain is refused has no worker serving it (its worker
    says why, once per start); the server serves the others."""
    ds = Datastore(tmp_path / "ds")
    good = vdisk_chain(ds.images, ["g0.qcow2", "g1.qcow2"])
    bad = vdisk_chain(ds.images, ["b0.qcow2", "b1.qcow2"])
    ds.register("good", good[0])
    ds.register("bad", bad[0])
    qemu_io.run(bad[1], "write -P 0x78 0 4k")
    with ds.serve(sockdir) as served:
        states = {d["disk"]: d["state"] for d in served.info["disks"]}
        assert states["good"] == "running" and states["bad"] != "running", served.info
        bad_info = next(d for d in served.info["disks"] if d["disk"] == "bad")
        assert MODIFIED in bad_info["error"] and str(bad[1]) in bad_info["error"], bad_info
        assert served.returncode is None, served.stderr_text()
        ok = served.read("good")
        assert len(ok) == SIZE
        log = served.stderr_text()
    assert "Traceback" not in log, log
    assert any(MODIFIED in line and str(bad[1]) in line for line in log.splitlines()), log


# -- writes ---------------------------------------------------------------------------------


def test_nbd_write_gives_the_top_a_fresh_id(serve, workdir: Path) -> None:
    top, mid, _base = vdisk_chain(workdir, ["base.qcow2", "mid.qcow2", "top.qcow2"])
    before = identity_of(top)
    served = serve(top)
    h = served.connect()
    expected = bytearray(read_all(h))
    assert identity_of(top) == before, "reading must not change the identity"
    data = pattern(99, 300_000)
    h.pwrite(data, 5 * MiB + 3)
    expected[5 * MiB + 3:5 * MiB + 3 + len(data)] = data
    fresh = identity_of(top)            # on disk before the write was acknowledged
    assert fresh.valid and fresh.content_id != before.content_id
    assert fresh.parent_id == before.parent_id == identity_of(mid).content_id
    h.pwrite(b"\x5a" * 4096, 0)         # later writes of this open keep it
    expected[0:4096] = b"\x5a" * 4096
    h.flush()
    assert identity_of(top) == fresh
    assert bytes(read_all(h)) == bytes(expected)
    served.stop()
    assert identity_of(top) == fresh
    check_chain(top, bytes(expected), workdir / "expected.raw")
    assert_chain_opens(top)

    h = serve(top).connect()            # served again: the next write, another ID
    h.pwrite(b"\x5b" * 512, 512)
    again = identity_of(top)
    assert again.valid and again.content_id not in (before.content_id, fresh.content_id)
    assert again.parent_id == before.parent_id


# -- consolidation --------------------------------------------------------------------------


@pytest.fixture
def ds_disk(tmp_path: Path) -> tuple[Datastore, list[Path]]:
    """Datastore with disk "a": three images made by vdisk (links recorded)."""
    ds = Datastore(tmp_path / "ds")
    chain = vdisk_chain(ds.images, ["a-0.qcow2", "a-1.qcow2", "a-2.qcow2"])
    ds.register("a", chain[0])
    return ds, chain


@pytest.mark.parametrize("into,end", [(1, "cancel"), (1, "complete"), (2, "cancel")],
                         ids=["parent-cancel", "parent-complete", "base-cancel"])
def test_consolidation_into_an_image_of_the_chain_keeps_links(
        ds_disk, workdir: Path, sockdir: Path, into: int, end: str) -> None:
    ds, chain = ds_disk
    target = chain[into]
    old = identity_of(target)
    with ds.serve(sockdir) as served:
        h = served.connect("a")
        job_id = served.execute("consolidate", disk="a", into=ds.rel(target),
                                pivot=False)["job"]["id"]
        h.pwrite(pattern(7, 200_000), 3 * MiB + 11)     # mirrored while the job runs
        served.wait_job(job_id, ("ready",))
        fresh = identity_of(target)
        assert fresh.valid and fresh.content_id != old.content_id
        assert fresh.parent_id == old.parent_id
        assert identity_of(chain[into - 1]).parent_id == fresh.content_id
        if end == "cancel":
            served.execute("job-cancel", id=job_id)
            want = "cancelled"
        else:
            served.execute("job-complete", id=job_id)
            want = "done"
        assert served.wait_job(job_id, (want,))["state"] == want
        expected = read_all(h)
        h.shutdown()
        top = ds.top("a")
        assert top == (chain[0] if end == "cancel" else target)
    assert identity_of(target) == fresh
    assert_chain_opens(top)                               # links consistent
    check_chain(top, expected, workdir / "expected.raw")
    with ds.serve(sockdir) as served:                     # and nbdkit serves it again
        got = served.read("a")
        assert got == expected, first_difference(got, expected)


def _crash_between_refresh_and_set_parent(ds: Datastore, chain: list[Path]) -> int:
    """The job row of a consolidation into chain[1], and the files as a crash
    after the target's fresh ID and before the image above records it leaves them."""
    job_id = ds.add_job("a", chain[1], chain[0])
    mid = identity_of(chain[1])
    fresh = ident.new_id()
    cat = Catalog(str(ds.dir))          # the job journals the ID before writing it
    try:
        cat.update_job(job_id, target_id=ident.format_id(fresh))
    finally:
        cat.close()
    ident.write_path(str(chain[1]), fresh, mid.parent_id)
    with pytest.raises(ImageError, match=MODIFIED):        # what recovery must repair
        assert_chain_opens(chain[0])
    return job_id


def test_recovery_records_the_targets_fresh_id(ds_disk, workdir: Path,
                                               sockdir: Path) -> None:
    ds, chain = ds_disk
    expected = _raw(chain[0], workdir)
    job_id = _crash_between_refresh_and_set_parent(ds, chain)
    with ds.serve(sockdir) as served:                     # the worker's recovery
        assert served.job(job_id)["state"] == "interrupted"
        got = served.read("a")
        assert got == expected, first_difference(got, expected)
        served.execute("job-resume", id=job_id)
        assert served.wait_job(job_id, ("done",))["state"] == "done"
        assert served.read("a") == expected
    assert ds.top("a") == chain[1]
    assert_chain_opens(chain[1])
    check_chain(chain[1], expected, workdir / "expected.raw")


def test_recovery_in_process_service(ds_disk, workdir: Path) -> None:
    ds, chain = ds_disk
    expected = _raw(chain[0], workdir)
    job_id = _crash_between_refresh_and_set_parent(ds, chain)
    service = DiskService(str(ds.dir), "a")
    try:
        # the job's process is gone: shown interrupted, journalled so by the
        # disk's next owner
        assert service.execute("query-jobs", {"id": job_id})["jobs"][0]["state"] == \
            "interrupted"
        d = service.disk("a")
        assert service.catalog.job(job_id)["state"] == "interrupted"
        assert d.read(SIZE, 0) == expected
    finally:
        service.close()
    assert_chain_opens(chain[0])
    assert identity_of(chain[0]).parent_id == identity_of(chain[1]).content_id


def test_recovery_after_a_crash_during_recovery(ds_disk, workdir: Path) -> None:
    """A server that died after recording the job interrupted and before the
    rebind (or whose rebind failed) leaves the row "interrupted": the next
    service must still repair the link (recovery looks at each disk's last
    job, whatever its state).
    """
    ds, chain = ds_disk
    expected = _raw(chain[0], workdir)
    job_id = _crash_between_refresh_and_set_parent(ds, chain)
    cat = Catalog(str(ds.dir))
    try:
        cat.update_job(job_id, state="interrupted", error="the server stopped while the job ran")
    finally:
        cat.close()
    service = DiskService(str(ds.dir), "a")
    try:
        service.execute("job-cancel", {"id": job_id})
        assert service.disk("a").read(SIZE, 0) == expected
    finally:
        service.close()


def test_recovery_does_not_accept_a_foreign_write_of_the_target(ds_disk) -> None:
    """After the crash, and before the service starts again, the target is written
    by someone else (opened alone, through vdisk): its content ID changes again,
    and the chain must be refused as for any write of a parent: recovery
    records only the ID the job journalled.
    """
    ds, chain = ds_disk
    _crash_between_refresh_and_set_parent(ds, chain)
    vdisk_write(chain[1], b"\x99" * 4096, 7 * MiB)     # no layer above covers 7M
    service = DiskService(str(ds.dir), "a")
    try:
        with pytest.raises(ImageError, match=MODIFIED):
            service.disk("a")
    finally:
        service.close()


def test_a_job_failing_between_refresh_and_set_parent_leaves_an_openable_chain(
        ds_disk, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image above the target cannot be written (EIO): the consolidation fails,
    and the disk still opens, in this service and in a restarted one: the
    target took its old ID back, no data having been written.
    """
    ds, chain = ds_disk
    expected = _raw(chain[0], workdir)

    def set_parent(f, parent_id, durable=True):  # noqa: ANN001, ANN202
        raise OSError(errno.EIO, "Input/output error")

    service = DiskService(str(ds.dir), "a")
    try:
        monkeypatch.setattr(ident, "set_parent", set_parent)
        with pytest.raises(OSError):
            service.execute("consolidate", {"disk": "a", "into": ds.rel(chain[1])})
        monkeypatch.undo()
        assert service.disk("a").read(SIZE, 0) == expected
    finally:
        service.close()
    service = DiskService(str(ds.dir), "a")
    try:
        assert service.disk("a").read(SIZE, 0) == expected
    finally:
        service.close()


def _record_relinks_and_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """From now on, every set_parent and fdatasync, in order, with the real path."""
    events: list[tuple[str, str]] = []
    set_parent, fdatasync = ident.set_parent, os.fdatasync

    def record_set_parent(f, parent_id, durable=True):  # noqa: ANN001, ANN202
        events.append(("set_parent", os.path.realpath(f.path)))
        return set_parent(f, parent_id, durable)

    def record_sync(fd: int) -> None:
        events.append(("sync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        fdatasync(fd)

    monkeypatch.setattr(ident, "set_parent", record_set_parent)
    monkeypatch.setattr(os, "fdatasync", record_sync)
    return events


def test_a_cancelled_job_leaves_the_record_of_the_targets_id_synced(
        ds_disk, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image above the target records the target's fresh ID without a sync
    when the job starts (recovery redoes it after a crash while the job is
    live); a job that ends without a pivot, its journal settled, leaves that
    record durable: synced after it was written, before the cancel returns."""
    ds, chain = ds_disk
    expected = _raw(chain[0], workdir)
    service = DiskService(str(ds.dir), "a")
    try:
        events = _record_relinks_and_syncs(monkeypatch)
        job_id = service.execute("consolidate", {"disk": "a", "into": ds.rel(chain[1]),
                                                 "pivot": False})["job"]["id"]
        deadline = time.monotonic() + 30
        while service.execute("query-jobs", {"id": job_id})["jobs"][0]["state"] != "ready":
            assert time.monotonic() < deadline, "the job did not become ready"
            time.sleep(0.01)
        service.execute("job-cancel", {"id": job_id})
        monkeypatch.undo()
        child = os.path.realpath(chain[0])
        assert ("set_parent", child) in events
        after = events[events.index(("set_parent", child)) + 1:]
        assert ("sync", child) in after, events
        assert service.disk("a").read(SIZE, 0) == expected
    finally:
        service.close()
    assert_chain_opens(chain[0])
    assert identity_of(chain[0]).parent_id == identity_of(chain[1]).content_id


@pytest.mark.parametrize("collapse", [1, 2])
def test_a_job_failing_after_the_relink_leaves_it_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collapse: int) -> None:
    """The target is smaller than the disk (the disk grew since), so opening
    it grows it; that fails. The image above has recorded the target's fresh
    ID (without a sync): the record is synced before the error goes up, since
    a later job would leave recovery no trace of this one."""
    from vdisk_block import mirrortarget, open_chain
    from vdisk_block.disk import Disk
    from vdisk_block.mirror import MirrorJob

    names = ["base", "T", "C", "top"] if collapse == 2 else ["base", "T", "top"]
    paths = [str(tmp_path / n) for n in names]
    create_qcow2(paths[0], 4 * MiB)
    for i in range(1, len(paths)):
        size = 4 * MiB if i == 1 else 8 * MiB
        create_qcow2(paths[i], size, backing=names[i - 1], backing_format="qcow2",
                     parent_id=ident.read(paths[i - 1])[1].content_id)
    child = os.path.realpath(paths[-collapse])        # the image right above T
    def failing_resize(target, size):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    disk = Disk(open_chain(paths[-1], readonly=False), readonly=False)
    try:
        events = _record_relinks_and_syncs(monkeypatch)
        monkeypatch.setattr(mirrortarget, "resize", failing_resize)
        with pytest.raises(OSError, match="No space left"):
            MirrorJob(disk, collapse=collapse).start()
        monkeypatch.undo()
        assert ("set_parent", child) in events
        after = events[events.index(("set_parent", child)) + 1:]
        assert ("sync", child) in after, events
    finally:
        for f in disk.layers:
            f.close()
    assert_chain_opens(Path(paths[-1]))


def _raw(top: Path, workdir: Path) -> bytes:
    out = workdir / "view.raw"
    qemu_img.convert(top, out, "raw")
    try:
        return out.read_bytes()
    finally:
        out.unlink()
