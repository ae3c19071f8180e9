"""The ``vdisk`` command with a slowed job, for the multi-process and kill tests.

    python slowvdisk.py ARGS...      (same arguments as ``vdisk``)

``VDISK_TEST_COPY_DELAY`` (seconds): every chunk of a job's copy pass waits
this long first (the copy thread is the one named ``vdisk-mirror``), so that
other processes and signals reach the job while it copies.

``VDISK_TEST_HOLD`` (``phase:seconds,...``): after the catalog records a
phase, the command waits this long, so a test sees the phase in the catalog
and acts in it. Phases: a job state the journal records (``copying``,
``ready``, ``done``...), ``pivoted`` (the disk's new top and the pivot
recorded in one step), ``barrier`` (the pivot's barrier, just before that
step: the journal still says ready; the hold creates the file
``VDISK_TEST_RELEASE.barrier`` as it starts), ``snapshot`` (any other new
top) and ``creating`` (a new image written under its temporary name, before
the rename: held in its fsync). A hold ends early once the file named by
``VDISK_TEST_RELEASE`` exists (a test that signals the command creates it,
so that a command unwinding on SIGTERM is not kept waiting).

Only test timing changes; the command is the product's ``vdisk.cli.main``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from vdisk import blockpath  # noqa: F401  (makes vdisk_block importable)
from vdisk_block import create
from vdisk_block.catalog import Catalog
from vdisk_block.disk import Disk


def _slow_copy(delay: float) -> None:
    for name in ("write", "zero"):
        orig = getattr(Disk, name)

        def slowed(self: Disk, *args: Any, _orig: Any = orig, **kw: Any) -> Any:
            if threading.current_thread().name == "vdisk-mirror":
                time.sleep(delay)
            return _orig(self, *args, **kw)

        setattr(Disk, name, slowed)


def _hold(spec: str, release: str | None) -> None:
    holds = {k: float(v) for k, v in (item.split(":") for item in spec.split(",") if item)}
    update_job, set_top = Catalog.update_job, Catalog.set_top

    def held_update(self: Catalog, job: int, **fields: Any) -> None:
        update_job(self, job, **fields)
        _wait(holds.get(str(fields.get("state")), 0), release)

    def held_set_top(self: Catalog, name: str, top: str, job: int | None = None,
                     **fields: Any) -> None:
        if fields.get("state") == "pivoting" and "barrier" in holds:
            if release:
                with open(f"{release}.barrier", "w"):
                    pass
            _wait(holds["barrier"], release)
        set_top(self, name, top, job, **fields)
        _wait(holds.get("pivoted" if fields.get("state") == "pivoting" else "snapshot", 0),
              release)

    Catalog.update_job = held_update        # type: ignore[method-assign]
    Catalog.set_top = held_set_top          # type: ignore[method-assign]
    if "creating" in holds:
        create.os = _HeldFsync(holds["creating"], release)   # type: ignore[assignment]


def _wait(hold: float, release: str | None) -> None:
    """Sleep up to hold seconds; at once when the release file exists."""
    end = time.monotonic() + hold
    while time.monotonic() < end and not (release and os.path.exists(release)):
        time.sleep(0.01)


class _HeldFsync:
    """The os module as create.py sees it; fsync of a ``.creating`` file waits first."""

    def __init__(self, hold: float, release: str | None) -> None:
        self.hold = hold
        self.release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".creating"):
            _wait(self.hold, self.release)
        os.fsync(fd)


def main() -> int:
    delay = float(os.environ.get("VDISK_TEST_COPY_DELAY", "0"))
    if delay:
        _slow_copy(delay)
    if os.environ.get("VDISK_TEST_HOLD"):
        _hold(os.environ["VDISK_TEST_HOLD"], os.environ.get("VDISK_TEST_RELEASE"))
    from vdisk.cli import main as vdisk_main
    return vdisk_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
