"""Named snapshots of a disk: a name for a frozen image of its chain.

`vdisk snapshot DISK --name NAME` freezes the disk's top, as any snapshot,
and records NAME -> the frozen image in the catalog (table ``snapshots``).
The image is the disk as it was at that moment: the chain whose top it is.
Reverting puts a new empty top on it (the images only the abandoned top
needed go); deleting merges the layer above it into it, online, as
libvirt's snapshot-delete does (see snapcommands.py). An image a named
snapshot records is kept for as long as the snapshot is, in the disk's
chain or not (after a revert to an older snapshot, newer ones are off the
chain: a branch).
"""

from __future__ import annotations

import re
import sqlite3
import time
from typing import Any

from .catalog import Catalog, CatalogError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    disk TEXT NOT NULL,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (disk, name)
)
"""

_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9._+-]{0,63}$")


def check_name(where: str, name: str) -> None:
    if not _NAME.match(name):
        raise CatalogError(where, f"invalid snapshot name {name!r}: letters, digits, '.', "
                           "'_', '-', '+', at most 64, not starting with '.' or '-'")


def _rows(catalog: Catalog, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    try:
        return catalog.select(sql, args)
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):      # no snapshot was ever named here
            return []
        raise


def of_disk(catalog: Catalog, disk: str) -> list[dict[str, Any]]:
    """The disk's named snapshots, oldest first."""
    return _rows(catalog, "SELECT * FROM snapshots WHERE disk = ? ORDER BY created, name",
                 (disk,))


def get(catalog: Catalog, disk: str, name: str) -> dict[str, Any]:
    rows = _rows(catalog, "SELECT * FROM snapshots WHERE disk = ? AND name = ?", (disk, name))
    if not rows:
        raise CatalogError(catalog.dir, f"disk {disk!r} has no snapshot {name!r}")
    return rows[0]


def all_rows(catalog: Catalog) -> list[dict[str, Any]]:
    return _rows(catalog, "SELECT * FROM snapshots ORDER BY disk, created", ())


def images(catalog: Catalog) -> set[str]:
    """Every image a named snapshot of any disk records (relative paths)."""
    return {r["image"] for r in _rows(catalog, "SELECT image FROM snapshots", ())}


def add(db: sqlite3.Connection, disk: str, name: str, image: str) -> None:
    """Inside a catalog transaction (the snapshot's own, with its new top)."""
    db.execute(_SCHEMA)
    try:
        db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)", (disk, name, image, time.time()))
    except sqlite3.IntegrityError:
        raise CatalogError("", f"disk {disk!r} already has a snapshot {name!r}") from None


def remove(db: sqlite3.Connection, disk: str, name: str | None = None) -> None:
    """One snapshot of the disk, or all (inside a catalog transaction)."""
    db.execute(_SCHEMA)
    if name is None:
        db.execute("DELETE FROM snapshots WHERE disk = ?", (disk,))
    else:
        db.execute("DELETE FROM snapshots WHERE disk = ? AND name = ?", (disk, name))


def restore(db: sqlite3.Connection, row: dict[str, Any]) -> None:
    """Put back a snapshot removed a moment ago (its row as it was)."""
    db.execute(_SCHEMA)
    db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)",
               (row["disk"], row["name"], row["image"], row["created"]))


def move(db: sqlite3.Connection, disk: str, old_image: str, new_image: str) -> None:
    """Snapshots recording old_image record new_image (a merge dropped the old)."""
    db.execute(_SCHEMA)
    db.execute("UPDATE snapshots SET image = ? WHERE disk = ? AND image = ?",
               (new_image, disk, old_image))


def rename_disk(db: sqlite3.Connection, old: str, new: str) -> None:
    db.execute(_SCHEMA)
    db.execute("UPDATE snapshots SET disk = ? WHERE disk = ?", (new, old))
