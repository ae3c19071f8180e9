"""File primitives every writer of a datastore shares: put a finished file into
place without ever replacing another, and make that durable.

A final image name in a datastore is only ever created, never replaced: two
commands that pick the same name (two imports of one disk, an import racing a
replicate) must not silently swap one's file for the other's, or the loser's
cleanup would remove the file the winner's disk points to.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

_renameat2: Callable[[str, str], int] | None = None


def _load_renameat2() -> Callable[[str, str], int]:
    """renameat2(AT_FDCWD, old, AT_FDCWD, new, RENAME_NOREPLACE) from the process's
    own symbols; returns 0 or an errno. ENOSYS where libc or the kernel lacks it."""
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return lambda old, new: errno.ENOSYS
    call.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint)

    def rename(old: str, new: str) -> int:
        if call(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new),
                _RENAME_NOREPLACE) == 0:
            return 0
        return ctypes.get_errno()

    return rename


def rename_noreplace(src: str, dst: str) -> None:
    """Rename src to dst; FileExistsError if dst exists (it is never replaced).

    Uses renameat2(RENAME_NOREPLACE); where the filesystem or kernel does not
    support it, link(src, dst) then unlink(src), which fails the same way.
    """
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _load_renameat2()
    err = _renameat2(src, dst)
    if err == 0:
        return
    if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise OSError(err, os.strerror(err), src, None, dst)
    os.link(src, dst)
    os.unlink(src)


def fsync_dir(directory: str) -> None:
    """Make the names created or removed in directory durable."""
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
