"""Owned temporaries (vdisk_block.files): the files images are written into
before they get their final names, and the names they reserve.

A temporary its creator holds (flock) is live and never removed; one nobody
holds is stale and removed by whoever sweeps; a cleaner and a creator that
meet on one name never lose a file that was meant to stay.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdisk_block import files
from vdisk_block.catalog import Catalog, check_disk_name
from vdisk_block.errors import ImageError
from vdisk_block.files import OwnedTemp, remove_if_stale, sweep_stale_temps, temp_path


def stale(final: Path, suffix: str, data: bytes = b"left by a crash") -> Path:
    """What a killed creator leaves: its temporary, held by nobody."""
    path = Path(temp_path(str(final), suffix))
    path.write_bytes(data)
    return path


def test_sweep_removes_stale_temps_only(tmp_path: Path) -> None:
    dead = [stale(tmp_path / "a.qcow2", ".creating"), stale(tmp_path / "b.qcow2", ".import")]
    partial = stale(tmp_path / "c.qcow2", ".partial")     # replicate's, under its own lock
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"an image")
    other = tmp_path / ".e.qcow2.something"
    other.write_bytes(b"not ours")
    with OwnedTemp.create(str(tmp_path / "f.qcow2"), ".import") as live:
        removed = sweep_stale_temps(str(tmp_path))
        assert removed == sorted(p.name for p in dead)
        assert sorted(os.listdir(tmp_path)) == sorted(
            [partial.name, image.name, other.name, os.path.basename(live.path)])
        assert not files.is_stale(live.path)
    assert sweep_stale_temps(str(tmp_path / "missing")) == []


def test_a_live_temp_is_never_taken(tmp_path: Path) -> None:
    final = str(tmp_path / "a.qcow2")
    with OwnedTemp.create(final) as first:
        with pytest.raises(FileExistsError):
            OwnedTemp.create(final, take_stale=True)
        assert not remove_if_stale(first.path)
        assert os.path.exists(first.path)


def test_a_temp_held_by_another_process_is_live(tmp_path: Path) -> None:
    """The lock is the creator's process's: a child holding it keeps it live."""
    final = str(tmp_path / "a.qcow2")
    t = OwnedTemp.create(final, ".import")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE, pass_fds=(t.fd,))
    try:
        t.close()                                   # only the child holds it now
        assert not files.is_stale(t.path)
        assert sweep_stale_temps(str(tmp_path)) == []
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert files.is_stale(t.path)
    assert sweep_stale_temps(str(tmp_path)) == [os.path.basename(t.path)]


def test_creator_retries_when_a_cleaner_removed_its_new_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cleaner ran between the creator's O_EXCL and its flock: the creator's
    file is gone, so it makes another; the cleaner's removal took nothing live."""
    final = str(tmp_path / "a.qcow2")
    path = temp_path(final, ".creating")
    flock = fcntl.flock
    cleaned: list[bool] = []

    def cleaner_first(fd: int, op: int) -> None:
        if not cleaned and op == fcntl.LOCK_EX:
            cleaned.append(remove_if_stale(path))    # not yet locked: looks stale
        flock(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", cleaner_first)
    with OwnedTemp.create(final) as t:
        assert cleaned == [True]
        st = os.stat(path)
        assert (st.st_ino, st.st_dev) == (os.fstat(t.fd).st_ino, os.fstat(t.fd).st_dev)
        monkeypatch.setattr(files.fcntl, "flock", flock)
        assert not files.is_stale(path)


def test_cleaner_never_removes_a_file_renamed_into_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cleaner opened the temporary, then its creator renamed it into place
    and let go: the cleaner gets the lock, but the name is no longer the file's."""
    final = tmp_path / "a.qcow2"
    t = OwnedTemp.create(str(final))
    flock = fcntl.flock

    def creator_finishes_first(fd: int, op: int) -> None:
        if op & fcntl.LOCK_NB and t.fd >= 0:
            t.commit()
            t.close()
        flock(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", creator_finishes_first)
    assert not remove_if_stale(t.path)
    assert final.exists()


def test_commit_never_replaces_and_discard_removes_only_its_own(tmp_path: Path) -> None:
    final = tmp_path / "a.qcow2"
    t = OwnedTemp.create(str(final), ".import")
    final.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        t.commit()
    t.discard()
    t.close()
    assert os.listdir(tmp_path) == ["a.qcow2"] and final.read_bytes() == b"someone else's"

    final.unlink()
    with OwnedTemp.create(str(final), ".import") as t:
        t.commit()
        final.unlink()                      # gone and replaced by another file
        final.write_bytes(b"another")
        t.discard()
    assert final.read_bytes() == b"another"


def test_failure_inside_the_block_discards(tmp_path: Path) -> None:
    final = tmp_path / "a.qcow2"
    with pytest.raises(RuntimeError), OwnedTemp.create(str(final)) as t:
        t.commit()
        raise RuntimeError("copy failed after the rename")
    assert os.listdir(tmp_path) == []


# -- names --------------------------------------------------------------------------------


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog.init(str(tmp_path / "ds"))
    yield c
    c.close()


def test_new_names_skip_names_any_temporary_reserves(catalog: Catalog) -> None:
    first = catalog.new_image_paths("vm", 3)
    for rel, suffix in zip(first, [".import", ".creating", ".partial"], strict=True):
        stale(Path(catalog.abspath(rel)), suffix)
    assert not set(catalog.new_image_paths("vm", 3)) & set(first)


def test_reserved_names_are_distinct_and_held(catalog: Catalog) -> None:
    temps = catalog.reserve_image_paths("vm", 3, ".import")
    try:
        finals = [t.final for t in temps]
        assert len(set(finals)) == 3 and not any(os.path.exists(f) for f in finals)
        again = catalog.reserve_image_paths("vm", 2, ".import")
        assert not {t.final for t in again} & set(finals)
        for t in again:
            t.discard()
            t.close()
        assert all(not files.is_stale(t.path) for t in temps)
    finally:
        for t in temps:
            t.discard()
            t.close()
    assert os.listdir(catalog.abspath("images")) == []


@pytest.mark.parametrize("name", ["vm1", "a", "A.b_c-d+e", "9" * 64, "_x", "+x"])
def test_new_disk_names_allowed(name: str) -> None:
    check_disk_name("/ds", name)


@pytest.mark.parametrize("name", ["", "a\nb", "a b", "-x", ".x", "a/b", "9" * 65, "é", "a:b",
                                  "a?b", "a\n"])
def test_new_disk_names_refused(name: str) -> None:
    with pytest.raises(ImageError, match="invalid disk name .*: use letters, digits"):
        check_disk_name("/ds", name)
    if name and "/" not in name and not name.startswith("."):
        check_disk_name("/ds", name, new=False)        # an existing disk's name
