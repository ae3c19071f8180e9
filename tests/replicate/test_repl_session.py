"""Several chains in one replicate: each chain's copies are synced and renamed
by a committer thread while the next chain is copied.

What must hold whatever the overlap: a later chain may link to an earlier
chain's copy before it is in place, and is then put in place after it; a
failing chain leaves the chains before it finished (disk added) and nothing
half-written behind it; a failed sync abandons everything queued after it;
and a kill at any point leaves only whole images.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cliharness import run_vdisk
from replharness import (
    MiB,
    Source,
    assert_chain_opens,
    assert_same_data,
    check_all,
    content_id,
    hidden_files,
    target_disk,
    vdisk,
    visible_images,
)
from test_repl_kill import PAUSE, run_then_kill

from vdisk import replicate as repl
from vdisk_block import files
from vdisk_block.catalog import Catalog


def disks_on(target: Path) -> list[str]:
    if not (target / "vdisk.db").exists():
        return []
    return sorted(d["name"] for d in run_vdisk("disk", "list", "-d", target, "--json")
                  .json()["disks"])


def point_l2_entry_past_eof(image: Path, guest: int) -> None:
    """Make the L2 entry of ``guest`` point past the end of the file: the chain
    still opens (L2 tables are read on demand), copying the layer is refused."""
    with open(image, "r+b") as f:
        head = f.read(104)
        cluster_bits, = struct.unpack(">I", head[20:24])
        l1_offset, = struct.unpack(">Q", head[40:48])
        cs = 1 << cluster_bits
        per_l2 = cs // 8
        f.seek(l1_offset + 8 * (guest // cs // per_l2))
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        assert l2_offset, "no L2 table for that offset"
        f.seek(l2_offset + 8 * (guest // cs % per_l2))
        entry, = struct.unpack(">Q", f.read(8))
        assert entry & 0x00FF_FFFF_FFFF_FE00, "the cluster is not allocated"
        size = os.fstat(f.fileno()).st_size
        f.seek(l2_offset + 8 * (guest // cs % per_l2))
        f.write(struct.pack(">Q", (1 << 63) | (size + 64 * cs) // cs * cs))


def test_later_chain_links_to_a_copy_not_yet_in_place(source: Source, target: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The committer is held until both chains are copied: vm2's copy links to the
    base vm1's chain copied, which is still under its temporary name; both end
    whole and the base is copied once."""
    release = threading.Event()
    rename = files.rename_noreplace

    def held_rename(src: Any, dst: Any) -> None:
        if threading.current_thread().name == "replicate-commit":
            assert release.wait(30), "never released"
        rename(src, dst)

    monkeypatch.setattr(files, "rename_noreplace", held_rename)
    with repl.Session(str(target)) as session:
        try:
            session.add(str(source.top("vm1")), disk="vm1")
            session.add(str(source.top("vm2")), disk="vm2")
            # nothing is in place yet: every copy is still a .partial
            assert visible_images(target) == []
            assert len(hidden_files(target)) == 4       # vm1's 3 copies, vm2's top
        finally:
            release.set()
    vm1, vm2 = session.results
    assert [r["action"] for r in vm1["layers"]] == ["copied"] * 3
    assert [r["action"] for r in vm2["layers"]] == ["copied", "linked"]
    assert vm2["layers"][1]["image"] == vm1["layers"][2]["image"]
    for name in ("vm1", "vm2"):
        top = target / target_disk(target, name)["top"]
        assert_chain_opens(top)
        assert_same_data(source.top(name), top)
    check_all(target)
    assert [n for n in hidden_files(target) if n.endswith(".partial")] == []


def test_failing_chain_keeps_the_ones_before(source: Source, target: Path) -> None:
    """vm2's top cannot be copied (an L2 entry past the end of the file): vm1,
    replicated in the same command just before, is finished all the same; vm3
    after it is not started; the error names the image."""
    point_l2_entry_past_eof(source.top("vm2"), MiB)
    res = vdisk("replicate", "vm1", "vm2", "vm3", "-d", source.path, "--to", target)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert str(source.top("vm2").name) in res.stderr and "outside" in res.stderr
    assert disks_on(target) == ["vm1"]
    top = target / target_disk(target, "vm1")["top"]
    assert_same_data(source.top("vm1"), top)
    check_all(target)
    assert hidden_files(target) == []
    # vm3 is replicated later, linking to what vm1 brought
    again = vdisk("replicate", "vm3", "-d", source.path, "--to", target, "--json")
    assert again.returncode == 0, again.stderr
    assert [r["action"] for r in again.json()["layers"]] == ["copied", "linked"]


def test_failed_sync_abandons_what_follows(source: Source, target: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The committer's first fsync fails (EIO), the later ones would not: nothing
    is renamed into place, neither that chain's copies nor the next chain's, no
    disk is added, no temporary file is left, and the error is the one raised."""
    fsync = os.fsync
    failed_once: list[int] = []

    def failing_fsync(fd: int) -> None:
        if threading.current_thread().name == "replicate-commit" and not failed_once:
            failed_once.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as failed, repl.Session(str(target)) as session:
        session.add(str(source.top("vm1")), disk="vm1")
        session.add(str(source.top("vm3")), disk="vm3")
    assert failed.value.errno == errno.EIO
    assert session.results == []
    assert visible_images(target) == []
    assert hidden_files(target) == []
    catalog = Catalog(str(target))
    try:
        assert catalog.disks() == []
    finally:
        catalog.close()


def test_failure_finishing_a_disk_stops_the_ones_after(source: Source, target: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """vm1's --verify fails (found while vm2 is being copied or afterwards): vm1's
    disk is not added, and neither is vm2's, though its copy was made; no copy
    of either is left (vm2's links to vm1's base), no temporary file either,
    and the error raised is vm1's."""
    from vdisk.errors import ContentMismatch

    compare = repl.qemu_img.compare
    calls: list[str] = []

    def mismatch_first(a: Any, b: Any, **kw: Any) -> None:
        calls.append(str(a))
        if str(a) == str(source.top("vm1")):        # vm2 would compare equal
            raise ContentMismatch(["qemu-img", "compare", str(a), str(b)], 1, "", "differ")
        compare(a, b, **kw)

    monkeypatch.setattr(repl.qemu_img, "compare", mismatch_first)
    with pytest.raises(repl.ReplicateError, match="verify: .* differs from") as failed, \
            repl.Session(str(target), verify=True) as session:
        session.add(str(source.top("vm1")), disk="vm1")
        session.add(str(source.top("vm2")), disk="vm2")
    assert str(source.top("vm1").name) in str(failed.value)
    assert session.results == []
    assert disks_on(target) == []
    assert hidden_files(target) == []
    # a copy found to differ is never left to be linked to: vm1's copies are
    # gone, and vm2's, which linked to vm1's base
    assert visible_images(target) == []
    # so a later run copies every layer again instead of linking to them
    monkeypatch.undo()
    again = vdisk("replicate", "vm1", "-d", source.path, "--to", target, "--json")
    assert again.returncode == 0, again.stderr
    assert [r["action"] for r in again.json()["layers"]] == ["copied"] * 3


def test_disk_name_twice_in_one_session(source: Source, target: Path) -> None:
    """The second add() of a name refused before anything of it is copied, though
    the first one's disk is not added yet."""
    with repl.Session(str(target)) as session:
        session.add(str(source.top("vm1")), disk="vm1")
        with pytest.raises(repl.ReplicateError, match="'vm1' already exists"):
            session.add(str(source.top("vm2")), disk="vm1")
    assert disks_on(target) == ["vm1"]
    assert len(visible_images(target)) == 4


@pytest.mark.crash
@pytest.mark.parametrize("point", ["copy:4", "renamed:3", "renamed:4", "add-disk"])
def test_kill_between_chains_then_rerun(source: Source, target: Path, tmp_path: Path,
                                        point: str) -> None:
    """``replicate vm1 vm3`` killed while vm3's top (the 4th copy) is copied or
    renamed, or while a disk is added: every visible image is whole; replicating
    the disks missing afterwards gives both, and nothing is left over."""
    marker = tmp_path / "paused"
    cmd = [sys.executable, str(PAUSE), point, str(marker), "replicate", "vm1", "vm3",
           "-d", str(source.path), "--to", str(target), "--json"]
    run_then_kill(cmd, f"pause point {point}", marker.exists)
    for image in visible_images(target):
        assert_chain_opens(image)
    check_all(target)
    missing = [d for d in ("vm1", "vm3") if d not in disks_on(target)]
    assert missing, "the kill came after both disks were added"
    res = vdisk("replicate", *missing, "-d", source.path, "--to", target, "--json")
    assert res.returncode == 0, res.stderr
    for name in ("vm1", "vm3"):
        top = target / target_disk(target, name)["top"]
        assert_same_data(source.top(name), top)
    check_all(target)
    assert hidden_files(target) == []
    # the shared layers were never copied twice
    ids = [content_id(p) for p in visible_images(target)]
    for layer in ("base", "mid"):
        assert ids.count(content_id(source.images[layer])) == 1, layer


def test_a_failure_finishing_an_earlier_disk_is_reported_with_the_later_one(
        source: Source, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vm1's copies are queued; the committer is held until vm2's copy has failed
    (an L2 entry past the end of its top), then vm1's first sync fails (EIO)
    while the session is finished: the error names both failures, vm1's first,
    and neither disk is added."""
    point_l2_entry_past_eof(source.top("vm2"), MiB)
    release = threading.Event()
    fsync = os.fsync

    def held_failing_fsync(fd: int) -> None:
        if threading.current_thread().name == "replicate-commit":
            assert release.wait(30), "never released"
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", held_failing_fsync)
    with pytest.raises(repl.ReplicateError) as failed, repl.Session(str(target)) as session:
        session.add(str(source.top("vm1")), disk="vm1")
        try:
            session.add(str(source.top("vm2")), disk="vm2")
        finally:
            release.set()
    message = str(failed.value)
    assert "Input/output error" in message and "outside" in message, message
    assert message.index("Input/output error") < message.index("outside")
    assert str(source.top("vm2").name) in message
    assert disks_on(target) == []
    assert visible_images(target) == [] and hidden_files(target) == []


def test_a_verify_that_cannot_compare_leaves_no_unverified_copy(
        source: Source, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compare of vm1's top copy fails otherwise than by a mismatch (qemu-img
    exits 2): that copy is never put in place, so nothing unverified is left
    for a later run to link to; the copies below it, compared equal, stay."""
    from vdisk.errors import QemuImgError

    compare = repl.qemu_img.compare

    def broken_on_top(a: Any, b: Any, **kw: Any) -> None:
        if str(a) == str(source.top("vm1")):
            raise QemuImgError(["qemu-img", "compare", str(a), str(b)], 2, "", "I/O error")
        compare(a, b, **kw)

    monkeypatch.setattr(repl.qemu_img, "compare", broken_on_top)
    with pytest.raises(QemuImgError), repl.Session(str(target), verify=True) as session:
        session.add(str(source.top("vm1")), disk="vm1")
    assert disks_on(target) == [] and hidden_files(target) == []
    assert sorted(content_id(p) for p in visible_images(target)) == \
        sorted(content_id(source.images[n]) for n in ("base", "mid"))
    for image in visible_images(target):
        assert_chain_opens(image)
