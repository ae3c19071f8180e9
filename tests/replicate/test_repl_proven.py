"""Replication links only where the chain below is proven (docs/content-id.md).

A link child -> parent is proven when the child's identity is valid and
records, as its parent ID, the parent's current valid content ID; a chain is
proven when each of its links is. An image with the right content ID whose
chain below is not proven (on the source or on the target) is no stand-in:
its base may have changed since it was copied. End to end::

    base (qemu-img: identity unknown, or qcow2 v2)  <-  mid (stamped: no parent ID)
                                                          ^        ^
                                                         t1       t2

t1 is replicated; then QEMU writes the base; t2, made on mid, is replicated:
linking to the copy of mid would leave the old base under it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cliharness import MiB, run_vdisk
from replharness import (
    Source,
    assert_chain_opens,
    assert_same_data,
    assert_totals,
    check_all,
    identity_of,
    new_datastore,
    qemu_io,
    replicate,
    target_disk,
    vdisk,
    write_layer,
)

from vdisk import qemu_img


@pytest.mark.parametrize("base_kind", ["unknown", "v2"])
def test_no_link_above_a_base_that_changed(tmp_path: Path, target: Path,
                                           base_kind: str) -> None:
    src = new_datastore(tmp_path / "src")
    images = src.path / "images"
    base, mid = images / "base.qcow2", images / "mid.qcow2"
    qemu_img.create(base, "qcow2", 64 * MiB,
                    options={"compat": "0.10" if base_kind == "v2" else "1.1"})
    qemu_io(base, "write -P 0x11 0 4M")
    qemu_img.create(mid, "qcow2", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(mid, "write -P 0x22 8M 1M")
    run_vdisk("identity", "stamp", mid)
    assert identity_of(mid)["state"] == "valid" and identity_of(mid)["parent_id"] is None

    t1 = src.path / src.json("disk", "create", "t1", "--backing", mid)["top"]
    write_layer(t1, [(3, 16 * MiB, MiB)])
    first = replicate("t1", "-d", src.path, "--to", target)
    assert [r["action"] for r in first["layers"]] == ["copied"] * 3
    assert_same_data(t1, target / first["top"])

    qemu_io(base, "write -P 0x99 0 64k")           # the base changes under mid
    t2 = src.path / src.json("disk", "create", "t2", "--backing", mid)["top"]
    write_layer(t2, [(4, 20 * MiB, MiB)])
    second = replicate("t2", "-d", src.path, "--to", target)
    top = target / target_disk(target, "t2")["top"]
    assert_chain_opens(top)
    assert_same_data(t2, top)
    # mid's link to the base is not proven: no copy of mid stands in for it
    assert [r["action"] for r in second["layers"]] == ["copied"] * 3
    assert_totals(second, target)
    check_all(target)


def test_no_link_to_a_target_image_whose_chain_is_not_proven(source: Source,
                                                             target: Path) -> None:
    """The target holds an image with mid's content ID and size, on a base of its own,
    that records no parent ID: its chain opens, but nothing proves what lies below
    it. vm3 (on mid) copies mid and base instead of linking to it."""
    from vdisk_block.create import create_qcow2

    new_datastore(target)
    mid = source.images["mid"]
    cid = bytes.fromhex(identity_of(mid)["content_id"].replace("-", ""))
    create_qcow2(str(target / "images" / "other.qcow2"), 64 * MiB)
    create_qcow2(str(target / "images" / "stand-in.qcow2"), 64 * MiB, content_id=cid,
                 backing="other.qcow2", backing_format="qcow2")
    assert identity_of(target / "images" / "stand-in.qcow2")["parent_id"] is None

    result = replicate("vm3", "-d", source.path, "--to", target)
    top = target / target_disk(target, "vm3")["top"]
    assert_same_data(source.top("vm3"), top)
    assert [r["action"] for r in result["layers"]] == ["copied"] * 3
    assert_totals(result, target)


def test_a_foreign_read_write_open_does_not_hide_a_later_base_change(
        tmp_path: Path, target: Path) -> None:
    """mid records base's ID; ``qemu-img check -r leaks`` opens it read-write
    (its identity bit is cleared), then vdisk writes it again: mid records
    base's current ID, so once base changes the chain through mid is refused,
    by the plugin's check and by replicate, instead of being linked above."""
    from vdisk_block.create import create_qcow2

    base, mid = tmp_path / "base.qcow2", tmp_path / "mid.qcow2"
    create_qcow2(str(base), 64 * MiB)
    write_layer(base, [(1, 0, 4 * MiB)])
    create_qcow2(str(mid), 64 * MiB, backing="base.qcow2", backing_format="qcow2",
                 parent_id=bytes.fromhex(identity_of(base)["content_id"].replace("-", "")))
    qemu_img.run(["check", "-q", "-r", "leaks", mid])
    assert identity_of(mid)["state"] == "unknown"
    write_layer(mid, [(2, 8 * MiB, MiB)])
    assert identity_of(mid)["parent_id"] == identity_of(base)["content_id"]

    t1 = tmp_path / "t1.qcow2"
    qemu_img.create(t1, "qcow2", backing="mid.qcow2", backing_fmt="qcow2")
    replicate(t1, "--to", target)
    write_layer(base, [(3, 0, 64 * 1024)])                 # base changes: a fresh ID
    t2 = tmp_path / "t2.qcow2"
    qemu_img.create(t2, "qcow2", backing="mid.qcow2", backing_fmt="qcow2")
    line = vdisk("replicate", t2, "--to", target).error_line()
    assert "modified since the child was created" in line and str(mid) in line, line
