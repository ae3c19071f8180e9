"""``vdisk snapshot|consolidate|job|backup`` on a datastore that is not served.

The commands run the datastore's service in their own process on the files;
the data is checked with qemu-io patterns and ``qemu-img compare``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cliharness import Datastore, MiB, chain_length

from vdisk import qemu_img, qemu_io

JOB_FIELDS = {"id", "state", "copy_set_bytes", "bytes_copied", "bytes_mirrored", "passes",
              "duration_s", "pivot_pause_ms", "top_before", "top_after"}


def test_snapshot_then_consolidate(datastore: Datastore, tmp_path: Path) -> None:
    base = datastore.create("vm1", "16M")
    qemu_io.run(datastore.path / base, "write -P 0x01 0 4M")
    snap = datastore.json("snapshot", "vm1")
    assert snap["disk"] == "vm1" and snap["frozen"] == base and snap["top"] != base
    assert datastore.disk("vm1")["chain"] == [snap["top"], base]
    human = datastore.vdisk("snapshot", "vm1").stdout
    top = datastore.disk("vm1")["top"]
    assert human.startswith(f"vm1: new top {top} (frozen {snap['top']})")
    qemu_io.run(datastore.path / top, "write -P 0x02 1M 2M", "write -z 8M 1M")
    expected = tmp_path / "expected.raw"
    qemu_img.convert(datastore.path / top, expected)

    job = datastore.json("consolidate", "vm1")
    assert JOB_FIELDS <= job.keys()
    assert job["state"] == "done" and job["passes"] == 1
    assert job["copy_set_bytes"] == 3 * MiB and job["bytes_copied"] <= job["copy_set_bytes"]
    assert job["top_before"] == top and job["top_after"] == snap["top"]
    assert datastore.disk("vm1")["chain"] == [snap["top"], base]
    assert not (datastore.path / top).exists()
    qemu_img.compare(datastore.path / snap["top"], expected)
    qemu_img.check_clean(datastore.path / snap["top"])

    listed = datastore.json("job", "list")["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(job["id"], "done")]
    assert datastore.json("job", "show", str(job["id"])) == listed[0]


def test_consolidate_into_and_to(datastore: Datastore, tmp_path: Path) -> None:
    base = datastore.create("vm1", "8M")
    qemu_io.run(datastore.path / base, "write -P 0x01 0 8M")
    for pattern in (0x02, 0x03, 0x04):
        datastore.vdisk("snapshot", "vm1")
        qemu_io.run(datastore.top("vm1"), f"write -P {pattern} {pattern - 2}M 1M")
    chain = datastore.disk("vm1")["chain"]
    assert len(chain) == 4
    expected = tmp_path / "expected.raw"
    qemu_img.convert(datastore.path / chain[0], expected)

    job = datastore.json("consolidate", "vm1", "--into", chain[2])   # datastore-relative
    assert job["state"] == "done" and job["top_after"] == chain[2]
    assert datastore.disk("vm1")["chain"] == [chain[2], base]
    qemu_img.compare(datastore.top("vm1"), expected)

    new = tmp_path / "elsewhere.qcow2"
    result = datastore.vdisk("consolidate", "vm1", "--to", new, check=False)
    assert "outside the datastore" in result.error_line()
    job = datastore.json("consolidate", "vm1", "--to", datastore.path / "images" / "one.qcow2")
    assert job["state"] == "done" and job["new_image"] is True
    assert datastore.disk("vm1")["chain"] == ["images/one.qcow2"]
    qemu_img.compare(datastore.top("vm1"), expected)
    assert datastore.images() == ["one.qcow2"]


def test_consolidate_of_a_single_image_is_refused(datastore: Datastore) -> None:
    datastore.create("vm1")
    result = datastore.vdisk("consolidate", "vm1", check=False)
    assert result.returncode == 1 and "nothing to consolidate" in result.error_line()


def test_no_pivot_needs_a_server(datastore: Datastore) -> None:
    datastore.create("vm1")
    datastore.vdisk("snapshot", "vm1")
    result = datastore.vdisk("consolidate", "vm1", "--no-pivot", check=False)
    assert result.returncode == 1 and "needs a served datastore" in result.error_line()
    assert datastore.json("job", "list")["jobs"] == []


def test_backup_offline(datastore: Datastore, tmp_path: Path) -> None:
    base = datastore.create("vm1", "16M")
    qemu_io.run(datastore.path / base, "write -P 0x0a 0 3M", "write -P 0x0b 10M 1M")
    expected = tmp_path / "expected.raw"
    qemu_img.convert(datastore.path / base, expected)
    images = datastore.images()

    backup = tmp_path / "vm1-backup.qcow2"
    out = datastore.json("backup", "vm1", "--to", backup)
    assert out["backup"] == str(backup) and out["bytes"] == backup.stat().st_size
    assert out["virtual_size"] == 16 * MiB
    assert out["snapshot"]["frozen"] == base
    assert out["consolidate"]["state"] == "done" and out["consolidate"]["top_after"] == base
    assert chain_length(backup) == 1
    qemu_img.check_clean(backup, allow_leaks=False)
    qemu_img.compare(backup, expected)
    # the disk ends as it began: one image, no leftover delta, no temporary file
    assert datastore.disk("vm1")["chain"] == [base]
    assert datastore.images() == images
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("spelling", ["{dir}", "{dir}/"])
def test_backup_into_a_directory(datastore: Datastore, tmp_path: Path, spelling: str) -> None:
    """An existing directory (with or without a slash) gets DISK-<timestamp>.qcow2;
    a second backup in the same second gets a name of its own."""
    base = datastore.create("vm1", "4M")
    qemu_io.run(datastore.path / base, "write -P 0x0c 0 1M")
    backups = tmp_path / "backups"
    backups.mkdir()
    given = spelling.format(dir=backups)
    first = datastore.json("backup", "vm1", "--to", given)
    second = datastore.json("backup", "vm1", "--to", given)
    names = sorted(p.name for p in backups.iterdir())
    assert len(names) == 2 and {first["backup"], second["backup"]} == \
        {str(backups / n) for n in names}
    for name in names:
        assert re.fullmatch(r"vm1-\d{8}T\d{6}(-\d+)?\.qcow2", name), name
        qemu_img.compare(backups / name, datastore.path / base)
    assert datastore.disk("vm1")["chain"] == [base]


def test_backup_to_a_missing_directory(datastore: Datastore, tmp_path: Path) -> None:
    base = datastore.create("vm1", "4M")
    for given, missing in ((f"{tmp_path}/nodir/", f"{tmp_path}/nodir/"), ("nodir/", "nodir/"),
                           (f"{tmp_path}/nodir/vm1.qcow2", f"{tmp_path}/nodir")):
        result = datastore.vdisk("backup", "vm1", "--to", given, check=False, cwd=tmp_path)
        assert result.returncode == 1
        assert result.error_line() == f"{missing}: no such directory"
    assert not (tmp_path / "nodir").exists()
    assert datastore.disk("vm1")["chain"] == [base]
    assert datastore.json("job", "list")["jobs"] == []
