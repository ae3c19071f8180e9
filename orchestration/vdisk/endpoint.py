"""A disk's NBD endpoint, bound by the supervisor of ``vdisk serve``.

The supervisor binds each disk's listening socket itself, for as long as it
serves, and hands it to the disk's nbdkit worker (socket activation): a
worker that restarts serves the same socket, the endpoint never disappears,
and a client that connects meanwhile waits in the listen queue. The export
name is the disk's name on every endpoint.

- Unix: ``RUNDIR/NAME.sock``, with the mode (and group) asked for, set
  before the socket accepts anything. A socket file left by a server that is
  gone is replaced; one that answers is refused.
- TCP: one port per disk from a range, on one address (127.0.0.1 unless
  asked otherwise). A port in use is refused, naming it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .errors import AddressInUse, Error, SocketPathTooLong
from .nbdkit import SUN_PATH_MAX, accepts_connections

BACKLOG = 128


class EndpointError(Error):
    msg = "{self.reason}"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_ports(text: str) -> tuple[int, int]:
    """'10809-10839' -> (10809, 10839); one port is a range of one."""
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise EndpointError(f"invalid port range {text!r} (example: 10809-10839)") from None
    if not 1 <= lo <= hi <= 65535:
        raise EndpointError(f"invalid port range {text!r}: ports are 1-65535, first <= last")
    return lo, hi


def uri(disk: str, *, socket_path: str | None = None, address: str | None = None,
        port: int | None = None, tls: bool = False) -> str:
    """The NBD URI of a disk's endpoint (the export is the disk's name)."""
    scheme = "nbds" if tls else "nbd"
    export = quote(disk, safe="")
    if socket_path is not None:
        return f"{scheme}+unix:///{export}?socket={quote(socket_path, safe='/')}"
    host = f"[{address}]" if address and ":" in address else address
    return f"{scheme}://{host}:{port}/{export}"


@dataclass
class Endpoint:
    disk: str
    sock: socket.socket
    socket_path: str | None = None
    address: str | None = None
    port: int | None = None
    tls: bool = False

    @classmethod
    def unix(cls, disk: str, path: str, *, mode: int = 0o600, gid: int | None = None,
             tls: bool = False) -> Endpoint:
        if len(path.encode()) > SUN_PATH_MAX:
            raise SocketPathTooLong(path, SUN_PATH_MAX)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)                   # nobody else, until chmod below
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            try:
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)
                sock.listen(BACKLOG)
            except BaseException:
                os.unlink(path)
                raise
        except OSError as e:
            sock.close()
            raise EndpointError(f"cannot listen on {path}: {e.strerror or e}") from None
        return cls(disk, sock, socket_path=path, tls=tls)

    @classmethod
    def tcp(cls, disk: str, address: str, port: int, *, tls: bool = False) -> Endpoint:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((address, port))
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            if e.errno == 98:                        # EADDRINUSE
                raise AddressInUse(f"{address}:{port}") from None
            raise EndpointError(f"cannot listen on {address}:{port}: "
                                f"{e.strerror or e}") from None
        return cls(disk, sock, address=address, port=port, tls=tls)

    @property
    def uri(self) -> str:
        return uri(self.disk, socket_path=self.socket_path, address=self.address,
                   port=self.port, tls=self.tls)

    def record(self) -> dict[str, Any]:
        """What the catalog and ``--json`` say of it."""
        return {"uri": self.uri, "socket": self.socket_path, "address": self.address,
                "port": self.port, "tls": self.tls}

    def close(self) -> None:
        """Stop listening; a Unix socket's file goes too."""
        self.sock.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody answers on; refuse a live one or another file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EndpointError(f"{path} exists and is not a socket")
    if accepts_connections(path, timeout=0.5):
        raise AddressInUse(path)
    os.unlink(path)


def free_ports(address: str, lo: int, hi: int, taken: set[int], count: int) -> list[int]:
    """``count`` ports of [lo, hi] not in ``taken`` (bound ones fail at bind time)."""
    ports = [p for p in range(lo, hi + 1) if p not in taken][:count]
    if len(ports) < count:
        raise EndpointError(f"the port range {lo}-{hi} has no room for {count} more disk(s) "
                            f"({len(taken)} in use)")
    return ports
