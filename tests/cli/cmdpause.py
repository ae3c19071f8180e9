"""Run ``vdisk`` held at a chosen point of a job, for the ownership tests.

    python cmdpause.py POINT MARKER RELEASE vdisk-arguments...

Runs the ``vdisk`` command line in this process with one hook installed: when
the run reaches POINT the hook creates the file MARKER (holding the pid) and
waits until the file RELEASE exists (at most HOLD_S), then goes on. Nothing
else of the command changes. Points:

    consolidate-copy   an offline consolidation, its copy pass not yet started
                       (the job is journalled, its target created)
    consolidate-start  an offline consolidation journalled, its target not made yet
    pivoted            a consolidation's pivot recorded, what it dropped not deleted
    backup-copy        a backup, snapshot taken and journalled, before the copy
    clone-add          a linked clone made, its backing image closed, the catalog
                       not yet naming it (the images lock held)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

HOLD_S = 120


def main() -> int:
    point, marker, release, *argv = sys.argv[1:]

    def hold() -> None:
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(marker + ".tmp", marker)
        deadline = time.monotonic() + HOLD_S
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)

    from vdisk import blockpath, qemu_img  # noqa: F401  (vdisk_block importable)
    from vdisk.cli import main as vdisk_main
    from vdisk_block.mirror import MirrorJob

    if point == "consolidate-copy":
        copy_pass = MirrorJob._copy_pass

        def held_copy_pass(self: MirrorJob) -> None:
            hold()
            copy_pass(self)

        MirrorJob._copy_pass = held_copy_pass    # type: ignore[method-assign]
    elif point == "consolidate-start":
        start = MirrorJob.start

        def held_start(self: MirrorJob) -> Any:
            hold()
            return start(self)

        MirrorJob.start = held_start             # type: ignore[method-assign]
    elif point == "pivoted":
        from vdisk_block import recovery

        finish_pivot = recovery.finish_pivot

        def held_finish(*args: Any, **kwargs: Any) -> None:
            hold()
            finish_pivot(*args, **kwargs)

        recovery.finish_pivot = held_finish      # type: ignore[assignment]
    elif point == "backup-copy":
        run = qemu_img.run

        def held_run(args: Any, **kwargs: Any) -> Any:
            if args and args[0] == "convert":
                hold()
            return run(args, **kwargs)

        qemu_img.run = held_run                  # type: ignore[assignment]
    elif point == "clone-add":
        from vdisk_block.catalog import Catalog

        add_disk = Catalog.add_disk

        def held_add(self: Catalog, *args: Any, **kwargs: Any) -> Any:
            hold()
            return add_disk(self, *args, **kwargs)

        Catalog.add_disk = held_add              # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown point {point!r}")
    return vdisk_main(argv)


if __name__ == "__main__":
    sys.exit(main())
