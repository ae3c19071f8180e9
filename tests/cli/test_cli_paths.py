"""Image arguments: one rule, whatever the current directory.

An image of the datastore (``disk create --backing``, ``consolidate --into``
and ``--to``, ``vdisk info IMAGE -d DIR``) is given as an absolute path or
relative to the datastore, the way the CLI prints it; every path a command
prints is accepted back as printed, and an error names the path as given.
Every command here runs from a current directory that is not the datastore.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cliharness import Datastore, MiB, run_vdisk

from vdisk import qemu_img, qemu_io


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A current directory with an ``images/`` of its own, to catch paths taken
    relative to it."""
    cwd = tmp_path / "cwd"
    (cwd / "images").mkdir(parents=True)
    return cwd


def three_layers(datastore: Datastore, cwd: Path) -> list[str]:
    datastore.json("disk", "create", "vm1", "--size", "8M", cwd=cwd)
    for pattern in (1, 2):
        datastore.json("snapshot", "vm1", cwd=cwd)
        qemu_io.run(datastore.top("vm1"), f"write -P {pattern} {pattern}M 1M")
    chain: list[str] = datastore.json("disk", "info", "vm1", cwd=cwd)["chain"]
    assert len(chain) == 3 and all(not Path(p).is_absolute() for p in chain)
    return chain


def test_consolidate_to_a_new_image_relative_to_the_datastore(datastore: Datastore,
                                                              elsewhere: Path) -> None:
    chain = three_layers(datastore, elsewhere)
    job = datastore.json("consolidate", "vm1", "--to", "images/new.qcow2", cwd=elsewhere)
    assert job["state"] == "done" and job["top_after"] == "images/new.qcow2"
    assert datastore.json("disk", "info", "vm1", cwd=elsewhere)["chain"] == \
        ["images/new.qcow2", chain[2]]
    assert list((elsewhere / "images").iterdir()) == []


def test_printed_paths_are_accepted_back(datastore: Datastore, elsewhere: Path) -> None:
    chain = three_layers(datastore, elsewhere)
    # disk info prints datastore-relative paths: --into takes them
    job = datastore.json("consolidate", "vm1", "--into", chain[1], cwd=elsewhere)
    assert job["state"] == "done" and job["top_after"] == chain[1]
    # vdisk info -d prints them too, and takes them back
    layers = datastore.json("info", chain[1], cwd=elsewhere)["chain"]
    assert [layer["image"] for layer in layers] == [chain[1], chain[2]]
    # vdisk info IMAGE (no datastore) prints absolute paths: --backing takes them
    datastore.json("snapshot", "vm1", cwd=elsewhere)
    frozen = run_vdisk("info", datastore.path / chain[1], "--json", cwd=elsewhere).json()[
        "chain"][0]
    assert frozen["image"] == str(datastore.path / chain[1])
    clone = datastore.json("disk", "create", "vm2", "--backing", frozen["image"], cwd=elsewhere)
    assert clone["backing"] == chain[1]
    # and a datastore-relative one as disk info printed it
    clone = datastore.json("disk", "create", "vm3", "--backing", chain[1], cwd=elsewhere)
    assert clone["backing"] == chain[1]


@pytest.mark.parametrize("option", ["--into", "--backing"])
def test_a_missing_image_is_named_as_given(datastore: Datastore, elsewhere: Path,
                                           option: str) -> None:
    three_layers(datastore, elsewhere)
    # an image of that name in the current directory changes nothing
    qemu_img.create(elsewhere / "images" / "nonexist.qcow2", "qcow2", MiB)
    command = ["consolidate", "vm1"] if option == "--into" else ["disk", "create", "vm2"]
    result = datastore.vdisk(*command, option, "images/nonexist.qcow2", check=False,
                             cwd=elsewhere)
    assert result.returncode == 1
    assert result.error_line() == "images/nonexist.qcow2: no such image in the datastore " \
        f"{datastore.path}"


def test_an_image_of_the_chain_given_relative_to_the_current_directory(
        datastore: Datastore, tmp_path: Path) -> None:
    chain = three_layers(datastore, tmp_path)
    given = str(Path(datastore.path.name) / chain[1])      # ds/images/..., from its parent
    result = datastore.vdisk("consolidate", "vm1", "--into", given, check=False,
                             cwd=datastore.path.parent)
    assert result.error_line() == f"{given}: no such image in the datastore {datastore.path}"
    assert datastore.disk("vm1")["chain"] == chain


def test_paths_outside_the_datastore(datastore: Datastore, elsewhere: Path) -> None:
    three_layers(datastore, elsewhere)
    for given in ("../outside.qcow2", str(elsewhere / "images" / "new.qcow2")):
        result = datastore.vdisk("consolidate", "vm1", "--to", given, check=False,
                                 cwd=elsewhere)
        assert result.returncode == 1
        assert result.error_line() == f"{given} is outside the datastore {datastore.path}"
    assert list((elsewhere / "images").iterdir()) == []
    assert not (datastore.path.parent / "outside.qcow2").exists()


def test_the_command_an_error_suggests_works_as_printed(datastore: Datastore,
                                                        elsewhere: Path) -> None:
    """A clone of an image with no content ID: the error says how to give it one."""
    bare = datastore.path / "images" / "bare.qcow2"
    qemu_img.create(bare, "qcow2", MiB)
    result = datastore.vdisk("disk", "create", "vm1", "--backing", "images/bare.qcow2",
                             check=False, cwd=elsewhere)
    hint = re.search(r"'(vdisk [^']+)'", result.error_line())
    assert hint is not None, result.error_line()
    run_vdisk(*shlex.split(hint.group(1))[1:], cwd=elsewhere)
    clone = datastore.json("disk", "create", "vm1", "--backing", "images/bare.qcow2",
                           cwd=elsewhere)
    assert clone["backing"] == "images/bare.qcow2"


def test_a_datastore_named_through_a_symlink(datastore: Datastore, tmp_path: Path) -> None:
    link = Datastore(tmp_path / "link")
    link.path.symlink_to(datastore.path)
    chain = three_layers(link, tmp_path)
    for backing in (chain[1], str(datastore.path / chain[1]), str(link.path / chain[1])):
        name = f"clone{len(link.json('disk', 'list')['disks'])}"
        clone = link.json("disk", "create", name, "--backing", backing)
        assert clone["backing"] == chain[1]
        assert link.json("disk", "info", name)["chain"][1] == chain[1]
    job = link.json("consolidate", "vm1", "--to", str(datastore.path / "images/new.qcow2"))
    assert job["top_after"] == "images/new.qcow2"
