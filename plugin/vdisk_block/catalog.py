"""A datastore's catalog: disks (name -> top image), the job journal, and an
index of the images' content identities.

One SQLite database, DIR/vdisk.db, in WAL mode with synchronous=FULL: every
change of a disk's top is one transaction, durable when it returns. Image
paths are stored relative to the datastore directory, so a datastore can move.
Standard library only: the plugin (inside nbdkit) and the `vdisk` command
both use it.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import catalogdb
from .errors import ImageError
from .files import OwnedTemp, taken_names, temp_path

DB_NAME = "vdisk.db"
IMAGES = "images"
# The catalog's format: raised only for a change older code would misread.
# Added columns are not such a change: they go into _COLUMNS_ADDED.
FORMAT_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS disks (
    name TEXT PRIMARY KEY,
    top TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    disk TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    target TEXT,
    new_image INTEGER NOT NULL DEFAULT 0,
    collapse INTEGER,
    top_before TEXT,
    top_after TEXT,
    dropped TEXT NOT NULL DEFAULT '[]',
    stats TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    started REAL NOT NULL,
    updated REAL NOT NULL,
    target_id TEXT,
    owner TEXT,
    output TEXT,
    temp TEXT
);
"""

# Columns added to a table after datastores were made without them: (table,
# column, declaration), added when a writer opens the catalog (catalogdb).
# The CREATE statement above has them too, for new datastores.
_COLUMNS_ADDED: list[tuple[str, str, str]] = [
    ("jobs", "target_id", "TEXT"),
    ("jobs", "owner", "TEXT"),
    ("jobs", "output", "TEXT"),
    ("jobs", "temp", "TEXT"),
]

# What a scan of DIR/images learned from each file's header, keyed by what
# notices a change of the file (inode, size, mtime, ctime): a later scan reads
# only the headers of files that changed. Matching re-reads the one header it
# is about to trust, so the index only ever narrows the search.
_IMAGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    stamp TEXT NOT NULL,
    state TEXT NOT NULL,
    content_id TEXT,
    parent_id TEXT,
    virtual_size INTEGER,
    backing TEXT
);
CREATE INDEX IF NOT EXISTS images_by_content ON images (content_id);
"""

PARTIAL_SUFFIX = ".partial"     # an image being written: never indexed, never matched

FINAL_STATES = ("done", "cancelled", "failed")

_RESERVE_ATTEMPTS = 20


class CatalogError(ImageError):
    template = "{path}: {reason}"


class Catalog:
    def __init__(self, directory: str) -> None:
        self.dir = os.path.abspath(directory)
        db = os.path.join(self.dir, DB_NAME)
        if not os.path.exists(db):
            raise CatalogError(self.dir, "not a vdisk datastore (no vdisk.db); "
                               "create one with 'vdisk datastore init'")
        # a datastore this user cannot write is opened read-only: it can be
        # looked at, and its schema changes wait for a writer
        self.readonly = not catalogdb.writable(db)
        self._db = self._connect(db, True) if self.readonly else self._connect(db)
        self._lock = threading.RLock()     # one connection, shared by the service's threads
        self._check_format()
        if not self.readonly:
            catalogdb.add_columns(self._db, _COLUMNS_ADDED)
        self.last_scan: dict[str, int] = {}

    @staticmethod
    def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
        return catalogdb.connect(path, readonly)

    def _check_format(self) -> None:
        """Refuse a catalog written by a newer vdisk in a way this one would misread."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        found = row["value"] if row else FORMAT_VERSION
        if not found.isdigit() or int(found) > int(FORMAT_VERSION):
            raise CatalogError(self.dir, f"catalog format {found} is newer than this vdisk "
                               f"reads (format {FORMAT_VERSION}); upgrade vdisk")

    @classmethod
    def init(cls, directory: str) -> Catalog:
        os.makedirs(os.path.join(directory, IMAGES), exist_ok=True)
        db = cls._connect(os.path.join(directory, DB_NAME))
        with db:
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT_VERSION,))
        db.close()
        return cls(directory)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; ``durable=False`` skips the sync of its commit (for what
        can be rebuilt, like the image index: a crash may lose it, never tear it)."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def select(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a query, as dicts. Every read goes through here: the
        connection is shared by the service's threads, and a statement run
        without the lock can take another thread's error (or its rows)."""
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args)]

    # -- paths --------------------------------------------------------------------

    def abspath(self, rel: str) -> str:
        return os.path.join(self.dir, rel)

    def relpath(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), self.dir)
        if rel.startswith(".."):
            raise CatalogError(path, f"is outside the datastore {self.dir}")
        return rel

    def new_image_path(self, disk: str) -> str:
        """A fresh image name for a disk, relative to the datastore."""
        return self.new_image_paths(disk, 1)[0]

    def new_image_paths(self, disk: str, count: int, skip: Collection[str] = ()) -> list[str]:
        """``count`` distinct fresh image names (relative), none of which exists
        yet nor is reserved by a temporary ``.NAME.*`` (an image being written:
        files.OwnedTemp, replicate's ``.partial``), nor is in ``skip``."""
        base = f"{disk}-{time.strftime('%Y%m%dT%H%M%S')}"
        taken = taken_names(self.abspath(IMAGES))
        names: list[str] = []
        n = 0
        while len(names) < count:
            name = f"{base}-{n}.qcow2"
            rel = os.path.join(IMAGES, name)
            if name not in taken and rel not in skip:
                names.append(rel)
            n += 1
        return names

    def reserve_image_paths(self, disk: str, count: int, suffix: str) -> list[OwnedTemp]:
        """``count`` fresh image names, each reserved by an owned temporary
        ``.NAME.SUFFIX`` created here (``OwnedTemp.final`` is the absolute name):
        until the caller commits or discards them, no other writer picks those
        names. A name another writer reserves or creates meanwhile is passed over."""
        temps: list[OwnedTemp] = []
        tried: set[str] = set()
        try:
            for _ in range(_RESERVE_ATTEMPTS):
                for rel in self.new_image_paths(disk, count - len(temps), skip=tried):
                    tried.add(rel)
                    t = OwnedTemp.reserve(self.abspath(rel), suffix)
                    if t is not None:
                        temps.append(t)
                if len(temps) == count:
                    return temps
            raise CatalogError(self.dir, f"could not reserve {count} new image names for "
                               f"disk {disk!r}")
        except BaseException:
            for t in temps:
                t.discard()
                t.close()
            raise

    # -- meta -----------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        rows = self.select("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- disks ------------------------------------------------------------------------

    def disks(self) -> list[dict[str, Any]]:
        return self.select("SELECT * FROM disks ORDER BY name")

    def disk(self, name: str) -> dict[str, Any]:
        rows = self.select("SELECT * FROM disks WHERE name = ?", (name,))
        if not rows:
            raise CatalogError(self.dir, f"disk {name!r} does not exist")
        return rows[0]

    def add_disk(self, name: str, top: str) -> None:
        check_disk_name(self.dir, name)
        try:
            with self.transaction() as db:
                db.execute("INSERT INTO disks VALUES (?, ?, ?)", (name, top, time.time()))
        except sqlite3.IntegrityError:
            raise CatalogError(self.dir, f"disk {name!r} already exists") from None

    def set_top(self, name: str, top: str, job: int | None = None, **job_fields: Any) -> None:
        """Switch a disk to a new top (and update its job) in one durable step."""
        with self.transaction() as db:
            if db.execute("UPDATE disks SET top = ? WHERE name = ?", (top, name)).rowcount != 1:
                raise CatalogError(self.dir, f"disk {name!r} does not exist")
            if job is not None:
                self._update_job(db, job, job_fields)

    def remove_disk(self, name: str) -> None:
        with self.transaction() as db:
            if db.execute("DELETE FROM disks WHERE name = ?", (name,)).rowcount != 1:
                raise CatalogError(self.dir, f"disk {name!r} does not exist")

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, disk: str, kind: str, **fields: Any) -> int:
        now = time.time()
        fields = {"state": "copying", **fields}
        with self.transaction() as db:
            cols = ["disk", "kind", "started", "updated", *fields]
            values = [disk, kind, now, now, *(self._encode(k, v) for k, v in fields.items())]
            cur = db.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES "
                             f"({', '.join('?' * len(cols))})", values)
            return int(cur.lastrowid or 0)

    def update_job(self, job: int, **fields: Any) -> None:
        with self.transaction() as db:
            self._update_job(db, job, fields)

    def _update_job(self, db: sqlite3.Connection, job: int, fields: dict[str, Any]) -> None:
        fields = {**fields, "updated": time.time()}
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?",
                   [*(self._encode(k, v) for k, v in fields.items()), job])

    @staticmethod
    def _encode(key: str, value: Any) -> Any:
        return json.dumps(value) if key in ("dropped", "stats") else value

    def jobs(self, disk: str | None = None, job: int | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM jobs", []
        conds = []
        if disk is not None:
            conds.append("disk = ?")
            args.append(disk)
        if job is not None:
            conds.append("id = ?")
            args.append(job)
        if conds:
            query += " WHERE " + " AND ".join(conds)
        out = []
        for d in self.select(query + " ORDER BY id DESC", args):
            d["dropped"] = json.loads(d["dropped"])
            d.update(json.loads(d.pop("stats")))
            d["new_image"] = bool(d["new_image"])
            out.append(d)
        return out

    def job(self, job: int) -> dict[str, Any]:
        rows = self.jobs(job=job)
        if not rows:
            raise CatalogError(self.dir, f"job {job} does not exist")
        return rows[0]

    def active_job(self, disk: str) -> dict[str, Any] | None:
        for j in self.jobs(disk=disk):
            if j["state"] not in FINAL_STATES:
                return j
        return None

    # -- image index ----------------------------------------------------------------------

    def _images_table(self) -> None:
        with self._lock:
            self._db.executescript(_IMAGES_SCHEMA)

    def scan_images(self) -> dict[str, dict[str, Any]]:
        """The index of DIR/images, brought up to date: {relative path: row}.

        Reads the header of a file only when the index has no row for it or
        its stamp (inode, size, mtime, ctime) changed; rows of vanished files
        go. ``last_scan`` counts files seen and headers read.
        """
        from .identity import read as read_identity

        self._images_table()
        known = {r["path"]: r for r in self.select("SELECT * FROM images")}
        seen: dict[str, dict[str, Any]] = {}
        changed: list[dict[str, Any]] = []
        top = os.path.join(self.dir, IMAGES)
        with os.scandir(top) if os.path.isdir(top) else _no_entries() as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                rel = os.path.join(IMAGES, entry.name)
                stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
                row = known.get(rel)
                if row is None or row["stamp"] != stamp:
                    row = {"path": rel, "stamp": stamp, "state": "unreadable",
                           "content_id": None, "parent_id": None, "virtual_size": None,
                           "backing": None}
                    try:
                        h, ident = read_identity(entry.path)
                    except (OSError, ImageError) as e:
                        row["state"] = f"unreadable: {e}"
                    else:
                        d = ident.describe()
                        row.update(state=ident.state, content_id=d["content_id"],
                                   parent_id=d["parent_id"],
                                   virtual_size=h.size if h else os.path.getsize(entry.path),
                                   backing=h.backing_file if h else None)
                    changed.append(row)
                seen[rel] = row
        gone = [p for p in known if p not in seen]
        if changed or gone:
            # the index caches what the files say: a commit lost in a crash is read again
            with self.transaction(durable=False) as db:
                db.executemany("INSERT OR REPLACE INTO images VALUES (:path, :stamp, :state, "
                               ":content_id, :parent_id, :virtual_size, :backing)", changed)
                db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in gone])
        self.last_scan = {"files": len(seen), "read": len(changed)}
        return seen

    def images_with(self, content_id: str, virtual_size: int) -> list[str]:
        """Indexed images (relative paths) said to have this valid content ID and size."""
        self._images_table()
        rows = self.select("SELECT path FROM images WHERE content_id = ? AND state = "
                           "'valid' AND virtual_size = ? ORDER BY path", (content_id, virtual_size))
        return [r["path"] for r in rows]


_NEW_DISK_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,63}")
NEW_DISK_NAME_RULE = ("letters, digits, '.', '_', '-' and '+', at most 64 characters, "
                      "not starting with '-' or '.'")


def check_disk_name(where: str, name: str, *, new: bool = True) -> None:
    """A disk name is an export name (in NBD URIs) and a file name stem. A new
    disk's name must follow NEW_DISK_NAME_RULE; ``new=False`` accepts the names
    older versions allowed (no '/', no leading '.'), so their disks stay usable."""
    if new:
        if _NEW_DISK_NAME.fullmatch(name) is None:
            raise CatalogError(where, f"invalid disk name {name!r}: use {NEW_DISK_NAME_RULE}")
    elif not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise CatalogError(where, f"invalid disk name {name!r}")


def partial_name(rel: str, suffix: str = PARTIAL_SUFFIX) -> str:
    """Where an image is written before it becomes visible under ``rel``
    (``.creating``: create.create_qcow2's temporary name)."""
    return temp_path(rel, suffix)


@contextmanager
def _no_entries() -> Iterator[list[os.DirEntry[str]]]:
    yield []
