"""Images are deleted only when nothing needs them, checked when they go.

A clone made from an image between the pivot that dropped it and its
deletion keeps it; a new image an unfinished job will write is nobody
else's --to; a layer QEMU would repair (its corrupt bit set) still counts
for the images below it.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

from cliharness import CLI, Datastore
from test_cli_owners import Held

from vdisk import qemu_img
from vdisk_block.chain import chain_paths


def _write(top: Path, byte: int, offset: int, length: int) -> None:
    """Through the block engine, as a server writes (the content ID stays valid)."""
    from vdisk_block import open_disk

    disk = open_disk(str(top))
    try:
        disk.write(bytes([byte]) * length, offset)
    finally:
        disk.close()


def _disk_with_delta(ds: Datastore, name: str) -> None:
    ds.create(name, "8M")
    _write(ds.top(name), 0x11, 0, 2 << 20)
    ds.vdisk("snapshot", name)
    _write(ds.top(name), 0x22, 1 << 20, 2 << 20)


def test_a_clone_of_a_dropped_top_keeps_it(datastore: Datastore, tmp_path: Path) -> None:
    ds = datastore
    _disk_with_delta(ds, "a")
    old_top = ds.disk("a")["top"]
    held = Held(tmp_path, "pivoted", "consolidate", "a", "-d", ds.path)
    try:
        held.wait_held()                  # the pivot is recorded; old_top not deleted yet
        os.kill(held.pid, signal.SIGKILL)
        held.proc.wait(30)
    finally:
        held.kill()
    assert ds.disk("a")["top"] != old_top and (ds.path / old_top).exists()
    clone = ds.json("disk", "create", "clone", "--backing", old_top)
    ds.vdisk("snapshot", "a")             # a's next owner finishes the dead pivot
    assert (ds.path / old_top).exists(), "the clone's backing file was deleted"
    assert chain_paths(str(ds.path / clone["top"]))[1] == str(ds.path / old_top)
    for info in qemu_img.info(ds.path / clone["top"], backing_chain=True):
        qemu_img.check_clean(info["filename"])
    assert ds.json("job", "list")["jobs"][0]["state"] == "done"


def test_a_new_image_an_unfinished_job_will_write_is_nobody_elses(
        datastore: Datastore, tmp_path: Path) -> None:
    ds = datastore
    _disk_with_delta(ds, "a")
    _disk_with_delta(ds, "b")
    new = ds.path / "images" / "n.qcow2"
    held = Held(tmp_path, "consolidate-start", "consolidate", "a", "-d", ds.path,
                "--to", new)
    try:
        held.wait_held()                  # journalled, n.qcow2 not made yet
        os.kill(held.pid, signal.SIGKILL)
        held.proc.wait(30)
    finally:
        held.kill()
    assert not new.exists()
    job = ds.json("job", "list", "--disk", "a")["jobs"][0]
    line = ds.vdisk("consolidate", "b", "--to", new, check=False).error_line()
    assert f"is the new image of job {job['id']}" in line, line
    ds.json("job", "cancel", str(job["id"]))
    done = ds.json("consolidate", "b", "--to", new)       # free now
    assert done["state"] == "done" and ds.disk("b")["top"] == "images/n.qcow2"
    qemu_img.check_clean(new)


def _set_corrupt_bit(path: Path) -> None:
    """QEMU's corrupt bit (incompatible bit 1): vdisk refuses the image; QEMU's
    `qemu-img check -r all` clears it."""
    with open(path, "r+b") as f:
        f.seek(72)
        bits = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", bits | 2))


def test_a_layer_vdisk_refuses_still_counts_for_the_images_below(
        datastore: Datastore) -> None:
    ds = datastore
    ds.create("a", "8M")
    frozen = ds.json("snapshot", "a")["frozen"]           # a: top -> frozen
    clone = ds.json("disk", "create", "b", "--backing", frozen)
    ds.vdisk("snapshot", "b")                             # b: top' -> b's old top -> frozen
    middle = ds.disk("b")["chain"][1]
    assert middle == clone["top"]
    _set_corrupt_bit(ds.path / middle)
    out = ds.json("disk", "remove", "a")
    assert frozen in out["kept"], out
    assert (ds.path / frozen).exists(), "b's base was deleted through its refused layer"


def test_a_consolidation_into_an_image_waits_for_a_clone_of_it_and_is_refused(
        datastore: Datastore, tmp_path: Path) -> None:
    ds = datastore
    _disk_with_delta(ds, "a")
    frozen = ds.disk("a")["chain"][1]
    held = Held(tmp_path, "clone-add", "disk", "create", "b", "--backing", frozen,
                "-d", ds.path)
    try:
        held.wait_held()                # b's image made on frozen, b not named yet
        merge = subprocess.Popen([*CLI, "consolidate", "a", "-d", str(ds.path)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            assert merge.poll() is None         # waits for the images lock
            assert held.finish().returncode == 0
            out, err = merge.communicate(timeout=60)
        finally:
            if merge.poll() is None:
                merge.kill()
                merge.wait(30)
    finally:
        held.kill()
    assert merge.returncode == 1 and "also used by disk 'b'" in err, err
    assert ds.disk("b")["chain"][1] == frozen
    qemu_img.check(ds.top("b"))
    view = tmp_path / "b.raw"
    qemu_img.convert(ds.top("b"), view, "raw")
    assert view.read_bytes()[:2 << 20] == b"\x11" * (2 << 20)   # the snapshot, unmerged
