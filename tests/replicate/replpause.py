"""Run ``vdisk`` stopped at a chosen point of a replicate, for the kill tests.

    python replpause.py POINT MARKER vdisk-arguments...

Runs the ``vdisk`` command line in this process with one hook installed; when
the run reaches POINT the hook creates the file MARKER (holding the pid) and
sleeps, so the test can SIGKILL the process exactly there. Nothing else of
the command changes. Points:

    target-init   creating the target datastore, images/ made, vdisk.db not yet
    copy:N        the Nth layer copy (bottom-up), its first chunk written
    renamed:N     just after the Nth copy was renamed into place
    creating      the disk's new top written under its .partial name, not linked
    add-disk      the disk's new top in place, the catalog not told yet
    verify:N      --verify comparing the Nth image (default the first): a copy is
                  compared under its .partial name, before it is renamed
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
    from vdisk_block import files, layercopy
    from vdisk_block.catalog import Catalog

    kind, _, nth = point.partition(":")
    n = int(nth) if nth else 0
    count = {"copy": 0, "rename": 0, "compare": 0}

    if kind == "target-init":
        connect = Catalog._connect

        def paused_connect(path: str) -> Any:
            if not os.path.exists(path):
                pause()
            return connect(path)

        Catalog._connect = staticmethod(paused_connect)   # type: ignore[method-assign]
    elif kind == "copy":
        copy_layer = layercopy.copy_layer

        def counted_copy(*args: Any, progress: Any = None, **kwargs: Any) -> Any:
            count["copy"] += 1
            mine = count["copy"]

            def step(done: int) -> None:
                if progress is not None:
                    progress(done)
                if mine == n:
                    pause()

            return copy_layer(*args, progress=step, **kwargs)

        layercopy.copy_layer = counted_copy
    elif kind == "renamed":
        rename = files.rename_noreplace

        def counted_rename(src: Any, dst: Any) -> None:
            rename(src, dst)
            if str(src).endswith(".partial"):
                count["rename"] += 1
                if count["rename"] == n:
                    pause()

        files.rename_noreplace = counted_rename
    elif kind == "creating":
        from vdisk_block.files import OwnedTemp

        commit = OwnedTemp.commit

        def paused_commit(self: OwnedTemp) -> None:
            if self.path.endswith(".partial"):     # create_qcow2(tmp=...) renames it
                pause()
            commit(self)

        OwnedTemp.commit = paused_commit        # type: ignore[method-assign]
    elif kind == "add-disk":
        add_disk = Catalog.add_disk

        def paused_add_disk(self: Catalog, *args: Any, **kwargs: Any) -> None:
            pause()
            add_disk(self, *args, **kwargs)

        Catalog.add_disk = paused_add_disk      # type: ignore[method-assign]
    elif kind == "verify":
        compare = qemu_img.compare

        def paused_compare(*args: Any, **kwargs: Any) -> None:
            count["compare"] += 1
            if count["compare"] == max(n, 1):
                pause()
            compare(*args, **kwargs)

        qemu_img.compare = paused_compare
    else:
        raise SystemExit(f"unknown pause point {point!r}")
    return vdisk_main(argv)


if __name__ == "__main__":
    sys.exit(main())
