"""``vdisk replicate`` of a disk the target has already: the replica is refreshed.

The layers the target lacks are copied, the disk moves to a new empty top on
the copied chain, and its old top (the empty top the last replicate gave it)
is removed. Refused, with one line and nothing changed on either side, when
the old top was written since, or while the target is served. And whatever
the target refuses, a served source is not snapshotted for nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cliharness import Datastore, MiB, Serve
from replharness import (
    Source,
    assert_chain_intact,
    assert_same_data,
    assert_totals,
    check_all,
    replicate,
    target_disk,
    tree,
    vdisk,
    write_layer,
)


def test_replicate_again_refreshes_the_disk(source: Source, target: Path) -> None:
    first = replicate("vm1", "-d", source.path, "--to", target)
    old_top = target / first["top"]
    write_layer(source.top("vm1"), [(60, 30 * MiB, MiB)])     # the source goes on

    second = replicate("vm1", "-d", source.path, "--to", target)
    assert [r["action"] for r in second["layers"]] == ["copied", "linked"]
    assert second["layers"][1]["image"] == first["layers"][1]["image"]     # mid
    assert second["bytes_moved"] == second["layers"][0]["bytes_moved"]
    assert second["disk"] == "vm1" and second["previous_top"] == first["top"]
    assert_totals(second, target)
    disk = target_disk(target, "vm1")
    assert disk["top"] == second["top"] != first["top"]
    assert not old_top.exists()
    assert (target / first["layers"][0]["image"]).exists()    # kept, for later runs
    top = target / disk["top"]
    assert_same_data(source.top("vm1"), top)
    assert_chain_intact(top)
    check_all(target)


def test_refresh_of_a_written_disk_is_refused(source: Source, target: Path) -> None:
    first = replicate("vm2", "-d", source.path, "--to", target)
    write_layer(target / first["top"], [(61, 0, MiB)])       # someone used the replica
    before = tree(target / "images")
    line = vdisk("replicate", "vm2", "-d", source.path, "--to", target).error_line()
    assert "'vm2'" in line and "written since it was replicated" in line, line
    assert tree(target / "images") == before
    assert target_disk(target, "vm2")["top"] == first["top"]


def test_refresh_is_refused_while_the_target_is_served(source: Source, target: Path,
                                                       serve_ds: Serve) -> None:
    first = replicate("vm2", "-d", source.path, "--to", target)
    serve_ds(Datastore(target))
    before = tree(target / "images")
    line = vdisk("replicate", "vm2", "-d", source.path, "--to", target).error_line()
    assert "'vm2'" in line and "served" in line, line
    assert tree(target / "images") == before
    assert target_disk(target, "vm2")["top"] == first["top"]


def test_a_missing_source_disk_is_reported_first(source: Source, target: Path) -> None:
    """``replicate nosuch vm2``: the source disk that does not exist is the error,
    not what the target would refuse of vm2."""
    first = replicate("vm2", "-d", source.path, "--to", target)
    write_layer(target / first["top"], [(62, 0, MiB)])
    line = vdisk("replicate", "nosuch", "vm2", "-d", source.path, "--to", target).error_line()
    assert "nosuch" in line and "vm2" not in line, line


def bad_target(kind: str, tmp_path: Path) -> Path:
    if kind == "non-empty-dir":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "a.txt").write_text("mine\n")
        return tmp_path / "notes"
    if kind == "file":
        (tmp_path / "file").write_text("mine\n")
        return tmp_path / "file"
    return Path("/proc/vdisk-replica")


@pytest.mark.parametrize("kind", ["non-empty-dir", "file", "proc", "written-disk"])
def test_a_refused_target_leaves_a_served_source_as_it_was(
        source: Source, tmp_path: Path, target: Path, serve_ds: Serve, kind: str) -> None:
    if kind == "written-disk":
        first = replicate("vm2", "-d", source.path, "--to", target)
        write_layer(target / first["top"], [(63, 0, MiB)])
    else:
        target = bad_target(kind, tmp_path)
    serve_ds(source.ds)
    chain_before = source.ds.disk("vm2")["chain"]
    for _ in range(2):
        res = vdisk("replicate", "vm2", "-d", source.path, "--to", target)
        res.error_line()
    assert source.ds.disk("vm2")["chain"] == chain_before      # no snapshot was taken
