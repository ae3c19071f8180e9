"""Content identity decides what a replicate may link to, and what a chain may open.

- a target image someone else wrote (its identity bit cleared by qemu-io) is
  never linked to; the layer is copied again, to a new file;
- an image with the right content ID but another virtual size is not linked;
- an image whose own chain below is no longer intact is no stand-in either;
- a source chain whose parent changed after its child was created is refused
  by replicate and by the plugin, and reported (exit 0) by ``vdisk info``.
"""

from __future__ import annotations

from pathlib import Path

import nbd
import pytest
from cliharness import Serve, connect
from nbdharness import ServerFactory
from replharness import (
    MiB,
    Source,
    assert_chain_intact,
    assert_same_data,
    assert_totals,
    check_all,
    content_id,
    identity_of,
    info,
    new_datastore,
    qemu_io,
    replicate,
    target_disk,
    tree,
    vdisk,
    visible_images,
)

from vdisk.errors import NbdkitError

MODIFIED = "modified since the child was created"


def test_invalidated_target_base_is_copied_again(source: Source, target: Path) -> None:
    first = replicate("vm1", "-d", source.path, "--to", target)
    old_base = target / first["layers"][-1]["image"]
    qemu_io(old_base, "write -P 0x99 10M 64k")
    assert identity_of(old_base)["state"] == "unknown"
    before = tree(target)[str(old_base.relative_to(target))]

    result = replicate("vm2", "-d", source.path, "--to", target)
    assert [(r["source"], r["action"]) for r in result["layers"]] == \
        [(str(source.images["vm2"]), "copied"), (str(source.images["base"]), "copied")]
    new_base = target / result["layers"][1]["image"]
    assert new_base != old_base and new_base.exists()
    assert content_id(new_base) == content_id(source.images["base"])
    assert tree(target)[str(old_base.relative_to(target))] == before     # left alone
    assert_totals(result, target)
    top = target / target_disk(target, "vm2")["top"]
    assert_same_data(source.top("vm2"), top)
    assert_chain_intact(top)
    check_all(target)


@pytest.mark.parametrize("damage", ["base-written", "base-removed"])
def test_no_link_to_an_image_whose_own_chain_is_broken(source: Source, target: Path,
                                                       damage: str) -> None:
    """vm3 shares mid with vm1. On the target, mid's copy is intact, but the base copy
    below it was written by qemu-io (or removed): linking vm3 to that mid would give
    a disk that reads other data and that vdisk refuses to open."""
    first = replicate("vm1", "-d", source.path, "--to", target)
    target_base = target / first["layers"][-1]["image"]
    if damage == "base-written":
        qemu_io(target_base, "write -P 0x99 10M 64k")     # not covered by mid nor vm3
    else:
        target_base.unlink()

    result = replicate("vm3", "-d", source.path, "--to", target)
    assert_totals(result, target)
    top = target / result["top"]            # (disk list fails on vm1's broken chain)
    assert_same_data(source.top("vm3"), top)
    assert_chain_intact(top)


def test_verify_never_leaves_a_disk_that_differs(source: Source, target: Path) -> None:
    """With --verify, a disk appears on the target only if it reads as its source:
    either the replicate succeeds with the right data, or it fails and adds no disk."""
    first = replicate("vm1", "-d", source.path, "--to", target)
    qemu_io(target / first["layers"][-1]["image"], "write -P 0x99 10M 64k")
    res = vdisk("replicate", "vm3", "-d", source.path, "--to", target, "--verify", "--json")
    listed = [d["name"] for d in vdisk("disk", "list", "-d", target, "--json").json()["disks"]]
    if res.returncode != 0:
        res.error_line()
        assert "vm3" not in listed, f"replicate failed ({res.stderr.strip()}) but added vm3"
    else:
        assert res.json()["verified"] is True
        assert_same_data(source.top("vm3"), target / target_disk(target, "vm3")["top"])


def test_same_content_id_other_size_is_not_linked(source: Source, target: Path) -> None:
    from vdisk_block.create import create_qcow2
    from vdisk_block.identity import ID_BYTES

    new_datastore(target)
    base = source.images["base"]
    cid = bytes.fromhex(content_id(base).replace("-", ""))      # type: ignore[union-attr]
    assert len(cid) == ID_BYTES
    # the same content ID, half the size, under the very name the copy would take
    fake = target / "images" / base.name
    create_qcow2(str(fake), 32 * MiB, content_id=cid)
    assert content_id(fake) == content_id(base)
    before = tree(target / "images")

    result = replicate("vm2", "-d", source.path, "--to", target)
    assert [r["action"] for r in result["layers"]] == ["copied", "copied"]
    copy = target / result["layers"][1]["image"]
    assert copy != fake and content_id(copy) == content_id(base)
    assert tree(target / "images")[base.name] == before[base.name]
    assert_totals(result, target)
    top = target / target_disk(target, "vm2")["top"]
    assert_same_data(source.top("vm2"), top)
    assert_chain_intact(top)
    assert [p for p in visible_images(target) if p.name == base.name] == [fake]


# --- a parent modified in the source ---------------------------------------------------------


def modify_mid(source: Source) -> None:
    qemu_io(source.images["mid"], "write -P 0x66 12M 64k")
    assert identity_of(source.images["mid"])["state"] == "unknown"


def test_info_reports_a_modified_parent(source: Source) -> None:
    modify_mid(source)
    res = vdisk("info", source.images["vm3"], "--json")
    assert res.returncode == 0, res.stderr
    chain = res.json()["chain"]
    assert [Path(c["image"]) for c in chain] == \
        [source.images["vm3"], source.images["mid"], source.images["base"]]
    assert chain[0]["state"] == "valid" and chain[1]["state"] == "unknown"
    assert chain[0]["link"] != "ok" and "modified" in chain[0]["link"]
    text = vdisk("info", source.images["vm3"])
    assert text.returncode == 0 and "modified" in text.stdout


def test_info_link_says_modified_since_the_child_was_created(source: Source) -> None:
    """The link field uses the words of the error that opening the chain gives."""
    modify_mid(source)
    chain = info(source.images["vm3"])["chain"]
    assert MODIFIED in chain[0]["link"], chain[0]["link"]


@pytest.mark.parametrize("form", ["disk", "image"])
def test_replicate_refuses_a_modified_parent(source: Source, target: Path, form: str) -> None:
    modify_mid(source)
    args = ("vm3", "-d", source.path) if form == "disk" else (source.images["vm3"],)
    res = vdisk("replicate", *args, "--to", target)
    line = res.error_line()
    assert MODIFIED in line and str(source.images["mid"]) in line
    assert not visible_images(target)


def test_plugin_refuses_a_modified_parent(source: Source, serve: ServerFactory) -> None:
    modify_mid(source)
    with pytest.raises(NbdkitError) as exc:
        serve(source.images["vm3"])
    assert MODIFIED in str(exc.value)


def test_served_datastore_refuses_the_disk_with_a_modified_parent(
        source: Source, serve_ds: Serve) -> None:
    modify_mid(source)
    served = serve_ds(source.ds)
    with pytest.raises(nbd.Error), connect(served.uri("vm3")):
        pass
    with connect(served.uri("vm2")) as h:               # vm2 does not go through mid
        assert h.get_size() == 64 * MiB
    assert MODIFIED in (source.path / "serve.stderr").read_text()
