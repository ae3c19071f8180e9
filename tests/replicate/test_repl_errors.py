"""What ``vdisk replicate``, ``vdisk identity stamp`` and ``vdisk disk create --backing``
refuse: one line on stderr, a non-zero exit, and nothing written on the target."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from replharness import (
    Source,
    assert_chain_intact,
    assert_same_data,
    content_id,
    identity_of,
    qemu_io,
    tree,
    vdisk,
)

from vdisk import qemu_img


def refused(*args: str | Path) -> str:
    """Run ``vdisk replicate ARGS``; it must fail with one line. Returns the line."""
    return vdisk("replicate", *args).error_line()


# --- replicate ----------------------------------------------------------------------------


def test_missing_disk(source: Source, target: Path) -> None:
    line = refused("nosuch", "-d", source.path, "--to", target)
    assert "nosuch" in line
    assert not target.exists()


def test_missing_image(tmp_path: Path, target: Path) -> None:
    line = refused(tmp_path / "nosuch.qcow2", "--to", target)
    assert "nosuch.qcow2" in line
    assert not target.exists()


def test_missing_source_datastore(tmp_path: Path, target: Path) -> None:
    line = refused("vm1", "-d", tmp_path / "nosuch", "--to", target)
    assert "nosuch" in line
    assert not target.exists()


def test_non_empty_directory_that_is_no_datastore(source: Source, target: Path) -> None:
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    before = tree(target)
    line = refused("vm1", "-d", source.path, "--to", target)
    assert "not a vdisk datastore" in line
    assert tree(target) == before


def test_onto_the_source_datastore(source: Source) -> None:
    before = tree(source.path / "images")
    line = refused("vm1", "-d", source.path, "--to", source.path)
    assert "source datastore" in line
    assert tree(source.path / "images") == before


def test_image_onto_its_own_datastore(source: Source) -> None:
    """IMAGE form: the image lives in the target datastore, which is then the source."""
    before = tree(source.path / "images")
    line = refused(source.images["vm1"], "--to", source.path)
    assert "source datastore" in line
    assert tree(source.path / "images") == before


@pytest.mark.parametrize("name", ["bad/name", ".hidden"])
def test_invalid_disk_name(source: Source, target: Path, name: str) -> None:
    line = refused("vm2", "-d", source.path, "--to", target, "--name", name)
    assert "invalid disk name" in line
    assert not target.exists()


def test_name_without_disk(source: Source, target: Path) -> None:
    line = refused(source.images["vm1"], "--to", target, "--name", "x")
    assert "--name" in line
    assert not target.exists()


def test_modified_parent_writes_nothing_on_target(source: Source, target: Path) -> None:
    qemu_io(source.images["mid"], "write -P 0x66 12M 64k")
    line = refused("vm3", "-d", source.path, "--to", target)
    assert "modified since the child was created" in line
    assert not target.exists()


# --- identity stamp -------------------------------------------------------------------------


def test_stamp_refuses_a_valid_identity(source: Source) -> None:
    before = tree(source.path / "images")
    line = vdisk("identity", "stamp", source.images["base"]).error_line()
    assert "already has a valid content ID" in line
    assert content_id(source.images["base"]) in line
    assert tree(source.path / "images") == before


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "on-backing"])
def test_stamp_gives_an_unknown_image_an_identity(source: Source, tmp_path: Path,
                                                  backing: bool) -> None:
    image = source.path / "images" / "foreign.qcow2"
    if backing:
        qemu_img.create(image, "qcow2", backing=source.images["base"].name, backing_fmt="qcow2")
    else:
        qemu_img.create(image, "qcow2", 64 << 20)
    qemu_io(image, "write -P 0x21 1M 1M", "write -P 0x22 30M 64k")
    assert identity_of(image)["state"] == "unknown"
    reference = tmp_path / "before.raw"
    qemu_img.convert(image, reference)

    res = vdisk("identity", "stamp", image, "--json")
    assert res.returncode == 0, res.stderr
    out = res.json()
    assert out["state"] == "valid" and out["content_id"] == content_id(image)
    assert out["parent_id"] == (content_id(source.images["base"]) if backing else None)
    qemu_img.check_clean(image)
    assert qemu_img.info(image).get("backing-filename") == \
        (source.images["base"].name if backing else None)
    assert_same_data(reference, image)
    if backing:
        assert_chain_intact(image)
    assert "already has a valid content ID" in vdisk("identity", "stamp", image).error_line()


def test_stamp_of_a_missing_image(tmp_path: Path) -> None:
    assert "no such image" in vdisk("identity", "stamp", tmp_path / "nosuch.qcow2").error_line()


# --- disk create --backing --------------------------------------------------------------------


def test_clone_of_a_disk_top_is_refused(source: Source) -> None:
    before = tree(source.path / "images")
    res = vdisk("disk", "create", "clone", "-d", source.path, "--backing", source.top("vm1"))
    line = res.error_line()
    assert "top of disk 'vm1'" in line
    assert tree(source.path / "images") == before


def test_clone_of_an_unknown_identity_names_stamp(source: Source) -> None:
    image = source.path / "images" / "foreign.qcow2"
    qemu_img.create(image, "qcow2", 64 << 20)
    before = tree(source.path / "images")
    res = vdisk("disk", "create", "clone", "-d", source.path, "--backing", image)
    assert "vdisk identity stamp" in res.error_line()
    assert tree(source.path / "images") == before
    # once stamped, the clone is made
    assert vdisk("identity", "stamp", image).returncode == 0
    made = vdisk("disk", "create", "clone", "-d", source.path, "--backing", image, "--json")
    assert made.returncode == 0, made.stderr
    assert_chain_intact(source.path / made.json()["top"])


def test_clone_of_an_image_outside_the_datastore(source: Source, tmp_path: Path) -> None:
    outside = tmp_path / "outside.qcow2"
    shutil.copy(source.images["base"], outside)
    before = tree(source.path / "images")
    res = vdisk("disk", "create", "clone", "-d", source.path, "--backing", outside)
    assert res.returncode != 0 and len(res.stderr.splitlines()) == 1
    assert tree(source.path / "images") == before
