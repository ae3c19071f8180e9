"""The SQLite database under a datastore's catalog: how it is opened, and the
columns added to its tables over time.

A writer opens it read-write in WAL mode with synchronous=FULL. A user who
cannot write the datastore (another owner, a read-only mount) opens it
read-only, which never fails for lack of write access: schema changes wait
for the next writer.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

BUSY_TIMEOUT_S = 30


def writable(db_path: str) -> bool:
    """Whether this process can write the database (and create its -wal and -shm
    files beside it)."""
    return os.access(db_path, os.W_OK) and os.access(os.path.dirname(db_path), os.W_OK)


def connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    db = _connect_readonly(path) if readonly else \
        sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                        check_same_thread=False)
    db.row_factory = sqlite3.Row
    if not readonly:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _connect_readonly(path: str) -> sqlite3.Connection:
    """A WAL database needs its ``-shm`` file, which a reader that cannot write
    the directory cannot create: while no writer has the database open (no
    ``-wal`` file), such a reader opens it as immutable instead."""
    uri = f"file:{urllib.parse.quote(path)}"
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                         isolation_level=None, check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
        if os.path.exists(path + "-wal"):
            raise
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None,
                           check_same_thread=False)


def add_columns(db: sqlite3.Connection, columns: list[tuple[str, str, str]]) -> None:
    """Add each (table, column, declaration) to its table if the table lacks it."""
    for table, column, decl in columns:
        present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if present and column not in present:
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):    # another opener added it first
                    raise
