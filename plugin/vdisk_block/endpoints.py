"""Where each disk of a served datastore is reached: its NBD endpoint and its
worker's control socket, recorded in the catalog by the server.

One row per disk, written by the supervisor of `vdisk serve` when it binds
the disk's endpoint (which outlives the disk's worker: a restarted worker
serves the same socket or port). A row is only meaningful while the server
that wrote it lives: ``current`` drops the rows of a server that is gone.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from . import owner
from .catalog import Catalog

SERVER_LOCK = "server.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS endpoints (
    disk TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    socket TEXT,
    address TEXT,
    port INTEGER,
    tls INTEGER NOT NULL DEFAULT 0,
    control TEXT NOT NULL,
    server_pid INTEGER NOT NULL
)
"""

FIELDS = ("uri", "socket", "address", "port", "tls", "control")


def record(catalog: Catalog, disk: str, **fields: Any) -> None:
    """The endpoint of a disk (uri, socket or address and port, tls, control)."""
    fields.setdefault("server_pid", os.getpid())
    with catalog.transaction() as db:
        db.execute(_SCHEMA)
        cols = ["disk", *fields]
        db.execute(f"INSERT OR REPLACE INTO endpoints ({', '.join(cols)}) VALUES "
                   f"({', '.join('?' * len(cols))})", [disk, *fields.values()])


def forget(catalog: Catalog, disk: str | None = None) -> None:
    """Drop one disk's endpoint, or every one."""
    with catalog.transaction() as db:
        db.execute(_SCHEMA)
        if disk is None:
            db.execute("DELETE FROM endpoints")
        else:
            db.execute("DELETE FROM endpoints WHERE disk = ?", (disk,))


def server(directory: str) -> owner.Holder | None:
    """The live process serving the datastore, if any."""
    return owner.holder(directory, SERVER_LOCK)


def current(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """{disk: endpoint} of the live server of the datastore; {} when not served."""
    live = server(catalog.dir)
    if live is None:
        return {}
    try:
        rows = catalog.select("SELECT * FROM endpoints WHERE server_pid = ?", (live.pid,))
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):       # never served since it was made
            return {}
        raise
    return {r["disk"]: {k: r[k] for k in FIELDS} | {"tls": bool(r["tls"])} for r in rows}
