"""Who owns what in a datastore: a disk, a job, the server (docs/control.md).

Every disk and every job has one owner at a time, a live process, known by
an advisory lock it holds for as long as it owns the thing:

    DIR/locks/disk.NAME.lock     the disk's owner: the process serving it or
                                 running an offline command on it
    DIR/locks/owner.TOKEN.lock   one process that runs jobs; a job's journal
                                 row names its owner's TOKEN
    DIR/locks/server.lock        the process serving the datastore

The locks are OFD write locks on byte 0 (F_OFD_SETLK): they belong to the
open file description, so they stay with the descriptor (and across nbdkit's
fork), two openers in one process exclude each other, and the kernel drops
them when the holder dies, however it dies. Whether a lock is held is asked
with F_OFD_GETLK, which takes nothing. A lock file holds one line of JSON
naming its holder (pid, what it runs) for the messages; the lock, not the
file, is the truth.

A job whose owner's lock is free is dead: its process is gone. Only then
may another process recover it (docs/control.md, "Recovery").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
import sys
from dataclasses import dataclass

from .errors import ImageError

LOCKS = "locks"
_FLOCK = struct.Struct("hh4xqqi4x")         # struct flock on x86_64/aarch64 Linux


class OwnerError(ImageError):
    errno = errno.EBUSY
    template = "{reason}"

    def __init__(self, reason: str) -> None:
        super().__init__("", reason)


class Busy(OwnerError):
    """Somebody else (another live process, or another opener here) owns it."""


@dataclass(frozen=True)
class Holder:
    pid: int | None
    what: str

    def __str__(self) -> str:
        where = f"process {self.pid}" if self.pid else "another process"
        return f"{where} ({self.what})" if self.what else where


def describe_self() -> str:
    """What this process is, for other processes' messages: 'vdisk consolidate'."""
    argv = [os.path.basename(a) for a in sys.argv[:1]] + sys.argv[1:3]
    if argv and argv[0] in ("cli.py", "__main__.py", "-m", "-c"):
        argv[0] = "vdisk"
    if os.path.basename(sys.executable).startswith("nbdkit") or "nbdkit" in argv[0]:
        return "nbdkit"
    return " ".join(a for a in argv if not a.startswith("-")) or "python"


def _lock_dir(directory: str) -> str:
    path = os.path.join(directory, LOCKS)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
    return path


def _setlk(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 1, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _held(fd: int) -> bool:
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 1, 0))
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


def _read_holder(fd: int) -> Holder:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return Holder(int(info["pid"]) if info.get("pid") else None, str(info.get("what", "")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return Holder(None, "")


class Lock:
    """An exclusive lock on DIR/locks/NAME, held until close(); Busy if taken."""

    def __init__(self, directory: str, name: str, what: str, busy_message: str) -> None:
        self.path = os.path.join(_lock_dir(directory), name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _setlk(fd):
                raise Busy(busy_message.format(holder=_read_holder(fd)))
            info = json.dumps({"pid": os.getpid(), "what": what}).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd

    def close(self) -> None:
        # the file stays: removing it would race with the next locker's open
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def holder(directory: str, name: str) -> Holder | None:
    """Who holds DIR/locks/NAME, or None if nobody does."""
    try:
        fd = os.open(os.path.join(directory, LOCKS, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _read_holder(fd) if _held(fd) else None
    finally:
        os.close(fd)


# -- disks, the server ---------------------------------------------------------------


def disk_lock_name(disk: str) -> str:
    return f"disk.{disk}.lock"


def own_disk(directory: str, disk: str, what: str | None = None) -> Lock:
    """Become the owner of a disk, or Busy naming who is."""
    return Lock(directory, disk_lock_name(disk), what or describe_self(),
                f"disk {disk!r} is in use by {{holder}}")


def disk_owner(directory: str, disk: str) -> Holder | None:
    return holder(directory, disk_lock_name(disk))


def own_server(directory: str, what: str | None = None) -> Lock:
    return Lock(directory, "server.lock", what or describe_self(),
                f"datastore {directory} is already served by {{holder}}")


# -- job owners ------------------------------------------------------------------------


class Owner:
    """This process as an owner of jobs: a token, and the lock that proves it lives.

    Created with O_EXCL under a fresh random token, so no two processes (nor
    a process reusing a dead one's pid) ever share one.
    """

    def __init__(self, directory: str, what: str | None = None) -> None:
        locks = _lock_dir(directory)
        info = json.dumps({"pid": os.getpid(), "what": what or describe_self()}).encode()
        while True:
            token = os.urandom(8).hex()
            path = os.path.join(locks, f"owner.{token}.lock")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            # a sweeper may find the new file before it is locked, take it for
            # a dead owner's and remove it: then this name is not ours, retry
            if _setlk(fd) and _same_file(fd, path):
                os.pwrite(fd, info + b"\n", 0)
                break
            os.close(fd)
        self.token, self.path, self._fd = token, path, fd

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)          # while still holding the lock
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Owner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_file(fd: int, path: str) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def owner_alive(directory: str, token: str | None) -> Holder | None:
    """The holder of a job owner's token if it is alive, else None."""
    if not token:
        return None
    return holder(directory, f"owner.{token}.lock")


def sweep_owners(directory: str) -> list[str]:
    """Remove the token files of owners that died (never a live one's)."""
    removed = []
    locks = os.path.join(directory, LOCKS)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(locks):
            if not (name.startswith("owner.") and name.endswith(".lock")):
                continue
            path = os.path.join(locks, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                # holding the lock while unlinking: the token is dead for good
                if _setlk(fd) and _same_file(fd, path):
                    os.unlink(path)
                    removed.append(name)
            finally:
                os.close(fd)
    return removed
