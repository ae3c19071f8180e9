"""Shared pieces of the boot tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdisk import attach
from vdisk.lab.vdiskrun import CLI, ServeError, VdiskServer

BOOT_TIMEOUT = 120.0  # boot to the workload's verdict under TCG takes ~5-10 s here
EXIT_TIMEOUT = 30.0  # the guest powers off right after its verdict


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class GuestChain:
    base: Path  # a copy of the built guest image
    top: Path  # an empty qcow2 overlay on it; vdisk serves this one
    base_sha256: str


class DocServer(VdiskServer):
    """``vdisk serve`` run as docs/attach.md shows it (:func:`attach.serve_args`: a
    Unix socket per disk in DIR/run, or ``ports``), with ``--json`` so that it says
    when it serves."""

    def __init__(self, datastore: Path, log_path: Path, **options: Any) -> None:
        super().__init__(datastore, datastore / "run", log_path=log_path)
        self.cmd = [*CLI, *attach.serve_args(self.datastore, **options)[1:], "--json"]

    def endpoint(self, disk: str) -> dict[str, Any]:
        """The disk's worker, as ``vdisk serve --json`` printed it: uri, socket, port..."""
        return dict(next(d for d in self.info["disks"] if d["disk"] == disk))


@contextlib.contextmanager
def serve_on_a_free_port(datastore: Path, log_path: Path) -> Iterator[DocServer]:
    """``vdisk serve --ports P-P`` on a free port P of 127.0.0.1 (one disk)."""
    for _ in range(5):  # another process may take the free port before vdisk binds it
        port = free_tcp_port()
        server = DocServer(datastore, log_path, ports=(port, port))
        try:
            server.start()
        except ServeError as e:
            if "in use" in str(e):
                continue
            raise
        try:
            yield server
        finally:
            server.stop()
        return
    raise AssertionError("no free TCP port on 127.0.0.1 after 5 attempts")
