"""The target's image index (Catalog.scan_images / images_with).

A scan reads the header of a file only when the file is new or changed
(inode, size, mtime, ctime); ``last_scan`` counts files seen and headers read.
The index only proposes: replicate re-reads the header it is about to trust.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from replharness import (
    Source,
    assert_same_data,
    content_id,
    qemu_io,
    replicate,
    visible_images,
)

from vdisk_block import identity
from vdisk_block.catalog import Catalog, partial_name
from vdisk_block.create import create_qcow2

COUNT = 3000
SMALL = 1 << 20


@dataclass
class Indexed:
    catalog: Catalog
    ids: dict[str, str]             # relative path -> content ID

    def path(self, rel: str) -> Path:
        return Path(self.catalog.abspath(rel))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A datastore with COUNT small images (relative path -> content ID)."""
    path = tmp_path_factory.mktemp("many") / "ds"
    Catalog.init(str(path)).close()
    ids = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)        # setup: durability is not tested
        for i in range(COUNT):
            rel = f"images/img-{i:05d}.qcow2"
            cid = create_qcow2(str(path / rel), SMALL, cluster_bits=9)
            ids[rel] = identity.format_id(cid)
    return path, ids


@pytest.fixture
def indexed(template: tuple[Path, dict[str, str]], tmp_path: Path) -> Iterator[Indexed]:
    """A copy of the template, scanned once."""
    shutil.copytree(template[0], tmp_path / "ds")
    catalog = Catalog(str(tmp_path / "ds"))
    ids = dict(template[1])
    seen = catalog.scan_images()
    assert catalog.last_scan == {"files": COUNT, "read": COUNT}
    assert sorted(seen) == sorted(ids)
    try:
        yield Indexed(catalog, ids)
    finally:
        catalog.close()


def test_second_scan_reads_no_header(indexed: Indexed) -> None:
    c = indexed.catalog
    c.scan_images()
    assert c.last_scan == {"files": COUNT, "read": 0}
    rel, cid = next(iter(indexed.ids.items()))
    assert c.images_with(cid, SMALL) == [rel]
    assert c.images_with(cid, SMALL * 2) == []
    # a fresh catalog (another process) finds the index persisted
    again = Catalog(c.dir)
    try:
        again.scan_images()
        assert again.last_scan == {"files": COUNT, "read": 0}
    finally:
        again.close()


def test_touched_image_is_read_again(indexed: Indexed) -> None:
    c = indexed.catalog
    rel = "images/img-00042.qcow2"
    st = indexed.path(rel).stat()
    os.utime(indexed.path(rel), ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    c.scan_images()
    assert c.last_scan == {"files": COUNT, "read": 1}
    c.scan_images()
    assert c.last_scan == {"files": COUNT, "read": 0}


def test_new_identity_is_indexed(indexed: Indexed) -> None:
    c = indexed.catalog
    rel = "images/img-01000.qcow2"
    old = indexed.ids[rel]
    new = identity.write_path(str(indexed.path(rel)), identity.new_id(), None)
    c.scan_images()
    assert c.last_scan == {"files": COUNT, "read": 1}
    assert c.images_with(old, SMALL) == []
    assert c.images_with(identity.format_id(new.content_id), SMALL) == [rel]


def test_image_written_by_qemu_loses_its_entry(indexed: Indexed) -> None:
    c = indexed.catalog
    rel = "images/img-02000.qcow2"
    qemu_io(indexed.path(rel), "write -P 0x11 0 64k")
    c.scan_images()
    assert c.last_scan == {"files": COUNT, "read": 1}
    assert c.images_with(indexed.ids[rel], SMALL) == []


def test_deleted_image_disappears(indexed: Indexed) -> None:
    c = indexed.catalog
    rel = "images/img-02999.qcow2"
    indexed.path(rel).unlink()
    seen = c.scan_images()
    assert c.last_scan == {"files": COUNT - 1, "read": 0}
    assert rel not in seen
    assert c.images_with(indexed.ids[rel], SMALL) == []


def test_new_and_hidden_files(indexed: Indexed) -> None:
    c = indexed.catalog
    cid = create_qcow2(c.abspath("images/new.qcow2"), SMALL, cluster_bits=9)
    # images being written are never indexed
    hidden = create_qcow2(c.abspath(partial_name("images/other.qcow2")), SMALL, cluster_bits=9)
    c.scan_images()
    assert c.last_scan == {"files": COUNT + 1, "read": 1}
    assert c.images_with(identity.format_id(cid), SMALL) == ["images/new.qcow2"]
    assert c.images_with(identity.format_id(hidden), SMALL) == []


def test_replicate_links_among_thousands(source: Source, target: Path,
                                        template: tuple[Path, dict[str, str]]) -> None:
    """A target holding thousands of unrelated images and a copy of base: vm2 links to it."""
    shutil.copytree(template[0], target)
    first = replicate(source.images["base"], "--to", target)
    assert len(visible_images(target)) == COUNT + 1
    result = replicate("vm2", "-d", source.path, "--to", target)
    assert [r["action"] for r in result["layers"]] == ["copied", "linked"]
    assert result["layers"][1]["image"] == first["top"]
    assert_same_data(source.top("vm2"), target / result["top"])
    cid = content_id(source.images["base"])
    assert [p.name for p in visible_images(target) if content_id(p) == cid] == \
        [Path(first["top"]).name]


def test_a_catalog_made_before_target_id_gains_the_column(tmp_path: Path) -> None:
    """Datastores made before jobs journalled the target's content ID open, and get
    the column; the jobs they hold keep their rows."""
    import sqlite3

    Catalog.init(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / "vdisk.db")
    with db:
        db.execute("ALTER TABLE jobs DROP COLUMN target_id")
        db.execute("INSERT INTO jobs (disk, kind, state, started, updated) "
                   "VALUES ('a', 'consolidate', 'done', 0, 0)")
    db.close()
    c = Catalog(str(tmp_path))
    try:
        (job,) = c.jobs()
        assert job["disk"] == "a" and job["target_id"] is None
        c.update_job(job["id"], target_id="x")
        assert c.job(job["id"])["target_id"] == "x"
    finally:
        c.close()
    Catalog(str(tmp_path)).close()          # a second open finds it there
