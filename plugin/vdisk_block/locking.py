"""QEMU-compatible image locking with OFD locks.

QEMU (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes) takes
shared OFD locks on single bytes of the image file:

    byte 100 + i   held while the opener USES permission i
    byte 200 + i   held while the opener does NOT SHARE permission i

and before proceeding tests for conflicts: an exclusive lock on 100 + i must be
possible for every permission it does not share, and on 200 + i for every
permission it uses. Permission bits: 0 consistent read, 1 write, 2 write
unchanged, 3 resize. Locks belong to the open file description, so they stay
with the descriptor (and across nbdkit's fork) and go away when it is closed.
"""

from __future__ import annotations

import errno
import fcntl
import struct

from .errors import ImageLocked

PERM_BASE = 100
SHARED_BASE = 200
PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_ALL = 0xF
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")

# struct flock on x86_64/aarch64 Linux: short, short, off_t, off_t, pid_t
_FLOCK = struct.Struct("hh4xqqi4x")


def _lock(fd: int, cmd: int, kind: int, offset: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, 0, offset, 1, 0))
    return _FLOCK.unpack(res)[0] if cmd == fcntl.F_OFD_GETLK else kind


def _conflicts(fd: int, offset: int) -> bool:
    return _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def lock_image(fd: int, path: str, perm: int, shared: int) -> None:
    """Take QEMU's lock bytes for `perm` while sharing `shared`, or raise ImageLocked."""
    try:
        for i in range(len(PERM_NAMES)):
            bit = 1 << i
            # set every byte to its wanted state, so that this also downgrades
            _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK if perm & bit else fcntl.F_UNLCK,
                  PERM_BASE + i)
            _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK if shared & bit else fcntl.F_RDLCK,
                  SHARED_BASE + i)
        for i, name in enumerate(PERM_NAMES):
            bit = 1 << i
            if not shared & bit and _conflicts(fd, PERM_BASE + i):
                raise ImageLocked(path, f'another process holds the "{name}" permission')
            if perm & bit and _conflicts(fd, SHARED_BASE + i):
                raise ImageLocked(path, f'another process does not share "{name}"')
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLocked(path, "a conflicting lock is held") from None
        raise


def lock_for_write(fd: int, path: str) -> None:
    """What QEMU takes for a writable qcow2 image: others may only read."""
    lock_image(fd, path, PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
               PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)


def lock_for_read(fd: int, path: str) -> None:
    """What QEMU takes for a backing file: nobody may change it meanwhile."""
    lock_image(fd, path, PERM_CONSISTENT_READ, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))
