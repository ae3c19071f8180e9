"""Reconstruct a chain on a second datastore by content IDs (docs/replicate.md).

For a chain top -> ... -> base and a target datastore: the top is copied; for
each parent whose source chain below is proven (each image records its
parent's current content ID), an image of the target with a valid, equal
content ID, the same virtual size and a proven chain below is looked for
(replica_target.find_match); if there is one, the copy below links to it and
the walk stops, else the parent is copied too and the walk goes on.

Copies move only the layer's own clusters (vdisk_block.layercopy) and keep
its content identity. They are written bottom-up under a temporary name
(``images/.NAME.partial``, which the index never reads), synced, compared
with their source (--verify), and renamed into place only then: an image
the target shows is always whole (and verified), and so is its backing
file, so an interrupted run leaves nothing a later run could wrongly link
to. One replicate at a time writes into a target (a lock file); each run
first removes what an interrupted one left behind.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any

from . import blockpath, qemu_img  # noqa: F401  (vdisk_block importable; tests patch qemu_img)
from . import replica_target as target
from .replica_commit import Commit, Committer, Job, Layer, VerifyMismatch, verify_copy
from .replica_target import ReplicateError

__all__ = ["Layer", "ReplicateError", "Session", "VerifyMismatch", "check_source"]

Progress = Callable[[int, int, str], None]      # done bytes, total bytes, label


class Session:
    """Replicates chains into one target, one after another, under its lock.

    Each chain's copies are synced and renamed by a committer thread while the
    next layer (or the next chain) is copied; the disk a chain names is added
    once its copies are in place. A later chain may link to an earlier one's
    copy before that copy is committed: it is committed after it. Results, in
    the order of add(), are in ``results`` once the session ends.
    """

    def __init__(self, target_dir: str, *, verify: bool = False,
                 progress: Progress | None = None) -> None:
        self.target_dir = target_dir
        self.verify = verify
        self.progress = progress
        self.results: list[dict[str, Any]] = []
        self.catalog: Any = None
        self._stack = ExitStack()
        self._committer = Committer()
        self._jobs: list[Job] = []                 # added, disk not yet added
        self._own: dict[tuple[bytes, int], str] = {}   # (ID, size) -> copy made here
        self._names: set[str] = set()               # image names taken by this session
        self._disks: set[str] = set()
        self._stopped = False                       # a chain failed: finish none after it

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.finish()
        except Exception as e:
            if exc is None or e is exc:
                raise
            if isinstance(exc, Exception):
                # a chain before the one that stopped the session failed while
                # being finished: its error comes first, and neither is lost
                raise ReplicateError(f"{describe(e)}; then {describe(exc)}") from exc
            # (an interrupt is reported as such)
        finally:
            self._stack.close()

    def open(self) -> None:
        """Open the target (creating a missing or empty directory as a datastore)
        and take its lock; refuses a target that is no datastore. Callers that
        change the source first (a snapshot) call it before they do."""
        if self.catalog is None:
            # the lock first: replicates racing to make one new target take turns
            from vdisk_block.usage import images_lock

            directory = target.prepare_target(self.target_dir)
            self._stack.enter_context(target.target_lock(directory))
            catalog = target.open_target(directory)
            # no image of the target is deleted while copies may link to it
            self._stack.enter_context(images_lock(directory, "vdisk replicate"))
            self._stack.callback(catalog.close)
            target.remove_partials(catalog)
            self.catalog = catalog

    def check_disks(self, disks: list[str]) -> None:
        """Refuse, before anything is done for them, disk names that are invalid,
        given twice, or that the target has but cannot refresh (see add())."""
        from vdisk_block.catalog import check_disk_name

        for disk in disks:
            check_disk_name(self.target_dir, disk)
        if len(set(disks)) != len(disks):
            raise ReplicateError(f"disk {next(d for d in disks if disks.count(d) > 1)!r} "
                                 "is named twice")
        self.open()
        have = {r["name"] for r in self.catalog.disks()}
        for disk in disks:
            if disk in have:
                target.check_refresh(self.catalog, disk)

    def add(self, source_top: str, disk: str | None = None) -> None:
        """Replicate the chain whose top is source_top (frozen or not written
        meanwhile: every image is read-locked while it is read); with ``disk``,
        the target gets a disk of that name: a new empty top on the copied chain.
        A disk the target has already is refreshed: moved to that new top, its
        old top removed, if the old top holds no data and the target is not
        served (replica_target.check_refresh).

        Everything that can be refused is refused before the target is touched.
        """
        from vdisk_block.catalog import check_disk_name
        from vdisk_block.chain import open_chain

        t0 = time.monotonic()
        if disk is not None:
            check_disk_name(self.target_dir, disk)
        layers = open_chain(source_top, readonly=True)   # refuses a modified parent
        try:
            inside = os.path.realpath(self.target_dir) + os.sep
            for f in layers:
                if f.fmt != "qcow2":
                    raise ReplicateError(f"{f.path}: only qcow2 images can be replicated, "
                                         f"not {f.fmt}")
                if os.path.realpath(f.path).startswith(inside):
                    raise ReplicateError(f"the target is the source datastore: {f.path} is "
                                         f"in {self.target_dir}")
            self.open()
            catalog = self.catalog
            if disk is not None and disk in self._disks:
                raise ReplicateError(f"disk {disk!r} already exists on {catalog.dir}")
            replaces = None
            if disk is not None and any(r["name"] == disk for r in catalog.disks()):
                replaces = target.check_refresh(catalog, disk)
            top = layers[0]
            job = Job(os.path.abspath(source_top), disk,
                       (top.size, top.cluster_bits,
                        top.identity.content_id if top.identity.valid else None),
                       [], replaces=replaces, t0=t0)
            try:
                self._jobs.append(job)
                if disk is not None:
                    self._disks.add(disk)
                self._copy_chain(job, layers)
            except BaseException:
                # what it queued is committed all the same (whole images, as when
                # each copy was renamed at once); the chain itself is not finished
                if job in self._jobs:
                    self._jobs.remove(job)
                raise
        finally:
            for f in layers:
                f.close()
        self._collect(every=False)

    def finish(self) -> None:
        """Wait for every copy to be in place; add the disks; raise the first error.
        After a chain failed, the chains queued behind it are not finished."""
        try:
            self._committer.stop()
            if not self._stopped:
                self._collect(every=True)
        finally:
            if self.catalog is not None:
                # under the lock every temporary file is this session's: what a
                # failure abandoned, or a copy cut short
                target.remove_partials(self.catalog)

    def _copy_chain(self, job: Job, layers: list[Any]) -> None:
        """Plan (copy the top; link at the first parent the target has), then copy
        bottom-up, each copy queued for the committer as soon as it is written."""
        from vdisk_block import identity, layercopy
        from vdisk_block.catalog import partial_name

        catalog = self.catalog
        catalog.scan_images()
        tops = {os.path.realpath(catalog.abspath(r["top"])) for r in catalog.disks()}
        # a layer may be linked only where the source chain below it is proven:
        # else its parent may have changed since a copy of it was made
        ids = [f.identity for f in layers]
        plan: list[tuple[Any, str | None]] = []         # (layer, image it links to)
        proven: dict[int, bool] = {}                    # id(layer) -> chain below proven
        for i, f in enumerate(layers):
            proven[id(f)] = identity.chain_proven(ids[i:])
            match = self._match(f, tops) if i > 0 and proven[id(f)] else None
            plan.append((f, match))
            if match is not None:
                break
        copies = [f for f, match in plan if match is None]
        names = self._target_names(copies)
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
                if self.progress is not None:
                    self.progress(done, total, label)

            backing = os.path.basename(below) if below else None
            tmp = catalog.abspath(partial_name(rel))
            if self._committer.failed is not None:
                raise self._committer.failed        # nothing more would be committed
            res = layercopy.copy_layer(f.path, tmp, backing=backing,
                                       backing_format="qcow2" if backing else None,
                                       progress=step, sync=False)
            assert res.fd is not None
            last = n == len(copies) - 1
            layer = Layer(f.path, rel, "copied", res.bytes_moved,
                          identity.format_id(f.identity.content_id), f.identity.state)
            results.append(layer)
            # a disk's new top is created in the same directory right after the
            # copies, and syncs it: the last copy's rename needs no sync of its own
            self._committer.submit(Commit(res.fd, tmp, catalog.abspath(rel),
                                           sync_dir=not last or job.disk is None,
                                           job=job, last=last, layer=layer,
                                           verify=self.verify))
            if f.identity.valid and proven[id(f)]:
                self._own.setdefault((f.identity.content_id, f.size), rel)
            below = rel
        job.results = results[::-1]

    def _match(self, f: Any, tops: set[str]) -> str | None:
        """For a layer whose source chain below is proven: a copy this session made
        of such a layer (committed or queued), else find_match."""
        if f.identity.valid and (f.identity.content_id, f.size) in self._own:
            return self._own[(f.identity.content_id, f.size)]
        return target.find_match(self.catalog, f, tops)

    def _discard(self, reason: BaseException) -> None:
        """A copy differs from its source: it must never be linked to. Remove the
        copies of the chain being finished and of every chain queued behind it
        (which may link to them, and will not be finished), once no more of
        them can be put in place."""
        from vdisk_block.catalog import IMAGES
        from vdisk_block.files import fsync_dir

        self._committer.abort(reason)
        self._committer.stop()
        for job in self._jobs:
            for r in job.results:
                if r.action == "copied":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.catalog.abspath(r.image))
        fsync_dir(self.catalog.abspath(IMAGES))
        self.catalog.scan_images()

    def _target_names(self, copies: list[Any]) -> list[str]:
        names = target.target_names(self.catalog, copies, taken=self._names)
        self._names.update(names)
        return names

    def _collect(self, *, every: bool) -> None:
        """Finish the chains whose copies are in place, in order: the target learns
        them, --verify compares them, and a disk is added on each. ``every``: all
        of them, the committer being stopped. The first failure stops the session:
        the commits not yet made are abandoned."""
        try:
            while self._jobs and (every or self._jobs[0].done.is_set()):
                self._finish_job(self._jobs[0])
                self._jobs.pop(0)
        except BaseException as e:
            self._stopped = True
            self._committer.abort(e)
            raise

    def _finish_job(self, job: Job) -> None:
        if not job.done.is_set():                   # only once the committer stopped
            raise ReplicateError(f"{job.source}: replicate stopped before its copies "
                                 "were all written")
        if job.error is not None:
            if isinstance(job.error, VerifyMismatch):
                self._discard(job.error)
            raise job.error
        self.catalog.scan_images()                  # the target learns the new images
        if self.verify:
            # the copies were verified before they were put in place; an image
            # the target had, which the chain links to, is compared here,
            # before a disk names it
            try:
                _verify_linked(self.catalog, job.results)
            except VerifyMismatch as e:
                self._discard(e)
                raise
        top_rel = job.results[0].image
        if job.replaces is not None:
            assert job.disk is not None
            top_rel = target.move_disk(self.catalog, job.disk, job.top, top_rel, job.replaces)
        elif job.disk is not None:
            top_rel = target.add_disk(self.catalog, job.disk, job.top, top_rel)
        results = job.results
        self.results.append({
            "source": job.source, "target": self.catalog.dir, "disk": job.disk,
            "top": top_rel, "previous_top": job.replaces,
            "layers": [asdict(r) for r in results],
            "copied": sum(r.action == "copied" for r in results),
            "linked": sum(r.action == "linked" for r in results),
            "bytes_moved": sum(r.bytes_moved for r in results),
            "verified": all(r.verified for r in results) if self.verify else None,
            "duration_s": time.monotonic() - job.t0,
        })


def check_source(top: str) -> None:
    """Refuse a source chain that is not whole, or whose parent changed since its
    child recorded it, from the headers alone (no locks: a served disk's top is
    its server's). Session.add() opens the chain, locked, and checks it again;
    this lets a caller refuse before it touches the target or the source."""
    from vdisk_block import identity
    from vdisk_block.chain import chain_paths

    paths = chain_paths(top)
    ids = [identity.read(p)[1] for p in paths]
    for i in range(len(paths) - 1):
        identity.check_link(paths[i], ids[i], paths[i + 1], ids[i + 1])


def describe(e: BaseException) -> str:
    """An error as one reason (an OSError names its file, as the CLI shows it)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def _verify_linked(catalog: Any, results: list[Layer]) -> None:
    for r in results:
        if r.action == "linked":
            path = catalog.abspath(r.image)
            verify_copy(r, path, path)
