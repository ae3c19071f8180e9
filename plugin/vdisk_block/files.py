"""File primitives every writer of a datastore shares: write a file under a
temporary name that it owns, put it into place without ever replacing another,
and make that durable.

A final image name in a datastore is only ever created, never replaced: two
commands that pick the same name (two imports of one disk, an import racing a
replicate) must not silently swap one's file for the other's, or the loser's
cleanup would remove the file the winner's disk points to.

Owned temporaries
-----------------
A file being written is named from its final name, ``.FINAL.SUFFIX`` in the
same directory, created with O_EXCL and held with an exclusive flock(2) by its
creator from creation until it is renamed into place or removed:

- creating ``.FINAL.SUFFIX`` reserves FINAL (``Catalog.new_image_paths`` skips
  any FINAL that a ``.FINAL.*`` entry names);
- a temporary nobody holds is stale (its creator died) and may be removed by
  anyone; a held one is live and is never touched.

The race between a creator and a cleaner::

    creator                              cleaner (remove_if_stale)
    open(O_CREAT|O_EXCL) -> inode I
                                         open(path) -> I, flock(EX|NB) ok,
                                         path still names I: unlink(path)
    flock(EX) -> waits for the cleaner
    path no longer names I: close, retry

A cleaner only unlinks while it holds the lock and after checking that the
name still names the inode it locked, so it never removes a file that was
renamed into place (or replaced) meanwhile. Suffixes the sweeper handles:
SWEPT_SUFFIXES. ``.partial`` (replicate's layer copies, written by layercopy
without this lock) is not among them: replicate removes those under its
target lock.

flock(2) and QEMU's OFD byte-range locks do not conflict, so ``qemu-img``
writes into a temporary its creator holds (``qemu-img convert`` and
``create`` reuse an existing file's inode).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from types import TracebackType

CREATING_SUFFIX = ".creating"       # create.create_qcow2
IMPORT_SUFFIX = ".import"           # vdisk disk import
SWEPT_SUFFIXES = (CREATING_SUFFIX, IMPORT_SUFFIX)
_CREATE_ATTEMPTS = 10

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


# -- owned temporaries ---------------------------------------------------------------


def temp_path(final: str, suffix: str) -> str:
    """The temporary name of final: ``.FINAL.SUFFIX`` beside it."""
    head, tail = os.path.split(final)
    return os.path.join(head, f".{tail}{suffix}")


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class OwnedTemp:
    """A new file under a temporary name, held by this process until it is put
    into place (commit) or removed (discard); close() releases it.

    As a context manager: discarded unless committed, always closed.
    """

    def __init__(self, fd: int, path: str, final: str) -> None:
        self.fd = fd
        self.path = path
        self.final = final
        self.committed = False

    @classmethod
    def create(cls, final: str, suffix: str = CREATING_SUFFIX, *, path: str | None = None,
               take_stale: bool = False) -> OwnedTemp:
        """Create and lock ``path`` (default temp_path(final, suffix)).

        FileExistsError if it exists and is live, or stale without
        ``take_stale`` (then a stale one is removed and creation proceeds).
        """
        path = path or temp_path(final, suffix)
        for _ in range(_CREATE_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                if take_stale and remove_if_stale(path):
                    continue
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)     # only a cleaner can hold it, briefly
                if _same_file(path, fd):
                    return cls(fd, path, final)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)                            # a cleaner removed it: try again
        raise FileExistsError(errno.EEXIST, "could not create a temporary file", path)

    @classmethod
    def reserve(cls, final: str, suffix: str) -> OwnedTemp | None:
        """The temporary of a final name nobody has or reserves, or None."""
        try:
            t = cls.create(final, suffix)
        except FileExistsError:
            return None
        if os.path.lexists(final):              # made while we looked: not ours
            t.discard()
            t.close()
            return None
        return t

    def commit(self) -> None:
        """Rename into place; FileExistsError if final exists (never replaced)."""
        rename_noreplace(self.path, self.final)
        self.committed = True

    def discard(self) -> None:
        """Remove the file under whichever name (temporary or final) still names
        it: never a name that now belongs to another file."""
        for name in (self.path, self.final):
            if _same_file(name, self.fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        self.committed = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OwnedTemp:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None or not self.committed:
                self.discard()
        finally:
            self.close()


def taken_names(directory: str) -> set[str]:
    """The final names directory holds or reserves: every entry, and every FINAL
    a temporary ``.FINAL.SUFFIX`` may stand for (one listdir)."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return set()
    taken = set(entries)
    for entry in entries:
        if entry.startswith("."):
            parts = entry[1:].split(".")
            taken.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return taken


def _open_unlocked(path: str) -> int | None:
    """A descriptor of path, a regular file nobody holds, locked by us; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:                         # gone, a symlink, unreadable
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def is_stale(path: str) -> bool:
    """Whether path is a temporary whose creator no longer holds it."""
    fd = _open_unlocked(path)
    if fd is None:
        return False
    os.close(fd)
    return True


def remove_if_stale(path: str) -> bool:
    """Remove path if it is a stale temporary; True if this call removed it."""
    fd = _open_unlocked(path)
    if fd is None:
        return False
    try:
        if not _same_file(path, fd):            # renamed into place (or replaced) meanwhile
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            return True
        return False
    finally:
        os.close(fd)


def sweep_stale_temps(images_dir: str) -> list[str]:
    """Remove every stale owned temporary (SWEPT_SUFFIXES) in images_dir; returns
    the names removed. Live ones, and every other file, are left alone."""
    removed = []
    try:
        names = os.listdir(images_dir)
    except FileNotFoundError:
        return []
    for name in sorted(names):
        if name.startswith(".") and name.endswith(SWEPT_SUFFIXES) and \
                remove_if_stale(os.path.join(images_dir, name)):
            removed.append(name)
    if removed:
        fsync_dir(images_dir)
    return removed
