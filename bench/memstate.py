"""The state of the guest's free memory before a measurement (``--memory``).

On a VM that hands free memory back to the hypervisor (virtio-balloon free
page reporting), the first touch of a page left free for a few seconds costs
a fault in the host: filling page-cache pages then costs ~10x more than
reusing pages freed a moment ago. A writer through the page cache is fast
or slow depending on what ran just before it; these modes make that a stated
condition of the run (see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

MODES = ("settled", "primed", "as-is")
SETTLE_S = 8.0          # freed memory is handed back within this (page reporting: 2 s rounds)
BLOCK = 8 << 20


def add_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--memory", choices=MODES, default=default,
        help="free memory before each measurement: settled = wait until what was freed "
             "is handed back to the hypervisor, primed = read and drop a ballast file as "
             "large as the data just before, as-is = start at once "
             f"(default {default}; see bench/README.md)")


class MemoryState:
    """``as-is``: start at once, in whatever memory the previous run just freed.
    ``settled``: wait SETTLE_S, so that memory freed before has been handed back:
    every page-cache page a writer fills is memory the host supplies afresh.
    ``primed``: read a ballast file of ``nbytes`` into the page cache and drop
    it just before, so that a writer through the page cache reuses memory the
    host already backs, as right after a file that size was deleted (its best
    case)."""

    def __init__(self, mode: str, ballast: Path, nbytes: int) -> None:
        self.mode = mode
        self.ballast = ballast
        if mode == "primed":
            _write_ballast(ballast, nbytes)

    def prepare(self) -> None:
        if self.mode == "settled":
            time.sleep(SETTLE_S)
        elif self.mode == "primed":
            fd = os.open(self.ballast, os.O_RDONLY)
            try:
                while os.read(fd, BLOCK):
                    pass
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _write_ballast(path: Path, nbytes: int) -> None:
    """nbytes of non-zero data (so that it is allocated), synced."""
    block = b"\xa5" * BLOCK
    with open(path, "wb") as f:
        for _ in range(-(-nbytes // BLOCK)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
