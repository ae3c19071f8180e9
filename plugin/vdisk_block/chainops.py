"""Changes to the shape of a served chain: snapshot, and the pivot of a mirror job.

Both run under the disk lock, so requests in flight finish first and later
ones see the new chain. A `persist` callback records the change (the datastore
catalog) before any request can reach the new top: if it fails, nothing
changes, and if the process dies after it, the chain it names serves the same
data as the one it replaces.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import locking
from .clustermap import MAX_LAYERS
from .create import create_qcow2
from .disk import Disk
from .errors import RequestError
from .image import Qcow2File, RawFile
from .top import TopImage

Persist = Callable[[str], None]


def relative_backing(image_path: str, backing_path: str) -> str:
    """The backing name as qemu-img writes it: relative to the image's directory."""
    return os.path.relpath(backing_path, os.path.dirname(os.path.abspath(image_path)))


def snapshot(disk: Disk, new_path: str, persist: Persist | None = None) -> None:
    """Freeze the top and put a new empty qcow2 image on it.

    The frozen image keeps only a read lock, so nobody (QEMU included) may
    write it while it is a backing file.
    """
    with disk.lock:
        top = disk._writable()
        if disk.job is not None:
            raise RequestError(disk.path, "a mirror job is running on this disk")
        if len(disk.layers) >= MAX_LAYERS:
            raise RequestError(disk.path, f"the chain already has {MAX_LAYERS} images")
        disk.flush()
        old = top.f
        create_qcow2(new_path, disk.size, cluster_bits=old.cluster_bits,
                     backing=relative_backing(new_path, old.path), backing_format="qcow2",
                     parent_id=top.identity_for_child())
        try:
            f = Qcow2File(new_path, writable=True)
            try:
                new_top = TopImage(f)
                if persist is not None:
                    persist(new_path)
            except BaseException:
                f.close()
                raise
        except BaseException:
            os.unlink(new_path)
            raise
        locking.lock_for_read(old.fd, old.path)
        old.file_size = os.fstat(old.fd).st_size      # it grew while it was the top
        disk.drain_reads()
        disk.map.freeze_backing()
        disk.set_chain([f, *disk.layers], disk.map, new_top)


def adopt(disk: Disk, other: Disk) -> list[Qcow2File | RawFile]:
    """Make disk serve other's chain (caller holds disk's lock, reads drained);
    return disk's layers that other does not use."""
    keep = {id(f) for f in other.layers}
    dropped = [f for f in disk.layers if id(f) not in keep]
    disk.set_chain(other.layers, other.map, other.top)
    return dropped
