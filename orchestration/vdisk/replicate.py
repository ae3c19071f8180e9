"""Reconstruct a chain on a second datastore by content IDs (docs/replicate.md).

For a chain top -> ... -> base and a target datastore: the top is copied; for
each parent, an image of the target with a valid, equal content ID and the
same virtual size is looked for; if there is one, the copy below links to it
and the walk stops, else the parent is copied too and the walk goes on.

Copies move only the layer's own clusters (vdisk_block.layercopy) and keep
its content identity. They are written bottom-up under a temporary name
(``images/.NAME.partial``, which the index never reads), synced, and renamed
into place only when complete: an image the target shows is always whole,
and so is its backing file, so an interrupted run leaves nothing a later run
could wrongly link to. One replicate at a time writes into a target (a lock
file); each run first removes what an interrupted one left behind.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from . import blockpath, qemu_img  # noqa: F401  (blockpath: vdisk_block importable)
from .errors import ContentMismatch, Error

LOCK_NAME = ".replicate.lock"
LOCK_TIMEOUT_S = 60.0

Progress = Callable[[int, int, str], None]      # done bytes, total bytes, label


class ReplicateError(Error):
    msg = "{self.reason}"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass
class Layer:
    source: str                 # the source image (absolute path)
    image: str                  # the target image, relative to the target datastore
    action: str                 # "copied" or "linked"
    bytes_moved: int
    content_id: str | None
    identity: str               # valid, unknown or unsupported
    verified: bool | None = None


def open_target(directory: str) -> Any:
    """The target datastore's catalog; a missing or empty directory becomes one."""
    from vdisk_block.catalog import DB_NAME, Catalog

    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, DB_NAME)):
        return Catalog(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or not _empty(directory)):
        raise ReplicateError(f"{directory} is not a vdisk datastore (and not an empty "
                             "directory); create one with 'vdisk datastore init'")
    os.makedirs(directory, exist_ok=True)
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


def check_names_free(target_dir: str, disks: list[str]) -> None:
    """Refuse disk names the target already has, before anything is done for them
    (a served source would otherwise be snapshotted for nothing)."""
    from vdisk_block.catalog import DB_NAME, Catalog, check_disk_name

    for disk in disks:
        check_disk_name(target_dir, disk)
    if not os.path.exists(os.path.join(target_dir, DB_NAME)):
        return
    catalog = Catalog(target_dir)
    try:
        taken = sorted(set(disks) & {r["name"] for r in catalog.disks()})
    finally:
        catalog.close()
    if taken:
        raise ReplicateError(f"disk {taken[0]!r} already exists on {catalog.dir}")


@contextmanager
def _target_lock(directory: str) -> Iterator[None]:
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


def _remove_partials(catalog: Any) -> list[str]:
    from vdisk_block.catalog import IMAGES, PARTIAL_SUFFIX

    removed = []
    top = catalog.abspath(IMAGES)
    for name in os.listdir(top):
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            os.unlink(os.path.join(top, name))
            removed.append(name)
    return removed


def find_match(catalog: Any, f: Any, exclude: set[str]) -> str | None:
    """An image of the target that may stand for layer f: same valid content ID,
    same virtual size, and not a disk's (writable) top. The index proposes; the
    image's own header, read now, decides."""
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
                and h.size == f.size and _chain_opens(path):
            return rel
    return None


def _chain_opens(path: str) -> bool:
    """Whether the chain below a candidate is whole and unmodified (every file
    there, every recorded parent ID still its parent's)."""
    from vdisk_block.chain import open_chain
    from vdisk_block.errors import ImageError

    try:
        layers = open_chain(path, readonly=True)
    except (OSError, ImageError):
        return False
    for f in layers:
        f.close()
    return True


def replicate(source_top: str, target_dir: str, *, disk: str | None = None,
              verify: bool = False,
              progress: Progress | None = None) -> dict[str, Any]:
    """Replicate the chain whose top is source_top (frozen or not written meanwhile:
    every image is read-locked while it is read) into target_dir; with ``disk``,
    the target gets a disk of that name: a new empty top on the copied chain.

    Everything that can be refused is refused before the target is touched.
    """
    from vdisk_block.catalog import check_disk_name
    from vdisk_block.chain import open_chain

    t0 = time.monotonic()
    if disk is not None:
        check_disk_name(target_dir, disk)
    layers = open_chain(source_top, readonly=True)       # refuses a modified parent
    try:
        inside = os.path.realpath(target_dir) + os.sep
        for f in layers:
            if f.fmt != "qcow2":
                raise ReplicateError(f"{f.path}: only qcow2 images can be replicated, "
                                     f"not {f.fmt}")
            if os.path.realpath(f.path).startswith(inside):
                raise ReplicateError(f"the target is the source datastore: {f.path} is "
                                     f"in {target_dir}")
        catalog = open_target(target_dir)
        try:
            with _target_lock(catalog.dir):
                _remove_partials(catalog)
                if disk is not None and any(r["name"] == disk for r in catalog.disks()):
                    raise ReplicateError(f"disk {disk!r} already exists on {catalog.dir}")
                # a disk's new top is created in the same directory right after the
                # copies, and syncs it: the last copy's rename needs no sync of its own
                results = _copy_chain(catalog, layers, progress, sync_last=disk is None)
                top_rel = results[0].image
                if verify:                  # before a disk names the copies
                    _verify(catalog, results)
                if disk is not None:
                    top_rel = _add_disk(catalog, disk, layers[0], results[0].image)
        finally:
            catalog.close()
    finally:
        for f in layers:
            f.close()
    return {
        "source": os.path.abspath(source_top), "target": catalog.dir, "disk": disk,
        "top": top_rel, "layers": [asdict(r) for r in results],
        "copied": sum(r.action == "copied" for r in results),
        "linked": sum(r.action == "linked" for r in results),
        "bytes_moved": sum(r.bytes_moved for r in results),
        "verified": all(r.verified for r in results) if verify else None,
        "duration_s": time.monotonic() - t0,
    }


def _copy_chain(catalog: Any, layers: list[Any], progress: Progress | None,
                sync_last: bool = True) -> list[Layer]:
    """Plan (copy the top; link at the first parent the target has), then copy
    bottom-up, each image renamed into place only when complete. Top first."""
    from vdisk_block import identity, layercopy
    from vdisk_block.catalog import partial_name
    from vdisk_block.create import fsync_dir

    catalog.scan_images()
    tops = {os.path.realpath(catalog.abspath(r["top"])) for r in catalog.disks()}
    plan: list[tuple[Any, str | None]] = []         # (layer, image it links to)
    for i, f in enumerate(layers):
        match = find_match(catalog, f, tops) if i > 0 else None
        plan.append((f, match))
        if match is not None:
            break
    copies = [f for f, match in plan if match is None]
    names = _target_names(catalog, copies)
    total = sum(layercopy.plan_bytes(f.path) for f in copies)
    done = 0
    below = plan[-1][1]                              # what the deepest copy links to
    results: list[Layer] = []
    if below is not None:
        f = plan[-1][0]
        results.append(Layer(f.path, below, "linked", 0,
                             identity.format_id(f.identity.content_id), f.identity.state))
    for n, (f, rel) in enumerate(reversed(list(zip(copies, names, strict=True)))):
        label = os.path.basename(f.path)

        def step(n: int, label: str = label) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total, label)

        backing = os.path.basename(below) if below else None
        tmp = catalog.abspath(partial_name(rel))
        res = layercopy.copy_layer(f.path, tmp, backing=backing,
                                   backing_format="qcow2" if backing else None, progress=step)
        os.rename(tmp, catalog.abspath(rel))
        if sync_last or n < len(copies) - 1:
            fsync_dir(os.path.dirname(catalog.abspath(rel)))
        results.append(Layer(f.path, rel, "copied", res.bytes_moved,
                             identity.format_id(f.identity.content_id), f.identity.state))
        below = rel
    catalog.scan_images()                           # the target learns the new images
    return results[::-1]


def _target_names(catalog: Any, copies: list[Any]) -> list[str]:
    """Each copy keeps its source's file name where the target has none such,
    else gets a fresh one; all distinct, none existing (nor being written)."""
    from vdisk_block.catalog import IMAGES, partial_name

    names: list[str] = []
    for f in copies:
        name = os.path.basename(f.path)
        rel = os.path.join(IMAGES, name if name.endswith(".qcow2") else name + ".qcow2")
        if rel in names or os.path.lexists(catalog.abspath(rel)) or \
                os.path.lexists(catalog.abspath(partial_name(rel))):
            # images/vm-20261124T232839-0.qcow2 -> vm-<now>-N.qcow2
            stem = re.sub(r"-\d{8}T\d{6}-\d+$", "", rel[len(IMAGES) + 1: -len(".qcow2")])
            rel = next(n for n in catalog.new_image_paths(stem, len(copies) + 1)
                       if n not in names)
        names.append(rel)
    return names


def _add_disk(catalog: Any, disk: str, source_top: Any, top_copy: str) -> str:
    """A new empty top on the copied chain, and the disk naming it."""
    from vdisk_block.catalog import partial_name
    from vdisk_block.create import create_qcow2

    rel = catalog.new_image_path(disk)
    path, tmp = catalog.abspath(rel), catalog.abspath(partial_name(rel))
    create_qcow2(path, source_top.size, cluster_bits=source_top.cluster_bits,
                 backing=os.path.basename(top_copy), backing_format="qcow2",
                 parent_id=source_top.identity.content_id if source_top.identity.valid
                 else None, tmp=tmp)
    try:
        catalog.add_disk(disk, rel)
    except BaseException:
        os.unlink(path)
        raise
    return rel


def _verify(catalog: Any, results: list[Layer]) -> None:
    """Each target image reads (through its chain) as its source does."""
    for r in results:
        try:
            qemu_img.compare(r.source, catalog.abspath(r.image), force_share=True)
        except ContentMismatch:
            r.verified = False
            raise ReplicateError(f"verify: {r.image} on {catalog.dir} differs from "
                                 f"{r.source}") from None
        r.verified = True
