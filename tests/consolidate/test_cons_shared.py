"""An image that another disk's chain uses is not a consolidation target.

Disk "b" is built on disk "a"'s frozen image::

    a-0 (base) <- a-1 (frozen) <- a-2 (a's top)
                     ^
                     +-------- b-0 (b's top, qemu-img create -b ../images/a-1.qcow2)

Consolidating "a" into a-1 would change what "b" reads: refused, naming "b".
Consolidating "a" --to a new image works, keeps a-1 for "b", and "b" reads
exactly what it read before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cons_control import FINAL, ControlError
from cons_datastore import (
    LayeredDisk,
    ServedDatastore,
    assert_no_orphans,
    check_chain,
    raw_view,
    read_export,
)

from vdisk import qemu_img, qemu_io


@pytest.fixture
def disk_b(disk_a: LayeredDisk, tmp_path: Path) -> LayeredDisk:
    ds = disk_a.ds
    top = ds.images / "b-0.qcow2"
    qemu_img.create(top, backing="../images/a-1.qcow2", backing_fmt="qcow2")
    qemu_io.run(top, "write -P 0x51 1M 2M", "write -P 0x52 7000k 3k")
    ds.register("b", top)
    return LayeredDisk(ds, "b", [top, *disk_a.chain[1:]],
                       raw_view(top, tmp_path / "b-initial.raw"))


def test_refuses_into_an_image_another_disk_uses(
        disk_a: LayeredDisk, disk_b: LayeredDisk,
        serve_ds: Callable[..., ServedDatastore]) -> None:
    served = serve_ds(disk_a.ds, disks=("a", "b"))
    ctl = served.client()
    before = ctl.disk("a")["chain"]
    for args in ({}, {"into": "images/a-1.qcow2"}, {"into": "images/a-1.qcow2", "pivot": False}):
        with pytest.raises(ControlError) as e:
            ctl.execute("consolidate", disk="a", **args)
        assert e.value.cls == "GenericError", e.value
        assert "'b'" in e.value.desc or " b" in e.value.desc, \
            f"the refusal should name disk b: {e.value.desc}"
        assert "a-1.qcow2" in e.value.desc, e.value.desc
    assert ctl.disk("a")["chain"] == before
    assert ctl.disk("a")["job"] is None
    jobs = ctl.execute("query-jobs", disk="a")["jobs"]
    assert all(j["state"] in FINAL for j in jobs), f"a refused job is left active: {jobs}"
    assert read_export(served.socket, "a", len(disk_a.initial)) == disk_a.initial
    assert read_export(served.socket_of("b"), "b", len(disk_b.initial)) == disk_b.initial


def test_to_a_new_image_keeps_the_shared_one(
        disk_a: LayeredDisk, disk_b: LayeredDisk, serve_ds: Callable[..., ServedDatastore],
        tmp_path: Path) -> None:
    ds = disk_a.ds
    served = serve_ds(ds, disks=("a", "b"))
    ctl = served.client()
    # b is open (served) while a is consolidated
    assert read_export(served.socket_of("b"), "b", len(disk_b.initial)) == disk_b.initial
    job = ctl.execute("consolidate", disk="a", to="images/a-new.qcow2")["job"]
    job = ctl.wait_job(job["id"], ("done",))
    assert job["state"] == "done", job
    assert "images/a-1.qcow2" not in job["dropped"], f"a-1 is b's backing file: {job}"
    assert ctl.disk("a")["chain"] == ["images/a-new.qcow2", "images/a-0.qcow2"]
    assert served.client("b").disk("b")["chain"] == ["images/b-0.qcow2", "images/a-1.qcow2",
                                      "images/a-0.qcow2"]
    assert read_export(served.socket, "a", len(disk_a.initial)) == disk_a.initial
    assert read_export(served.socket_of("b"), "b", len(disk_b.initial)) == disk_b.initial
    assert served.stop() in (0, -15), served.log()

    assert (ds.images / "a-1.qcow2").exists()
    assert not (ds.images / "a-2.qcow2").exists()
    for name, disk in (("a", disk_a), ("b", disk_b)):
        top = ds.catalog_top(name)
        check_chain(top, disk.initial, tmp_path / f"{name}.raw")
    assert_no_orphans(ds)
