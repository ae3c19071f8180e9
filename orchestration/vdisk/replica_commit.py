"""What replicate.Session hands over once a copy is written: the committer syncs
each copy, verifies it (--verify) and renames it into place, in order, in a
thread of its own (docs/replicate.md, "What a copy is").
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from . import blockpath, qemu_img  # noqa: F401  (blockpath: vdisk_block importable)
from . import replica_target as target
from .errors import ContentMismatch
from .replica_target import ReplicateError


class VerifyMismatch(ReplicateError):
    """--verify found a copy that reads otherwise than its source."""


@dataclass
class Layer:
    source: str                 # the source image (absolute path)
    image: str                  # the target image, relative to the target datastore
    action: str                 # "copied" or "linked"
    bytes_moved: int
    content_id: str | None
    identity: str               # valid, unknown or unsupported
    verified: bool | None = None


@dataclass
class Job:
    """One chain being replicated: its copies, bottom-up, and what follows them."""

    source: str
    disk: str | None
    top: target.SourceTop                       # source top: size, cluster bits, valid ID
    results: list[Layer]                        # top first
    replaces: str | None = None                 # the old top of a disk the target has
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.monotonic)


@dataclass
class Commit:
    fd: int                     # the copy, open since it was written; closed by the committer
    tmp: str
    path: str
    sync_dir: bool
    job: Job
    last: bool
    layer: Layer                # what the job reports of the copy
    verify: bool                # compare it with its source before it is put in place


class Committer:
    """Syncs finished copies, verifies them (--verify) and renames them into
    place, in the order they were queued, in a thread of its own: the disk
    writes one copy back while the next is being copied (a copy only starts
    its writeback).

    Order is what keeps a target whole: a copy is renamed only after the
    image below it (queued before it), so it is compared through its chain
    while still under its temporary name, which nothing links to: a copy is
    never visible, hence never matchable, before it is verified. Nothing is
    renamed after a failure: every commit queued after one that failed (or
    after abort()) is abandoned, its file left under its temporary name for
    the caller to remove. A final name is never replaced.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Commit | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    def submit(self, commit: Commit) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="replicate-commit",
                                            daemon=True)
            self._thread.start()
        self._queue.put(commit)

    def abort(self, reason: BaseException) -> None:
        """Abandon every commit not yet started."""
        if self.failed is None:
            self.failed = reason

    def stop(self) -> None:
        """Wait until everything queued is committed or abandoned."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        from vdisk_block import files

        while (c := self._queue.get()) is not None:
            try:
                if self.failed is None:
                    # the descriptor that wrote the copy: its fsync reports any
                    # writeback error, which a fresh open could miss
                    os.fsync(c.fd)
                    if c.verify:
                        verify_copy(c.layer, c.tmp, c.path)
                    files.rename_noreplace(c.tmp, c.path)
                    if c.sync_dir:
                        files.fsync_dir(os.path.dirname(c.path))
            except BaseException as e:              # noqa: BLE001  (reported by the job)
                self.failed = e
            finally:
                with contextlib.suppress(OSError):
                    os.close(c.fd)
            if self.failed is not None and c.job.error is None:
                c.job.error = self.failed
            if c.last or c.job.error is not None:
                c.job.done.set()


def verify_copy(layer: Layer, image: str, shown_as: str) -> None:
    """The target image reads (through its chain) as its source does; else
    VerifyMismatch, naming the image as shown_as."""
    try:
        qemu_img.compare(layer.source, image, force_share=True)
    except ContentMismatch:
        layer.verified = False
        raise VerifyMismatch(f"verify: {shown_as} differs from {layer.source}") from None
    layer.verified = True
