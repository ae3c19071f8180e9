"""Run ``vdisk`` stopped at a chosen point of a disk create or import, for the
kill tests.

    python clipause.py POINT MARKER vdisk-arguments...

Runs the ``vdisk`` command line in this process with one hook installed; when
the run reaches POINT the hook creates the file MARKER (holding the pid) and
sleeps, so the test can SIGKILL the process exactly there. Nothing else of
the command changes. Points (N counts from 1):

    qemu-img:SUB:N   before the Nth ``qemu-img SUB`` (convert, rebase) runs
    rename:N         before the Nth image is renamed into place (its temporary
                     written and synced)
    add-disk         every image in place, the catalog not told yet
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

PAUSE_S = 600       # the test kills the process long before


def main() -> int:
    point, marker, *argv = sys.argv[1:]

    def pause() -> None:
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(marker + ".tmp", marker)
        time.sleep(PAUSE_S)
        os._exit(99)

    from vdisk import (
        blockpath,  # noqa: F401  (vdisk_block importable)
        qemu_img,
    )
    from vdisk.cli import main as vdisk_main
    from vdisk_block import files
    from vdisk_block.catalog import Catalog

    kind, _, rest = point.partition(":")
    counts: dict[str, int] = {}

    def reached(key: str, nth: int) -> None:
        counts[key] = counts.get(key, 0) + 1
        if counts[key] == nth:
            pause()

    if kind == "qemu-img":
        sub, _, nth = rest.partition(":")
        run = qemu_img.run

        def counted_run(args: Any, **kwargs: Any) -> Any:
            if args and args[0] == sub:
                reached(sub, int(nth))
            return run(args, **kwargs)

        qemu_img.run = counted_run          # type: ignore[assignment]
    elif kind == "rename":
        rename = files.rename_noreplace

        def counted_rename(src: str, dst: str) -> None:
            reached("rename", int(rest))
            rename(src, dst)

        files.rename_noreplace = counted_rename
    elif kind == "add-disk":
        add_disk = Catalog.add_disk

        def paused_add_disk(self: Catalog, *args: Any, **kwargs: Any) -> None:
            pause()
            add_disk(self, *args, **kwargs)

        Catalog.add_disk = paused_add_disk  # type: ignore[method-assign]
    else:
        raise SystemExit(f"clipause: unknown point {point!r}")
    return vdisk_main(argv)


if __name__ == "__main__":
    sys.exit(main())
