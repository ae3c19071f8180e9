"""A datastore as a whole: its disks and jobs as any process sees them, and
the removal of a disk.

Listing takes no lock and changes nothing: chains are read from the image
headers, a disk's owner and a job's liveness from their locks (owner.py),
so a listing is right whoever serves or works on what. Removing a disk
takes the disk's ownership for the time it takes: refused while another
process owns it (a worker serving it, an offline command).
"""

from __future__ import annotations

import os
from typing import Any

from . import header as hdr
from . import owner, recovery, snapshots, usage
from .catalog import Catalog
from .chain import chain_paths
from .errors import ImageError, RequestError
from .jobinfo import job_info


class DatastoreView:
    def __init__(self, directory: str) -> None:
        self.catalog = Catalog(directory)
        self.dir = self.catalog.dir

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> DatastoreView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query_disks(self, disk: str | None = None) -> dict[str, Any]:
        """Every disk (or one): its top, chain, size, owner and job. A disk whose
        chain cannot be read says why in ``error`` (asked for alone, it raises)."""
        rows = [self.catalog.disk(disk)] if disk else self.catalog.disks()
        out = []
        for r in rows:
            job = self.catalog.active_job(r["name"])
            holder = owner.disk_owner(self.dir, r["name"])
            info: dict[str, Any] = {
                "name": r["name"], "top": r["top"], "chain": [], "size": None,
                "open": holder is not None, "clients": None,
                "job": job_info(self.catalog, job) if job else None,
                "owner": {"pid": holder.pid, "what": holder.what} if holder else None,
                "error": None}
            try:
                info["chain"] = [self.catalog.relpath(p) for p in
                                 chain_paths(self.catalog.abspath(r["top"]))]
                info["size"] = self._virtual_size(r["top"])
            except (ImageError, OSError) as e:
                if disk:                # asked for this one disk: say what is wrong
                    raise
                info["error"] = str(e)  # one broken chain does not hide the others
            out.append(info)
        return {"disks": out}

    def query_jobs(self, disk: str | None = None, id: int | None = None) -> dict[str, Any]:  # noqa: A002
        if disk is not None:
            self.catalog.disk(disk)             # a disk that does not exist is an error
        return {"jobs": [job_info(self.catalog, r)
                         for r in self.catalog.jobs(disk=disk, job=id)]}

    def disk_remove(self, disk: str, keep_images: bool = False) -> dict[str, Any]:
        """Forget a disk; delete the images of its chain that no other disk uses
        (none with keep_images). A disk whose chain is broken can be removed:
        what can be read of every chain counts."""
        self.catalog.disk(disk)
        with owner.own_disk(self.dir, disk, owner.describe_self()):
            self._refuse_a_job(disk)
            # its chain and its named snapshots' chains, as far as they can be read
            images = self._readable_chain(disk)
            for snap in snapshots.of_disk(self.catalog, disk):
                images += [p for p in chain_paths(self.catalog.abspath(snap["image"]),
                                                  partial=True) if p not in images]
            with self.catalog.transaction() as db:
                if db.execute("DELETE FROM disks WHERE name = ?", (disk,)).rowcount != 1:
                    raise RequestError(self.dir, f"disk {disk!r} does not exist")
                snapshots.remove(db, disk)
            # what no other disk or snapshot needs goes (usage.py: nothing, while
            # another chain cannot be read to its end)
            deleted = [] if keep_images else usage.delete(self.catalog, images,
                                                          tops=images[:1])
        kept = [self.catalog.relpath(p) for p in images if os.path.exists(p)]
        return {"disk": disk, "deleted": deleted, "kept": kept}

    def _refuse_a_job(self, disk: str) -> None:
        """Owning the disk: its dead jobs settled, refused if one is unfinished."""
        recovery.recover_disk(self.catalog, disk)
        row = self.catalog.active_job(disk)
        if row is not None:
            raise RequestError(self.dir, f"disk {disk!r} has a job: {row['kind']} job "
                               f"{row['id']} ({row['state']})")

    def disk_rename(self, disk: str, new: str) -> dict[str, Any]:
        """Give a disk another name (its export name too). Its images keep their
        file names; its jobs and snapshots follow it. Refused while another
        process owns the disk, or while it has an unfinished job."""
        from .catalog import check_disk_name

        self.catalog.disk(disk)
        check_disk_name(self.dir, new)
        with owner.own_disk(self.dir, disk, owner.describe_self()):
            self._refuse_a_job(disk)
            with self.catalog.transaction() as db:
                if db.execute("SELECT 1 FROM disks WHERE name = ?", (new,)).fetchone():
                    raise RequestError(self.dir, f"disk {new!r} already exists")
                db.execute("UPDATE disks SET name = ? WHERE name = ?", (new, disk))
                db.execute("UPDATE jobs SET disk = ? WHERE disk = ?", (new, disk))
                snapshots.rename_disk(db, disk, new)
        return {"disk": new, "was": disk}

    def _readable_chain(self, name: str) -> list[str]:
        return chain_paths(self.catalog.abspath(self.catalog.disk(name)["top"]), partial=True)

    def _virtual_size(self, top: str) -> int:
        fd = os.open(self.catalog.abspath(top), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hdr.parse_header(fd, top).size
        except ImageError:
            if os.pread(fd, 4, 0) != hdr.MAGIC:     # a raw image: its size is its length
                return os.fstat(fd).st_size
            raise
        finally:
            os.close(fd)
