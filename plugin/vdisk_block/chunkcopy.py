"""Moving the data of one chunk of a consolidation's copy, without the disk lock.

Under the lock, the copy claims a chunk: where its guest bytes lie in the
served chain's files (Disk.locate) and where they go in the target's top
file (Disk.place). The bytes then move file to file, by copy_file_range
where the file systems allow it, through a buffer where not:

    guest bytes  [offset ..................................... offset+length)
    source       [ top file @h1 ][ zeros ][ frozen layer @h2 ][ top @h3 ]
    target       [ cluster in place @t1  ][ allocated by the claim @t2   ]
    moved        [  a  ][   b   ][   c   ][ d  ][      e     ][   f     ]

Nothing here touches the images' metadata, and no interpreter lock is held
while the kernel copies. InFlight keeps the order: the range of the chunk in
flight, which guest changes wait for, and a count of the work done without
the disk lock, which whoever closes the target drains first.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from .disk import Placement
from .errors import RequestError

WAIT_S = 30.0           # bound of every wait for work in flight

# copy_file_range is refused between some file systems: copy through a buffer
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


@dataclass
class Chunk:
    """Guest bytes [offset, offset + length), read from the pieces src
    ((pos, length, fd or -1 for zeros, host offset), see Disk.locate) and
    written to dst."""

    offset: int
    length: int
    src: list[tuple[int, int, int, int]]
    dst: Placement


class InFlight:
    """A copy's work in flight, against the disk lock ``lock``."""

    def __init__(self, lock: threading.RLock, path: str) -> None:
        self.path = path
        self.claimed: tuple[int, int] | None = None   # guest bytes [first, end)
        self._settled = threading.Condition(lock)
        self._io = 0
        self._idle = threading.Condition()

    def claim(self, first: int, end: int) -> None:
        """Under the disk lock: a chunk's range is in flight, its I/O begins."""
        self.claimed = (first, end)
        self.io_begin()

    def settled(self) -> None:
        """Under the disk lock: the chunk is done; waiting changes go on."""
        self.claimed = None
        self._settled.notify_all()

    def let_go(self) -> None:
        """Under the disk lock: the job ends; waiting changes go on without it."""
        self._settled.notify_all()

    def wait(self, offset: int, length: int) -> bool:
        """Under the disk lock: wait (the lock released) while the chunk in
        flight overlaps [offset, offset + length). Returns whether it waited."""
        busy = self.claimed
        if busy is None or offset >= busy[1] or offset + length <= busy[0]:
            return False
        if not self._settled.wait(WAIT_S):
            raise RequestError(self.path, f"a copy in flight did not end in {WAIT_S:g} s")
        return True

    def io_begin(self) -> None:
        """Under the disk lock, before work on the target without it."""
        with self._idle:
            self._io += 1

    def io_end(self) -> None:
        with self._idle:
            self._io -= 1
            self._idle.notify_all()

    def drain(self) -> None:
        """Under the disk lock: wait until no work runs without it."""
        with self._idle:
            if not self._idle.wait_for(lambda: not self._io, WAIT_S):
                raise RequestError(self.path, f"a copy still in flight after {WAIT_S:g} s")


def transfer(c: Chunk, zeros: bytes) -> None:
    """Move the data of a claimed chunk, piece by piece (zeros: at least
    c.length zero bytes)."""
    dst = iter(c.dst.pieces)
    d_off, d_len, d_host = next(dst)
    for pos, length, fd, host in c.src:
        at = c.offset + pos
        while length:
            if at >= d_off + d_len:
                d_off, d_len, d_host = next(dst)
                continue
            k = min(length, d_off + d_len - at)
            copy_range(fd, host, c.dst.fd, d_host + at - d_off, k, zeros)
            at, host, length = at + k, host + k, length - k


def copy_range(src: int, src_off: int, dst: int, dst_off: int, n: int, zeros: bytes) -> None:
    """n bytes from src to dst; src -1 reads zeros, and so does its end of file."""
    done = 0
    while src >= 0 and done < n:
        try:
            got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            buf = bytearray(n - done)
            got = os.preadv(src, [buf], src_off + done)
            pwrite_all(dst, memoryview(buf)[:got], dst_off + done)
        if not got:
            break
        done += got
    if done < n:
        pwrite_all(dst, memoryview(zeros)[:n - done], dst_off + done)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
