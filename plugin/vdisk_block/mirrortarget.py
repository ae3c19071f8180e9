"""The target of a mirror job, opened as a writable Disk and let go.

The target is either a new image on top of the layer below the collapsed
ones (new mode), or that layer itself (into mode). Either way it is served
by a second Disk over the lower layers, which stay shared with the served
disk. Opening it reads all of its metadata and may write and sync headers;
none of it touches what the served disk reads, so it runs without the disk
lock (the job has claimed the disk: no snapshot or other job meanwhile).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from . import identity as ident
from . import locking
from .chainops import relative_backing
from .create import create_qcow2
from .disk import Disk, chain_map
from .errors import ImageError, RequestError
from .image import Qcow2File, RawFile
from .resize import resize

log = logging.getLogger(__name__)


def _disk_over(top: Qcow2File, lower: list) -> Disk:
    """A writable Disk of top over lower layers that stay shared with the served disk."""
    try:
        return Disk([top, *lower], readonly=False)
    except BaseException:
        top.close()
        raise


def open_target(disk: Disk, collapse: int, new_path: str | None,
                on_target_id: Callable[[bytes], None] | None,
                on_remap: Callable[[int, int], None]) -> Disk:
    """The target of collapsing disk's top ``collapse`` layers, ready for writes."""
    lower = disk.layers[collapse + (0 if new_path else 1):]
    if new_path:
        old_top = disk.layers[0]
        backing = disk.layers[collapse] if collapse < len(disk.layers) else None
        assert isinstance(old_top, Qcow2File)
        create_qcow2(new_path, disk.size, cluster_bits=old_top.cluster_bits,
                     backing=relative_backing(new_path, backing.path) if backing else None,
                     backing_format=backing.fmt if backing else None,
                     parent_id=backing.identity.content_id if backing else None)
        try:
            return _disk_over(Qcow2File(new_path, writable=True), lower)
        except BaseException:
            os.unlink(new_path)
            raise
    orig = disk.layers[collapse]
    if not isinstance(orig, Qcow2File):
        raise RequestError(orig.path, "a raw image cannot be a consolidation target")
    # our own read lock must not stop our own writer; others still cannot write
    locking.lock_image(orig.fd, orig.path, locking.PERM_CONSISTENT_READ, locking.PERM_ALL)
    try:
        target = _disk_over(Qcow2File(orig.path, writable=True), lower)
    except BaseException:
        locking.lock_for_read(orig.fd, orig.path)
        raise
    # The target's data changes from now on: a fresh content ID first
    # (announced to on_target_id, which journals it, before it is
    # written), then the image above records that ID, since the chain
    # still reads the same through it. After a crash between the two, the
    # service's recovery records it, if the target still has that ID.
    top, child = target.top, disk.layers[collapse - 1]
    assert top is not None
    # the served map reads this image's clusters directly: where the
    # target moves a cluster (copy-on-write), the map must follow before
    # the old place can be freed and reused
    target.on_remap = on_remap
    before = top.f.identity
    fresh = ident.new_id()
    try:
        if on_target_id is not None:
            on_target_id(fresh)
        top.refresh_identity(fresh)
        # not synced here (that would write back all the guest's dirty data
        # of the top while the guest waits for the job to start): should it
        # be lost, recovery records it again (the target's ID is durable and
        # journaled) while this job is the disk's last; the top's next flush
        # (the child is the top) or _sync_record (the job ends without a
        # pivot: release_target, or a failure below) makes it durable
        ident.set_parent(child, top.f.identity.content_id, durable=False)
        if collapse == 1 and disk.top is not None:
            with disk.lock:             # (a flush under way would clear it)
                disk.top.data_dirty = True
    except BaseException:
        # no data was written: the target may take its old ID back
        if before.valid and top.f.identity.content_id == fresh:
            assert before.content_id is not None
            top.f.identity = ident.write(top.fd, top.path, top.f.header,
                                         before.content_id, before.parent_id)
        target.layers[0].close()
        locking.lock_for_read(orig.fd, orig.path)
        raise
    orig.identity = top.f.identity
    if top.f.size < disk.size:
        # a layer from before the disk grew grows too; its grown part reads
        # zeros, as the disk does there where the layers above hold nothing
        try:
            with disk.lock:             # it may move a cluster the served map reads
                disk.drain_reads()
                resize(target, disk.size)
                # the served chain reads the grown image as a reopen would: its
                # new end and tables (its grown part reads zeros where the
                # layers below it are longer, and the target may take the
                # guest's writes there, mirrorroute.py)
                orig.refresh()
                disk.set_chain(disk.layers, chain_map(disk.layers, disk.top), disk.top)
        except BaseException:
            target.layers[0].close()
            _sync_record(child)         # (first: relocking may fail too)
            locking.lock_for_read(orig.fd, orig.path)
            raise
    return target


def _sync_record(child: Qcow2File | RawFile) -> None:
    """The record of the target's fresh ID in the image above it durable,
    for a job that will not pivot (a later job's journal would leave
    recovery no trace of this one)."""
    try:
        os.fdatasync(child.fd)
    except OSError as e:
        log.warning("%s: the record of its parent's new content ID may not be "
                    "durable: %s", child.path, e)


def release_target(disk: Disk, collapse: int, new_path: str | None,
                   target: Disk) -> OSError | None:
    """Close a target the disk will not pivot to: a new image is removed, an
    image of the chain is flushed (what it holds stays whole; its unused
    cluster reserve goes back) and read-locked again (its fresh content ID
    stays, and the image above, which records it, is synced: the chain
    stays as it reads now, whatever happens to the job's journal). Returns
    the error of a flush that failed (the caller says whether the chain
    needed it)."""
    error = None
    if not new_path and target.top is not None:
        try:
            target.top.flush()
        except OSError as e:
            log.warning("%s: flushing it as the job ends failed: %s", target.path, e)
            error = e
        _sync_record(disk.layers[collapse - 1])
    target.layers[0].close()
    if new_path:
        os.unlink(new_path)
    else:
        orig = disk.layers[collapse]
        locking.lock_for_read(orig.fd, orig.path)
        try:                            # the job wrote its header and tables
            orig.refresh()              # (a later resize maps it from them)
        except (OSError, ImageError) as e:
            log.warning("%s: could not read it again after the job: %s", orig.path, e)
    return error
