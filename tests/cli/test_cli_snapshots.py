"""Named snapshots, resize and rename, offline and served, against a model.

After every revert, delete and resize the disk reads what the model says
(through NBD when served, through qemu-img otherwise), and `qemu-img check`
finds every image of the chain clean.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cliharness import Datastore, MiB, Serve, connect

from vdisk import qemu_img

SIZE = 8 * MiB


class Model:
    """The disk's guest view, written through NBD or (offline) the engine."""

    def __init__(self, ds: Datastore, name: str, size: int = SIZE) -> None:
        self.ds, self.name = ds, name
        self.data = bytearray(size)
        self.rnd = random.Random(7)

    def write(self, uri: str | None = None, n: int = 8) -> None:
        writes = []
        for _ in range(n):
            off = self.rnd.randrange(0, len(self.data) // 4096) * 4096
            data = self.rnd.randbytes(self.rnd.choice([4096, 65536, 200_000]))
            data = data[:len(self.data) - off]
            writes.append((off, data))
            self.data[off:off + len(data)] = data
        if uri is not None:
            with connect(uri) as h:
                for off, data in writes:
                    h.pwrite(data, off)
                h.flush()
        else:
            from vdisk_block import open_disk

            d = open_disk(str(self.ds.top(self.name)))
            try:
                for off, data in writes:
                    d.write(data, off)
            finally:
                d.close()

    def check(self, tmp: Path, uri: str | None = None) -> None:
        if uri is not None:
            with connect(uri) as h:
                assert h.get_size() == len(self.data)
                got = h.pread(len(self.data), 0)
            assert got == self.data
        top = self.ds.top(self.name)
        for info in qemu_img.info(top, backing_chain=True, force_share=True):
            if uri is None:
                qemu_img.check_clean(info["filename"])
            else:       # served: what the client flushed is on disk, metadata included
                result = qemu_img.check(info["filename"], force_share=True)
                assert result["corruptions"] == 0, result
        expected = tmp / f"{self.name}.raw"
        expected.write_bytes(self.data)
        qemu_img.compare(top, expected, fmt_b="raw", force_share=True)


@pytest.mark.parametrize("served", [False, True], ids=["offline", "served"])
def test_snapshots_revert_and_delete(datastore: Datastore, serve: Serve, tmp_path: Path,
                                     served: bool) -> None:
    ds = datastore
    ds.create("a", "8M")
    uri = serve(ds).uri("a") if served else None
    model = Model(ds, "a")
    model.write(uri)
    s1 = ds.json("snapshot", "a", "--name", "s1")
    at_s1 = bytes(model.data)
    model.write(uri)
    s2 = ds.json("snapshot", "a", "--name", "s2")
    unnamed = ds.json("snapshot", "a")                     # an ordinary layer, not listed
    assert unnamed["name"] is None and s1["name"] == "s1"
    at_s2 = bytes(model.data)
    model.write(uri)
    listed = ds.json("snapshot", "list", "a")["snapshots"]
    assert [(s["name"], s["image"], s["in_chain"], s["current"]) for s in listed] == \
        [("s1", s1["frozen"], True, False), ("s2", s2["frozen"], True, False)]
    ds.json("consolidate", "a")                             # merges the unnamed layer only
    assert ds.json("snapshot", "list", "a")["snapshots"][1]["current"] is True
    line = ds.vdisk("snapshot", "a", "--name", "s1", check=False).error_line()
    assert "already has a snapshot 's1'" in line

    reverted = ds.json("snapshot", "revert", "a", "s1")     # back to s1: a branch
    model.data[:] = at_s1
    model.check(tmp_path, uri)
    assert ds.json("snapshot", "list", "a")["snapshots"][1]["in_chain"] is False
    assert len(reverted["dropped"]) == 1                    # the abandoned top only
    assert unnamed["frozen"] not in ds.images()
    model.write(uri)
    # s2 sits on s1's image off the chain: merging into it is refused
    line = ds.vdisk("snapshot", "delete", "a", "s1", check=False).error_line()
    assert f"snapshot {s2['name']!r}" in line, line
    assert [s["name"] for s in ds.json("snapshot", "list", "a")["snapshots"]] == \
        ["s1", s2["name"]]
    gone = ds.json("snapshot", "delete", "a", s2["name"])  # off the chain: its image goes
    assert gone["job"] is None and gone["dropped"] == [s2["frozen"]]
    model.check(tmp_path, uri)
    deleted = ds.json("snapshot", "delete", "a", "s1")      # merged online
    assert deleted["job"]["state"] == "done"
    assert ds.json("snapshot", "list", "a")["snapshots"] == []
    assert ds.disk("a")["chain"] == [s1["frozen"]]
    model.check(tmp_path, uri)
    model.write(uri)
    model.check(tmp_path, uri)
    del at_s2


def test_revert_while_a_client_is_attached(datastore: Datastore, serve: Serve,
                                           tmp_path: Path) -> None:
    """Refused while a client is attached; with --force, allowed while the
    attached clients only read (they read the snapshot from then on), and
    refused while one has written."""
    ds = datastore
    ds.create("a", "8M")
    served = serve(ds)
    model = Model(ds, "a")
    model.write(served.uri("a"))
    ds.vdisk("snapshot", "a", "--name", "s1")
    at_s1 = bytes(model.data)
    model.write(served.uri("a"))
    with connect(served.uri("a")) as writer:
        writer.pwrite(b"\x01" * 4096, 0)
        writer.pwrite(model.data[:4096], 0)
        line = ds.vdisk("snapshot", "revert", "a", "s1", "--force", check=False).error_line()
        assert "1 client(s) writing" in line, line
    with connect(served.uri("a")) as reader:
        assert reader.pread(len(model.data), 0) == model.data
        line = ds.vdisk("snapshot", "revert", "a", "s1", check=False).error_line()
        assert "1 client(s) attached" in line and "--force" in line, line
        ds.json("snapshot", "revert", "a", "s1", "--force")
        assert reader.pread(len(at_s1), 0) == at_s1     # the same connection, reverted
    model.data[:] = at_s1
    model.check(tmp_path, served.uri("a"))


@pytest.mark.parametrize("served", [False, True], ids=["offline", "served"])
def test_resize(datastore: Datastore, serve: Serve, tmp_path: Path, served: bool) -> None:
    ds = datastore
    ds.create("a", "8M")
    srv = serve(ds) if served else None
    uri = srv.uri("a") if srv else None
    model = Model(ds, "a")
    model.write(uri)
    ds.vdisk("snapshot", "a")
    grown = ds.json("disk", "resize", "a", "24M")
    assert (grown["was"], grown["size"]) == (8 * MiB, 24 * MiB)
    model.data.extend(bytes(16 * MiB))
    model.write(uri, n=16)                      # the new space too, past the base's end
    model.check(tmp_path, uri)
    line = ds.vdisk("disk", "resize", "a", "4M", check=False).error_line()
    assert "--shrink" in line
    last = max(i for i, b in enumerate(model.data) if b) if any(model.data) else 0
    if last + 1 < len(model.data) - MiB:
        size = -(-(last + 1) // MiB) * MiB + MiB
        shrunk = ds.json("disk", "resize", "a", f"{size}", "--shrink")
        assert shrunk["size"] == size
        del model.data[size:]
        model.check(tmp_path, uri)
    line = ds.vdisk("disk", "resize", "a", "1M", "--shrink", check=False).error_line()
    assert "holds data at offset" in line and "only goes down to the data" in line


@pytest.mark.parametrize("served", [False, True], ids=["offline", "served"])
def test_snapshots_from_before_a_grow(datastore: Datastore, serve: Serve, tmp_path: Path,
                                      served: bool) -> None:
    """A revert gives the disk the snapshot's size back; deleting a snapshot
    whose image is shorter than the disk merges into it, which grows."""
    ds = datastore
    ds.create("a", "8M")
    uri = serve(ds).uri("a") if served else None
    model = Model(ds, "a")
    model.write(uri)
    ds.vdisk("snapshot", "a", "--name", "small")
    at_small = bytes(model.data)
    ds.json("disk", "resize", "a", "12M")
    model.data.extend(bytes(4 * MiB))
    model.write(uri)
    ds.vdisk("snapshot", "a", "--name", "grown")
    at_grown = bytes(model.data)
    ds.json("snapshot", "revert", "a", "small")
    model.data[:] = at_small
    assert ds.disk("a")["size"] == 8 * MiB
    model.check(tmp_path, uri)
    ds.json("snapshot", "revert", "a", "grown")
    model.data[:] = at_grown
    model.check(tmp_path, uri)
    model.write(uri)
    deleted = ds.json("snapshot", "delete", "a", "grown")      # into an image of 12M
    assert deleted["job"]["state"] == "done"
    deleted = ds.json("snapshot", "delete", "a", "small")      # into one of 8M: it grows
    assert deleted["job"]["state"] == "done"
    assert len(ds.disk("a")["chain"]) == 1 and ds.disk("a")["size"] == 12 * MiB
    model.check(tmp_path, uri)


def test_deleting_an_off_chain_snapshot_takes_the_unnamed_layers_only_it_used(
        datastore: Datastore, tmp_path: Path) -> None:
    ds = datastore
    ds.create("a", "8M")
    model = Model(ds, "a")
    model.write()
    ds.vdisk("snapshot", "a", "--name", "s1")
    at_s1 = bytes(model.data)
    model.write()
    unnamed = ds.json("snapshot", "a")["frozen"]
    model.write()
    s2 = ds.json("snapshot", "a", "--name", "s2")["frozen"]
    ds.json("snapshot", "revert", "a", "s1")        # s2 -> unnamed -> s1's image, off the chain
    gone = ds.json("snapshot", "delete", "a", "s2")
    assert sorted(gone["dropped"]) == sorted([s2, unnamed])
    assert ds.images() == sorted(Path(p).name for p in ds.disk("a")["chain"])   # no orphan
    model.data[:] = at_s1
    model.check(tmp_path)


def test_rename_offline_and_served(datastore: Datastore, serve: Serve, tmp_path: Path) -> None:
    ds = datastore
    ds.create("a", "8M")
    ds.create("b", "8M")
    model = Model(ds, "a")
    model.write()
    ds.vdisk("snapshot", "a", "--name", "s1")
    renamed = ds.json("disk", "rename", "a", "c")
    assert (renamed["disk"], renamed["was"], renamed["uri"]) == ("c", "a", None)
    line = ds.vdisk("disk", "rename", "c", "b", check=False).error_line()
    assert "disk 'b' already exists" in line
    line = ds.vdisk("disk", "rename", "c", "bad name", check=False).error_line()
    assert "invalid disk name" in line
    assert [s["name"] for s in ds.json("snapshot", "list", "c")["snapshots"]] == ["s1"]
    served = serve(ds)
    model.name = "c"
    model.check(tmp_path, served.uri("c"))
    with connect(served.uri("c")):
        line = ds.vdisk("disk", "rename", "c", "d", check=False).error_line()
        assert "client(s) attached" in line
    moved = ds.json("disk", "rename", "c", "d")
    assert moved["uri"] == served.uri("d") and not served.socket("c").exists()
    model.name = "d"
    model.check(tmp_path, served.uri("d"))
    assert served.worker("d")["state"] == "running"
