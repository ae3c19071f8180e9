"""The target datastore of a replicate (docs/replicate.md): opening and locking
it, the images that may stand for a source layer, and the disks put on the
copies: a new disk, or one the target has, refreshed.

Everything here works on the target's catalog (vdisk_block.catalog.Catalog)
and files; replicate.Session drives it.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import blockpath  # noqa: F401  (vdisk_block importable)
from .control import ControlClient, ControlUnavailable
from .errors import Error

LOCK_NAME = ".replicate.lock"
LOCK_TIMEOUT_S = 60.0

SourceTop = tuple[int, int, "bytes | None"]     # virtual size, cluster bits, valid content ID


class ReplicateError(Error):
    msg = "{self.reason}"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def prepare_target(directory: str) -> str:
    """The target directory, made if missing; refused if it is neither a
    datastore nor empty (so that its lock can be taken before anything else)."""
    from vdisk_block.catalog import DB_NAME

    directory = os.path.abspath(directory)
    if not os.path.exists(os.path.join(directory, DB_NAME)):
        if os.path.exists(directory) and (not os.path.isdir(directory) or
                                          not _empty(directory)):
            raise ReplicateError(f"{directory} is not a vdisk datastore (and not an empty "
                                 "directory); create one with 'vdisk datastore init'")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ReplicateError(f"{directory}: cannot make it a datastore: "
                                 f"{e.strerror or e}") from None
    return directory


def open_target(directory: str) -> Any:
    """The target datastore's catalog (under the target's lock); a missing or
    empty directory becomes one."""
    from vdisk_block.catalog import DB_NAME, Catalog

    directory = prepare_target(directory)
    if os.path.exists(os.path.join(directory, DB_NAME)):
        return Catalog(directory)
    return Catalog.init(directory)


def _empty(directory: str) -> bool:
    """Empty, or only what an interrupted first replicate into it left: the lock
    file and an empty images/ (Catalog.init makes it before vdisk.db)."""
    from vdisk_block.catalog import IMAGES

    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name == LOCK_NAME or (name == IMAGES and os.path.isdir(path)
                                 and not os.listdir(path)):
            continue
        return False
    return True


@contextmanager
def target_lock(directory: str) -> Iterator[None]:
    """One replicate at a time writes into a target."""
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ReplicateError(f"{directory}: another replicate has been writing "
                                         f"into it for {LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def remove_partials(catalog: Any) -> list[str]:
    from vdisk_block.catalog import IMAGES, PARTIAL_SUFFIX

    removed = []
    top = catalog.abspath(IMAGES)
    for name in os.listdir(top):
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            os.unlink(os.path.join(top, name))
            removed.append(name)
    return removed


# --- matching ---------------------------------------------------------------------------


def find_match(catalog: Any, f: Any, exclude: set[str]) -> str | None:
    """An image of the target that may stand for layer f: same valid content ID,
    same virtual size, not a disk's (writable) top, and a proven chain below it
    (identity.chain_proven). The index proposes; the image's own chain, read
    now, decides. The caller asks only for a layer whose source chain below is
    proven too (docs/content-id.md, "Proven chains and replication")."""
    from vdisk_block import identity
    from vdisk_block.errors import ImageError

    if not f.identity.valid:
        return None
    for rel in catalog.images_with(identity.format_id(f.identity.content_id), f.size):
        path = catalog.abspath(rel)
        if os.path.realpath(path) in exclude:
            continue
        try:
            h, ident = identity.read(path)
        except (OSError, ImageError):
            continue
        if h is not None and ident.valid and ident.content_id == f.identity.content_id \
                and h.size == f.size and _chain_proven(path):
            return rel
    return None


def _chain_proven(path: str) -> bool:
    """Whether the chain of a candidate is whole (every file there) and proven:
    each image records its parent's current content ID, down to the base."""
    from vdisk_block import identity
    from vdisk_block.chain import open_chain
    from vdisk_block.errors import ImageError

    try:
        layers = open_chain(path, readonly=True)
    except (OSError, ImageError):
        return False
    try:
        return identity.chain_proven([f.identity for f in layers])
    finally:
        for f in layers:
            f.close()


def target_names(catalog: Any, copies: list[Any], taken: set[str]) -> list[str]:
    """Each copy keeps its source's file name where the target has none such,
    else gets a fresh one; all distinct, none existing (nor being written, nor
    ``taken``)."""
    from vdisk_block.catalog import IMAGES
    from vdisk_block.files import taken_names

    # what exists or is reserved there (an import's temporaries reserve names)
    there = taken_names(catalog.abspath(IMAGES))
    names: list[str] = []
    for f in copies:
        name = os.path.basename(f.path)
        rel = os.path.join(IMAGES, name if name.endswith(".qcow2") else name + ".qcow2")
        if rel in names or rel in taken or os.path.basename(rel) in there:
            # images/vm-20261124T232839-0.qcow2 -> vm-<now>-N.qcow2
            stem = re.sub(r"-\d{8}T\d{6}-\d+$", "", rel[len(IMAGES) + 1: -len(".qcow2")])
            rel = next(n for n in catalog.new_image_paths(stem, len(copies) + len(taken) + 1)
                       if n not in names and n not in taken)
        names.append(rel)
    return names


# --- disks ------------------------------------------------------------------------------


def _new_top(catalog: Any, disk: str, source_top: SourceTop, top_copy: str) -> str:
    """A new empty top on the copied chain, recording the source top's (valid) ID."""
    from vdisk_block.catalog import partial_name
    from vdisk_block.create import create_qcow2

    size, cluster_bits, content_id = source_top
    rel = catalog.new_image_path(disk)
    create_qcow2(catalog.abspath(rel), size, cluster_bits=cluster_bits,
                 backing=os.path.basename(top_copy), backing_format="qcow2",
                 parent_id=content_id, tmp=catalog.abspath(partial_name(rel)))
    return rel


def add_disk(catalog: Any, disk: str, source_top: SourceTop, top_copy: str) -> str:
    """A new empty top on the copied chain, and the disk naming it."""
    rel = _new_top(catalog, disk, source_top, top_copy)
    try:
        catalog.add_disk(disk, rel)
    except BaseException:
        os.unlink(catalog.abspath(rel))
        raise
    return rel


def served_by(catalog: Any) -> str | None:
    """The control socket of the server that serves the datastore, if one answers."""
    recorded = catalog.get_meta("control")
    if not recorded:
        return None
    path = os.path.join(catalog.dir, recorded)
    try:
        ControlClient.connect(path).close()
    except (ControlUnavailable, Error):
        return None
    return path


def check_refresh(catalog: Any, disk: str) -> str:
    """A disk the target has is moved to the new copy only if nothing is lost:
    the datastore is not served (the disk could be open there, and written),
    and the disk's top holds no data (the empty top a replicate gave it, not
    written since). Returns that top (relative)."""
    served = served_by(catalog)
    if served is not None:
        raise ReplicateError(f"disk {disk!r} exists on {catalog.dir}, which is served "
                             f"(control socket {served}): stop serving it to refresh the "
                             "disk, or replicate under another --name")
    top = catalog.disk(disk)["top"]
    if _holds_data(catalog.abspath(top)):
        raise ReplicateError(f"disk {disk!r} exists on {catalog.dir} and was written since "
                             f"it was replicated (its top {top} holds data): replicate under "
                             "another --name, or remove the disk there first")
    return top


def _holds_data(path: str) -> bool:
    """Whether an image maps any cluster (data or zeros) or cannot be read as qcow2."""
    from vdisk_block.errors import ImageError
    from vdisk_block.image import Qcow2File

    try:
        f = Qcow2File(path, writable=False)
    except (OSError, ImageError):
        return True
    try:
        return any(any(l2) for _i, _off, l2 in f.l2_tables())
    finally:
        f.close()


def move_disk(catalog: Any, disk: str, source_top: SourceTop, top_copy: str,
              old_top: str) -> str:
    """Refresh a disk the target has: a new empty top on the copied chain becomes
    its top; the old top (still empty: checked again) is removed unless another
    disk's chain uses it. The layers below it stay, for later replicates."""
    from vdisk_block.files import fsync_dir
    from vdisk_block.owner import Busy, own_disk
    from vdisk_block.usage import unneeded

    try:            # the disk's owner for the switch: no server may serve it meanwhile
        lock = own_disk(catalog.dir, disk, "vdisk replicate (refreshing the disk)")
    except Busy as e:
        raise ReplicateError(f"{catalog.dir}: cannot refresh {e}") from None
    with lock:
        if check_refresh(catalog, disk) != old_top:
            raise ReplicateError(f"disk {disk!r} on {catalog.dir} changed while it was "
                                 "being refreshed")
        rel = _new_top(catalog, disk, source_top, top_copy)
        try:
            catalog.set_top(disk, rel)
        except BaseException:
            os.unlink(catalog.abspath(rel))
            raise
        path = catalog.abspath(old_top)
        # (the session holds the images lock: what nothing needs can go now)
        for gone in unneeded(catalog, [path], tops=[path]):
            os.unlink(gone)
            fsync_dir(os.path.dirname(gone))
    return rel
