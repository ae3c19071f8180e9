"""``vdisk disk remove``: each disk depends on its own chain only."""

from __future__ import annotations

import pytest
from cliharness import Datastore


def _broken(ds: Datastore, name: str) -> str:
    """A disk whose chain cannot be opened: its backing file is gone."""
    ds.create(name, "16M")
    ds.vdisk("snapshot", name)
    chain = ds.json("disk", "info", name)["chain"]
    (ds.path / chain[1]).unlink()
    return chain[0]


def test_a_broken_disk_does_not_block_removing_another(datastore: Datastore) -> None:
    ds = datastore
    good_top = ds.create("good", "16M")
    _broken(ds, "broken")
    out = ds.json("disk", "remove", "good")
    assert out["deleted"] == [good_top] and out["kept"] == []
    assert not (ds.path / good_top).exists()
    assert [d["name"] for d in ds.json("disk", "list")["disks"]] == ["broken"]


@pytest.mark.parametrize("keep", [False, True])
def test_a_broken_disk_can_be_removed(datastore: Datastore, keep: bool) -> None:
    ds = datastore
    top = _broken(ds, "broken")
    ds.create("other", "16M")
    out = ds.json("disk", "remove", "broken", *(["--keep-images"] if keep else []))
    assert out["deleted"] == ([] if keep else [top])
    assert (ds.path / top).exists() == keep
    assert [d["name"] for d in ds.json("disk", "list")["disks"]] == ["other"]


def test_a_shared_base_stays_while_another_disk_uses_it(datastore: Datastore) -> None:
    ds = datastore
    ds.create("a", "16M")
    frozen = ds.json("snapshot", "a")["frozen"]
    ds.json("disk", "create", "clone", "--backing", frozen)
    out = ds.json("disk", "remove", "a")
    assert frozen in out["kept"] and len(out["deleted"]) == 1
    assert ds.json("disk", "info", "clone")["chain"][1] == frozen
