"""The snapshot and size commands of a disk's service (docs/control.md).

A mixin of DiskService. ``snapshot`` freezes the top (and names the frozen
image, snapshots.py); ``snapshot-revert`` puts a new empty top on a named
snapshot's image and drops what only the abandoned top needed;
``snapshot-delete`` forgets a name and merges what sits above its image
into it by an online consolidation (or drops an image no chain uses any
more); ``resize`` changes the virtual size (resize.py).

Reverting changes what clients read: it is refused while a client is
attached, unless ``force`` and no client is writing (a client connected
read-only then reads the snapshot's data from its next request on).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from . import snapshots, usage
from .catalog import Catalog
from .chain import chain_paths, open_disk
from .chainops import relative_backing, snapshot
from .create import create_qcow2
from .disk import Disk
from .errors import RequestError
from .identity import read as read_identity
from .resize import resize


class SnapshotCommands:
    catalog: Catalog
    dir: str
    name: str
    clients: int
    writers: int
    _lock: threading.RLock
    disk: Callable[[str | None], Disk]
    is_top: Callable[[str], bool]
    _refuse_active: Callable[[], None]
    consolidate: Callable[..., dict[str, Any]]

    def snapshot(self, disk: str, name: str | None = None) -> dict[str, Any]:
        """Freeze the top under a new empty one; with ``name``, record the frozen
        image as a named snapshot."""
        d = self.disk(disk)
        if name is not None:
            snapshots.check_name(self.dir, name)
        with self._lock:
            self._refuse_active()
            frozen = self.catalog.relpath(d.path)
            new = self.catalog.new_image_path(self.name)

            def persist(_path: str) -> None:
                with self.catalog.transaction() as db:
                    if db.execute("UPDATE disks SET top = ? WHERE name = ?",
                                  (new, self.name)).rowcount != 1:
                        raise RequestError(self.dir, f"disk {self.name!r} does not exist")
                    if name is not None:
                        snapshots.add(db, self.name, name, frozen)

            snapshot(d, self.catalog.abspath(new), persist, self.is_top)
        return {"disk": self.name, "top": new, "frozen": frozen, "name": name}

    def snapshot_list(self, disk: str) -> dict[str, Any]:
        d = self.disk(disk)
        chain = [self.catalog.relpath(f.path) for f in d.layers]
        out = []
        for row in snapshots.of_disk(self.catalog, self.name):
            path = self.catalog.abspath(row["image"])
            h, _ident = read_identity(path)
            out.append({"name": row["name"], "created": row["created"], "image": row["image"],
                        "virtual_size": h.size if h else os.path.getsize(path),
                        "bytes": os.stat(path).st_blocks * 512,
                        "in_chain": row["image"] in chain,
                        "current": len(chain) > 1 and chain[1] == row["image"]})
        return {"disk": self.name, "snapshots": out}

    def snapshot_revert(self, disk: str, name: str, force: bool = False) -> dict[str, Any]:
        d = self.disk(disk)
        snap = snapshots.get(self.catalog, self.name, name)
        with self._lock:
            self._refuse_active()
            if self.writers:
                raise RequestError(self.dir, f"disk {self.name!r} has {self.writers} client(s) "
                                   "writing: a revert would change the disk under them; "
                                   "disconnect them first")
            base = self.catalog.abspath(snap["image"])
            h, ident = read_identity(base)
            size = h.size if h is not None else d.size  # the disk as it was, its size too
            if self.clients and size != d.size:
                raise RequestError(self.dir, f"disk {self.name!r} has {self.clients} client(s) "
                                   f"attached, and snapshot {name!r} has another size "
                                   f"({size} bytes, the disk {d.size}): disconnect them first")
            if self.clients and not force:
                raise RequestError(self.dir, f"disk {self.name!r} has {self.clients} client(s) "
                                   "attached: they would read the snapshot's data from "
                                   "their next request on; disconnect them, or use --force")
            new_rel = self.catalog.new_image_path(self.name)
            new = self.catalog.abspath(new_rel)
            create_qcow2(new, size, cluster_bits=d.layers[0].cluster_bits,
                         backing=relative_backing(new, base), backing_format="qcow2",
                         parent_id=ident.content_id if ident.valid else None)
            try:
                other = open_disk(new)          # refuses a broken or modified chain
            except BaseException:
                os.unlink(new)
                raise
            old = [f.path for f in d.layers]
            try:
                self.catalog.set_top(self.name, new_rel)
            except BaseException:
                if not self.is_top(new):
                    other.close()
                    os.unlink(new)
                    raise
            with d.lock:
                d.drain_reads()
                dropped_files = [f for f in d.layers]
                d.set_chain(other.layers, other.map, other.top)
            for f in dropped_files:
                f.close()
            dropped = self._drop_unused(old)
        return {"disk": self.name, "snapshot": name, "top": new_rel, "dropped": dropped}

    def snapshot_delete(self, disk: str, name: str) -> dict[str, Any]:
        """Forget the snapshot; merge what sits above its image into it (an online
        consolidation, returned as its job), or drop the image if no chain and no
        other snapshot uses it."""
        d = self.disk(disk)
        snap = snapshots.get(self.catalog, self.name, name)
        chain = [self.catalog.relpath(f.path) for f in d.layers]
        with self._lock:
            self._refuse_active()
            image = snap["image"]
            if image in chain:
                named = {r["image"]: r["name"] for r in snapshots.of_disk(self.catalog, self.name)}
                above = [named[p] for p in chain[1:chain.index(image)] if p in named]
                if above:
                    raise RequestError(self.dir, f"snapshot {above[-1]!r} of disk "
                                       f"{self.name!r} sits above {name!r}: delete it first "
                                       "(a snapshot's layer is merged into the one below only "
                                       "from the top of the chain down)")
            # the name goes first (a consolidation refuses to write a named
            # snapshot's image) and comes back if the merge cannot start; if the
            # merge fails later, the layer stays, unnamed, the disk reads the same
            with self.catalog.transaction() as db:
                snapshots.remove(db, self.name, name)
            try:
                job = self.consolidate(self.name, into=image)["job"] if image in chain \
                    else None
            except BaseException:
                with self.catalog.transaction() as db:
                    snapshots.restore(db, snap)
                raise
            # off the chain: its image goes, and the unnamed layers below it
            # that only it used (delete keeps whatever anything still needs)
            dropped = [] if job else self._drop_unused(
                chain_paths(self.catalog.abspath(image), partial=True))
            return {"disk": self.name, "snapshot": name, "job": job, "dropped": dropped}

    def resize(self, disk: str, size: int, shrink: bool = False) -> dict[str, Any]:
        d = self.disk(disk)
        with self._lock:
            self._refuse_active()
            if size < d.size:
                if not shrink:
                    raise RequestError(self.dir, f"{size} is smaller than disk {self.name!r} "
                                       f"({d.size} bytes): shrinking needs --shrink")
                if self.clients:
                    raise RequestError(self.dir, f"disk {self.name!r} has {self.clients} "
                                       "client(s) attached, which may use what a shrink "
                                       "cuts away; disconnect them first")
            was = resize(d, size)
        return {"disk": self.name, "size": size, "was": was, "clients": self.clients}

    # -- helpers ------------------------------------------------------------------------

    def _drop_unused(self, paths: list[str]) -> list[str]:
        """Delete those of paths that no disk's chain and no named snapshot's uses."""
        return usage.delete(self.catalog, paths)
