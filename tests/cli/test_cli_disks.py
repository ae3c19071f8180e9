"""``vdisk datastore init`` and ``vdisk disk create|import|list|info|remove``, offline."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cliharness import CLI, Datastore, MiB, Result, chain_length, run_vdisk

from vdisk import qemu_img, qemu_io

PiB = 1 << 50


def test_datastore_init_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "new"
    first = run_vdisk("datastore", "init", path, "--json").json()
    assert first == {"datastore": str(path), "created": True}
    assert (path / "vdisk.db").exists() and (path / "images").is_dir()
    second = run_vdisk("datastore", "init", path).stdout
    assert "already a datastore" in second


def test_disk_create(datastore: Datastore) -> None:
    out = datastore.json("disk", "create", "vm1", "--size", "1G")
    assert out["disk"] == "vm1" and out["size"] == 1 << 30
    top = datastore.path / out["top"]
    info = qemu_img.info(top)
    assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 30
    qemu_img.check_clean(top, allow_leaks=False)
    assert not [n for n in datastore.images() if n.startswith(".")]

    human = datastore.vdisk("disk", "create", "vm2", "--size", "512M").stdout
    assert human.startswith("created disk vm2 (512.0 MiB)")


@pytest.mark.parametrize("size", ["4P", "3P", "100P", "8E", "99999999999E", "2049T"])
def test_disk_create_refuses_sizes_no_image_can_have(datastore: Datastore, size: str) -> None:
    """qemu-img 7.2 creates 2 PiB with 64 KiB clusters and refuses 512 bytes more."""
    result = datastore.vdisk("disk", "create", "big", "--size", size, check=False)
    assert result.returncode == 1
    assert result.error_line().endswith(
        "is too large: a qcow2 image with 64.0 KiB clusters holds at most 2.0 PiB "
        f"({2 * PiB} bytes)")
    assert datastore.images() == [] and datastore.json("disk", "list")["disks"] == []


@pytest.mark.parametrize("size", ["1e5", "0x100", "-1G", "0", "1.1k", "1G1", "9" * 40, "1 G B",
                                  "nan", "inf", "1.5", "9" * 400 + ".5G"],
                         ids=lambda s: s[:12])
def test_disk_create_refuses_sizes_it_cannot_read(datastore: Datastore, size: str) -> None:
    result = datastore.vdisk("disk", "create", "bad", f"--size={size}", check=False)
    assert result.returncode == 2
    assert result.error_line().startswith(f"argument --size: invalid size {size!r}")


def test_disk_create_of_the_largest_size(datastore: Datastore) -> None:
    out = datastore.json("disk", "create", "big", "--size", "2P")
    top = datastore.path / out["top"]
    assert qemu_img.info(top)["virtual-size"] == 2 * PiB
    qemu_img.check_clean(top, allow_leaks=False)


@pytest.mark.parametrize("name", ["a\nb", "a b", ".hidden", "x" * 65, "vm/1", "vm?export=x",
                                  "\u00e9t\u00e9"])
def test_disk_names_are_checked(datastore: Datastore, tmp_path: Path, name: str) -> None:
    image = tmp_path / "src.qcow2"
    qemu_img.create(image, "qcow2", MiB)
    for command in (["disk", "create", name, "--size", "1M"], ["disk", "import", name, image]):
        result = datastore.vdisk(*command, check=False)
        assert result.returncode == 1
        assert result.error_line().endswith(
            f"invalid disk name {name!r}: use letters, digits, '.', '_', '-' and '+', "
            "at most 64 characters, not starting with '-' or '.'")
    assert datastore.images() == []
    assert datastore.json("disk", "create", "Vm_1.2+b-3", "--size", "1M")["disk"] == "Vm_1.2+b-3"


def add_old_disk(ds: Path, name: str) -> str:
    """A disk an older vdisk made, whose name the current rule refuses."""
    rel = "images/old.qcow2"
    qemu_img.create(ds / rel, "qcow2", MiB)
    with sqlite3.connect(ds / "vdisk.db") as db:
        db.execute("INSERT INTO disks VALUES (?, ?, 0)", (name, rel))
    db.close()
    return rel


def test_disks_with_old_style_names_stay_usable(datastore: Datastore) -> None:
    rel = add_old_disk(datastore.path, "old disk")
    assert datastore.disk("old disk")["chain"] == [rel]
    datastore.vdisk("snapshot", "old disk")
    assert len(datastore.disk("old disk")["chain"]) == 2


def test_a_newer_catalog_format_is_refused(datastore: Datastore) -> None:
    with sqlite3.connect(datastore.path / "vdisk.db") as db:
        db.execute("UPDATE meta SET value = '2' WHERE key = 'format'")
    db.close()
    result = datastore.vdisk("disk", "list", check=False)
    assert result.returncode == 1
    assert result.error_line().endswith("catalog format 2 is newer than this vdisk reads "
                                        "(format 1); upgrade vdisk")


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE disks (name TEXT PRIMARY KEY, top TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, disk TEXT NOT NULL,
    kind TEXT NOT NULL, state TEXT NOT NULL, target TEXT,
    new_image INTEGER NOT NULL DEFAULT 0, collapse INTEGER, top_before TEXT,
    top_after TEXT, dropped TEXT NOT NULL DEFAULT '[]', stats TEXT NOT NULL DEFAULT '{}',
    error TEXT, started REAL NOT NULL, updated REAL NOT NULL);
INSERT INTO meta VALUES ('format', '1');
"""


@pytest.fixture
def old_datastore() -> Iterator[Path]:
    """A datastore an older vdisk made (jobs without target_id), in a directory
    another user may enter."""
    top = Path(tempfile.mkdtemp(prefix="vdisk-ro-"))
    top.chmod(0o755)
    ds = top / "ds"
    (ds / "images").mkdir(parents=True)
    with sqlite3.connect(ds / "vdisk.db") as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(OLD_SCHEMA)
    db.close()
    add_old_disk(ds, "vm1")
    try:
        yield ds
    finally:
        for p in (ds, ds / "images"):
            p.chmod(0o755)
        shutil.rmtree(top)


def run_as_reader(ds: Path, *args: str) -> Result:
    """vdisk as a user who cannot write ds: another user when we are root."""
    for p in (ds, ds / "images"):
        p.chmod(0o555)
    (ds / "vdisk.db").chmod(0o444)
    become = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.geteuid() == 0 else []
    cp = subprocess.run([*become, *CLI, *args, "-d", str(ds)], stdin=subprocess.DEVNULL,
                        capture_output=True, text=True, timeout=60, check=False)
    return Result(cp.returncode, cp.stdout, cp.stderr)


def jobs_columns(ds: Path) -> set[str]:
    with sqlite3.connect(ds / "vdisk.db") as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    db.close()
    return columns


def test_a_writer_adds_the_columns_an_old_datastore_lacks(old_datastore: Path) -> None:
    assert "target_id" not in jobs_columns(old_datastore)
    run_vdisk("disk", "list", "-d", old_datastore)
    assert "target_id" in jobs_columns(old_datastore)


def test_a_read_only_datastore_can_be_looked_at(old_datastore: Path) -> None:
    """Its schema is older (jobs without target_id): adding the column waits for
    a writer."""
    listed = run_as_reader(old_datastore, "disk", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [d["name"] for d in listed.json()["disks"]] == ["vm1"]
    info = run_as_reader(old_datastore, "disk", "info", "vm1", "--json")
    assert info.returncode == 0 and info.json()["chain"] == ["images/old.qcow2"], info.stderr
    assert "target_id" not in jobs_columns(old_datastore)


def test_disk_list_and_info(datastore: Datastore) -> None:
    assert datastore.json("disk", "list") == {"datastore": str(datastore.path),
                                              "served": False, "disks": []}
    assert datastore.vdisk("disk", "list").stdout.strip() == "no disks"
    datastore.create("b", "16M")
    datastore.create("a", "32M")
    listed = datastore.json("disk", "list")["disks"]
    assert [(d["name"], d["size"], d["open"], d["job"]) for d in listed] == \
        [("a", 32 * MiB, False, None), ("b", 16 * MiB, False, None)]

    info = datastore.disk("a")
    assert info["name"] == "a" and info["size"] == 32 * MiB and info["served"] is False
    assert info["chain"] == [info["top"]]
    assert [layer["image"] for layer in info["layers"]] == info["chain"]
    assert info["layers"][0]["format"] == "qcow2"
    human = datastore.vdisk("disk", "info", "a").stdout
    assert info["top"] in human and "job: none" in human


def test_disk_list_shows_a_broken_chain_beside_the_others(datastore: Datastore) -> None:
    datastore.create("a", "16M")
    datastore.create("b", "16M")
    datastore.vdisk("snapshot", "b")
    frozen = datastore.path / datastore.disk("b")["chain"][1]
    frozen.unlink()
    listed = {d["name"]: d for d in datastore.json("disk", "list")["disks"]}
    assert listed["a"]["error"] is None and listed["a"]["size"] == 16 * MiB
    assert listed["b"]["chain"] == [] and listed["b"]["size"] is None
    assert f"backing file {frozen} not found" in listed["b"]["error"]
    human = datastore.vdisk("disk", "list").stdout
    assert "(error: " in human and human.count("\n") == 3
    r = run_vdisk("disk", "info", "b", "-d", datastore.path, check=False)
    assert r.returncode == 1 and "not found" in r.stderr


@pytest.fixture
def source_chain(tmp_path: Path) -> Path:
    """raw base <- qcow2 mid <- qcow2 top, each with its own data, a zeroed range on top."""
    src = tmp_path / "src"
    src.mkdir()
    qemu_img.create(src / "base.raw", "raw", 8 * MiB)
    qemu_io.run(src / "base.raw", "write -P 0x11 0 2M", fmt="raw")
    qemu_img.create(src / "mid.qcow2", backing="base.raw", backing_fmt="raw")
    qemu_io.run(src / "mid.qcow2", "write -P 0x22 1M 2M")
    qemu_img.create(src / "top.qcow2", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io.run(src / "top.qcow2", "write -z 0 512k", "write -P 0x33 4M 64k")
    return src / "top.qcow2"


def test_disk_import_keeps_the_chain(datastore: Datastore, source_chain: Path) -> None:
    out = datastore.json("disk", "import", "vm1", source_chain)
    assert out["flattened"] is False and len(out["chain"]) == 3
    layers = qemu_img.info(datastore.path / out["top"], backing_chain=True)
    assert [layer["format"] for layer in layers] == ["qcow2"] * 3
    # backing names are relative, as qemu-img writes them
    assert [layer.get("backing-filename") for layer in layers] == \
        [Path(out["chain"][1]).name, Path(out["chain"][2]).name, None]
    qemu_img.compare(datastore.path / out["top"], source_chain)
    # each layer holds only its own clusters: the top maps the zeroed range and 4M
    top_extents = [e for e in qemu_img.map(datastore.path / out["top"]) if e["depth"] == 0]
    assert {e["start"] for e in top_extents if e["present"]} == {0, 4 * MiB}
    for image in out["chain"]:
        qemu_img.check_clean(datastore.path / image, allow_leaks=False)
    assert datastore.disk("vm1")["chain"] == out["chain"]
    assert not [n for n in datastore.images() if n.startswith(".")]


def test_disk_import_flatten(datastore: Datastore, source_chain: Path) -> None:
    out = datastore.json("disk", "import", "vm1", source_chain, "--flatten")
    assert out["flattened"] is True and out["chain"] == [out["top"]]
    top = datastore.path / out["top"]
    assert chain_length(top) == 1
    qemu_img.compare(top, source_chain)


def test_disk_import_of_a_raw_image(datastore: Datastore, tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    qemu_img.create(raw, "raw", 4 * MiB)
    qemu_io.run(raw, "write -P 0x5a 1M 1M", fmt="raw")
    out = datastore.json("disk", "import", "vm1", raw)
    assert qemu_img.info(datastore.path / out["top"])["format"] == "qcow2"
    qemu_img.compare(datastore.path / out["top"], raw)


def test_failed_import_leaves_nothing(datastore: Datastore, tmp_path: Path) -> None:
    bad = tmp_path / "broken.qcow2"
    qemu_img.run(["create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2",
                  bad, str(MiB)])
    result = datastore.vdisk("disk", "import", "vm1", bad, check=False)
    assert result.returncode == 1 and "missing.qcow2" in result.error_line()
    assert datastore.images() == []
    assert datastore.json("disk", "list")["disks"] == []


def test_disk_remove(datastore: Datastore) -> None:
    datastore.create("vm1")
    datastore.vdisk("snapshot", "vm1")
    assert len(datastore.images()) == 2
    out = datastore.json("disk", "remove", "vm1")
    assert out["disk"] == "vm1" and len(out["deleted"]) == 2 and out["kept"] == []
    assert datastore.images() == []
    assert datastore.json("disk", "list")["disks"] == []


def test_disk_remove_keep_images(datastore: Datastore) -> None:
    top = datastore.create("vm1")
    out = datastore.json("disk", "remove", "vm1", "--keep-images")
    assert out["kept"] == [top] and out["deleted"] == []
    assert (datastore.path / top).exists()
    assert datastore.json("disk", "list")["disks"] == []


def share_base(datastore: Datastore) -> tuple[str, str]:
    """Disk 'clone' on top of disk 'golden''s image; returns (golden top, clone top)."""
    import vdisk_block.catalog as catalog_mod

    golden = datastore.create("golden", "8M")
    clone = "images/clone-0.qcow2"
    qemu_img.create(datastore.path / clone, backing=Path(golden).name, backing_fmt="qcow2")
    c = catalog_mod.Catalog(str(datastore.path))
    try:
        c.add_disk("clone", clone)
    finally:
        c.close()
    return golden, clone


def test_disk_remove_keeps_images_other_disks_use(datastore: Datastore) -> None:
    golden, clone = share_base(datastore)
    out = datastore.json("disk", "remove", "clone")
    assert out["deleted"] == [clone] and out["kept"] == [golden]
    assert (datastore.path / golden).exists()
    out = datastore.json("disk", "remove", "golden")
    assert out["deleted"] == [golden]


def test_disk_remove_of_a_shared_base_keeps_it(datastore: Datastore) -> None:
    golden, clone = share_base(datastore)
    out = datastore.json("disk", "remove", "golden")
    assert out["deleted"] == [] and out["kept"] == [golden]
    assert qemu_img.info(datastore.path / clone, backing_chain=True)[1]["format"] == "qcow2"


def test_consolidating_into_a_shared_base_is_refused(datastore: Datastore,
                                                     tmp_path: Path) -> None:
    golden, clone = share_base(datastore)
    golden_copy = tmp_path / "golden.raw"
    qemu_img.convert(datastore.path / golden, golden_copy)
    qemu_io.run(datastore.path / clone, "write -P 0x77 0 1M")
    result = datastore.vdisk("consolidate", "clone", check=False)
    assert result.returncode == 1
    assert "also used by disk 'golden'" in result.error_line()

    datastore.vdisk("snapshot", "clone")
    qemu_io.run(datastore.top("clone"), "write -P 0x78 1M 1M")
    result = datastore.vdisk("consolidate", "clone", "--into", golden, check=False)
    assert "also used by disk 'golden'" in result.error_line()
    # --to a new image on the shared base collapses the clone's own layers only
    expected = tmp_path / "clone.raw"
    qemu_img.convert(datastore.top("clone"), expected)
    new = datastore.path / "images" / "clone-new.qcow2"
    out = datastore.json("consolidate", "clone", "--to", new)
    assert out["state"] == "done" and out["top_after"] == "images/clone-new.qcow2"
    assert datastore.disk("clone")["chain"] == ["images/clone-new.qcow2", golden]
    qemu_img.compare(new, expected)
    qemu_img.compare(datastore.path / golden, golden_copy)
    assert datastore.disk("golden")["chain"] == [golden]


@contextlib.contextmanager
def qemu_nbd_writing(image: Path, sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-nbd serving ``image`` read-write (holding QEMU's write lock) until the
    block ends; stopped by its pid."""
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(image)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "qemu-nbd did not listen within 30 s"
            time.sleep(0.05)
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(15)


@pytest.mark.parametrize("flatten", [False, True])
def test_disk_import_honours_qemus_lock(datastore: Datastore, source_chain: Path,
                                        tmp_path: Path, flatten: bool) -> None:
    extra = ["--flatten"] if flatten else []
    with qemu_nbd_writing(source_chain, tmp_path / "nbd.sock"):
        result = datastore.vdisk("disk", "import", "vm1", source_chain, *extra, check=False)
        assert result.returncode == 1
        assert result.error_line() == (
            f"{source_chain} is in use: another process holds the \"write\" permission "
            "(QEMU's image lock); stop that process first, or copy the image anyway with "
            "--force-share")
        assert datastore.images() == [] and datastore.json("disk", "list")["disks"] == []
        out = datastore.json("disk", "import", "vm1", source_chain, "--force-share", *extra)
        assert out["disk"] == "vm1"
    qemu_img.compare(datastore.path / out["top"], source_chain)


def test_disk_import_of_a_chain_whose_base_qemu_writes(datastore: Datastore,
                                                        source_chain: Path,
                                                        tmp_path: Path) -> None:
    mid = source_chain.parent / "mid.qcow2"
    with qemu_nbd_writing(mid, tmp_path / "nbd.sock"):
        result = datastore.vdisk("disk", "import", "vm1", source_chain, check=False)
        assert result.error_line().startswith(f"{mid} is in use: ")
    assert datastore.images() == []
