"""Which images of a datastore something still needs, and the lock under
which images are linked to and deleted.

An image is needed while a disk's chain or a named snapshot's chain goes
through it. Chains are read from the headers (chain.chain_walk), through
images the block driver refuses; a chain that cannot be followed to its end
(a missing or unreadable file) may need any image below the break, so then
nothing is known to be unneeded: the images stay (a disk that cannot be
read holds up deletions until it is mended or removed).

Deleting an image is decided and done under DIR/locks/images.lock, and so is
creating a new link to an image (a linked clone, a replica linking to an
image the target has): the image a clone starts from is then never deleted
between the check that it is unneeded and the unlink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator

from . import owner, snapshots
from .catalog import Catalog
from .chain import chain_walk

log = logging.getLogger(__name__)

IMAGES_LOCK = "images.lock"
LOCK_TIMEOUT_S = 60.0


@contextlib.contextmanager
def images_lock(directory: str, what: str | None = None,
                timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the datastore's images lock (waiting for it, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lock = owner.Lock(directory, IMAGES_LOCK, what or owner.describe_self(),
                              "the datastore's images are being changed by {holder}")
            break
        except owner.Busy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
    try:
        yield
    finally:
        lock.close()


def needed(catalog: Catalog, besides: str | None = None) -> tuple[set[str], bool]:
    """The real paths of the images that the disks' chains (but disk ``besides``)
    and every named snapshot's chain go through, and whether every one of
    those chains could be followed to its end."""
    out: set[str] = set()
    complete = True
    tops = [catalog.abspath(r["top"]) for r in catalog.disks() if r["name"] != besides]
    tops += [catalog.abspath(s["image"]) for s in snapshots.all_rows(catalog)
             if s["disk"] != besides]
    for top in tops:
        paths, whole = chain_walk(top)
        out.update(os.path.realpath(p) for p in paths)
        complete = complete and whole
    return out, complete


def unneeded(catalog: Catalog, paths: Iterable[str], besides: str | None = None,
             tops: Iterable[str] = ()) -> list[str]:
    """Those of paths nothing needs (see needed). While a chain cannot be
    followed to its end it may need any image, so then only ``tops`` may go:
    images that were a disk's writable top until now (no image was made on
    them: a snapshot would have made them frozen layers)."""
    used, complete = needed(catalog, besides)
    tops = {os.path.realpath(p) for p in tops}
    return [p for p in paths if os.path.realpath(p) not in used and
            (complete or os.path.realpath(p) in tops)]


def delete(catalog: Catalog, paths: list[str], besides: str | None = None,
           tops: Iterable[str] = ()) -> list[str]:
    """Under the images lock: delete those of paths nothing needs (unneeded);
    returns them (relative to the datastore)."""
    deleted: list[str] = []
    try:
        lock = images_lock(catalog.dir)
        lock.__enter__()
    except owner.Busy as e:         # (a long replicate into the datastore links images)
        log.warning("%s: not deleting %s: %s", catalog.dir, ", ".join(paths), e)
        return deleted
    try:
        for p in unneeded(catalog, paths, besides, tops):
            try:
                os.unlink(p)
            except FileNotFoundError:
                continue
            deleted.append(catalog.relpath(p))
    finally:
        lock.__exit__(None, None, None)
    return deleted
