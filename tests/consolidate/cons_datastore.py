"""Datastores for the consolidation tests: build, serve, inspect.

A disk is built offline with qemu-img / qemu-io (so QEMU writes the layers
the server starts from), then served by nbdkit in datastore mode with a
control socket::

    nbdkit -U S/nbdkit.sock python plugin/vdisk_nbdkit.py datastore=DS control=S/control.sock

Checks use QEMU as the final word: ``qemu-img info --backing-chain`` for the
chain, ``qemu-img check`` per image, ``qemu-img compare`` against the oracle.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
from cons_control import ControlClient

from vdisk import qemu_img, qemu_io
from vdisk.nbdkit import NbdkitServer
from vdisk_block.catalog import Catalog

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB
BIG_SIZE = 96 * MiB

# the layers of disk "a" (conftest.disk_a), base first
BASE_IO = ("write -P 0x11 0 16M", "write -P 0x12 20M 4M", "write -P 0x13 30M 100k")
FROZEN_IO = ("write -P 0x21 4M 8M", "write -z 8M 1M", "write -P 0x22 24M 4M",
             "write -P 0x23 1000k 3k")
TOP_IO = ("write -P 0x31 2M 4M", "write -P 0x32 10M 1M", "write -P 0x33 26M 4M",
          "write -z 14M 512k", "write -P 0x34 17000k 5k")


class Datastore:
    def __init__(self, root: Path) -> None:
        self.dir = root
        self.images = root / "images"
        Catalog.init(str(root)).close()

    def add_disk(self, name: str, layers: Sequence[Sequence[str]], size: int,
                 cluster: int = 64 * KiB) -> list[Path]:
        """A disk whose chain has one image per entry of layers (base first), each
        written with those qemu-io commands. Returns the chain, top first."""
        chain: list[Path] = []
        for i, io in enumerate(layers):
            path = self.images / f"{name}-{i}.qcow2"
            if chain:
                qemu_img.create(path, size=size, backing=chain[0].name, backing_fmt="qcow2",
                                options={"cluster_size": cluster})
            else:
                qemu_img.create(path, size=size, options={"cluster_size": cluster})
            if io:
                qemu_io.run(path, *io)
            chain.insert(0, path)
        self.register(name, chain[0])
        return chain

    def register(self, name: str, top: Path) -> None:
        cat = Catalog(str(self.dir))
        try:
            cat.add_disk(name, os.path.relpath(top, self.dir))
        finally:
            cat.close()

    def catalog_top(self, name: str) -> Path:
        cat = Catalog(str(self.dir))
        try:
            return self.dir / cat.disk(name)["top"]
        finally:
            cat.close()

    def catalog_job(self, job_id: int) -> dict[str, Any]:
        cat = Catalog(str(self.dir))
        try:
            return cat.job(job_id)
        finally:
            cat.close()

    def catalog_disks(self) -> list[str]:
        cat = Catalog(str(self.dir))
        try:
            return [r["name"] for r in cat.disks()]
        finally:
            cat.close()

    def image_files(self) -> set[Path]:
        return {p for p in self.images.iterdir() if p.is_file()}


@dataclass
class LayeredDisk:
    ds: Datastore
    name: str
    chain: list[Path]          # top first, as built
    initial: bytes             # the guest view QEMU reads before the test writes


class ServedDatastore:
    """Disks of a datastore, each served by its own nbdkit worker with its control
    socket (what `vdisk serve` runs per disk); owned by a test::

        nbdkit -U S/NAME-a.sock python plugin/vdisk_nbdkit.py datastore=DS disk=a \
            control=S/NAME-a-control.sock

    ``socket``, ``control``, ``server`` and ``client()`` are the first disk's.
    ``fsize`` starts nbdkit under ``prlimit --fsize`` (RLIMIT_FSIZE): no file
    it writes can grow beyond that many bytes, as on a full filesystem.
    """

    def __init__(self, ds: Datastore, workdir: Path, name: str = "nbdkit",
                 fsize: int | None = None, disks: Sequence[str] = ("a",)) -> None:
        self.ds = ds
        self.disks = list(disks)
        self.controls = {d: workdir / f"{name}-{d}-control.sock" for d in disks}
        # a generous start deadline: this 2-core machine is often busy with QEMU guests
        self.servers = {d: NbdkitServer([f"datastore={ds.dir}", f"disk={d}",
                                         f"control={self.controls[d]}"],
                                        workdir, name=f"{name}-{d}", start_timeout=60)
                        for d in disks}
        if fsize is not None:
            for server in self.servers.values():
                server.cmd = ["prlimit", f"--fsize={fsize}", *server.cmd]
        self.clients: list[ControlClient] = []

    @property
    def server(self) -> NbdkitServer:
        return self.servers[self.disks[0]]

    @property
    def control(self) -> Path:
        return self.controls[self.disks[0]]

    def start(self, deadline: float = 30.0) -> ServedDatastore:
        """Start the workers; return once the NBD and the control sockets accept."""
        for disk, server in self.servers.items():
            server.start()
            end = time.monotonic() + deadline
            while True:
                try:
                    ControlClient(self.controls[disk]).close()
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > end or server.returncode is not None:
                        raise AssertionError(f"no control socket {self.controls[disk]} "
                                             f"after {deadline} s: {self.log()}") from None
                    time.sleep(0.02)
        return self

    @property
    def socket(self) -> Path:
        return self.socket_of(self.disks[0])

    def socket_of(self, disk: str) -> Path:
        socket = self.servers[disk].socket
        assert socket is not None
        return socket

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def client(self, disk: str | None = None) -> ControlClient:
        c = ControlClient(self.controls[disk or self.disks[0]])
        self.clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    def stop(self) -> int | None:
        self.close_clients()
        codes = [server.stop() for server in self.servers.values()]
        return codes[0]

    def kill(self) -> None:
        self.close_clients()
        for server in self.servers.values():
            server.kill()

    def log(self) -> str:
        return "\n".join(server.stderr_text() for server in self.servers.values())


def read_export(socket: Path, export: str, size: int) -> bytes:
    """Every byte of an export, read through NBD."""
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(str(socket))
    try:
        assert h.get_size() == size
        return b"".join(h.pread(min(4 * MiB, size - off), off)
                        for off in range(0, size, 4 * MiB))
    finally:
        h.shutdown()


# -- QEMU's view ----------------------------------------------------------------------


def raw_view(image: Path, out: Path) -> bytes:
    """The guest-visible bytes of the chain whose top is image, as QEMU reads them."""
    qemu_img.convert(image, out, "raw", force_share=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def chain_of(top: Path) -> list[Path]:
    """The chain of top, top first, as qemu-img resolves it."""
    infos: list[dict[str, Any]] = qemu_img.info(top, backing_chain=True, force_share=True)
    return [Path(i["filename"]).resolve() for i in infos]


def check_images(paths: Sequence[Path], allow_leaks: bool = False) -> list[dict[str, Any]]:
    """qemu-img check on each image: no corruption, and no leak unless allowed."""
    results = []
    for p in paths:
        r = qemu_img.check(p)
        assert r["corruptions"] == 0, f"{p}: {r}"
        if not allow_leaks:
            assert r["leaks"] == 0, f"{p}: {r}"
        results.append(r)
    return results


def compare_with(top: Path, expected: bytes, scratch: Path) -> None:
    """qemu-img compare of the chain against the expected bytes (raises on mismatch)."""
    scratch.write_bytes(expected)
    try:
        qemu_img.compare(top, scratch, fmt_b="raw", force_share=True)
    finally:
        scratch.unlink()


def check_chain(top: Path, expected: bytes, scratch: Path, allow_leaks: bool = False) -> None:
    """QEMU's word on a chain: ``check_images`` on each image, then ``compare_with``."""
    check_images(chain_of(top), allow_leaks=allow_leaks)
    compare_with(top, expected, scratch)


def assert_no_orphans(ds: Datastore) -> None:
    """Every file in DIR/images belongs to the chain of some catalog disk."""
    used: set[Path] = set()
    for name in ds.catalog_disks():
        used.update(chain_of(ds.catalog_top(name)))
    files = {p.resolve() for p in ds.image_files()}
    assert files <= used, f"orphan images: {sorted(str(p) for p in files - used)}"


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    for i in range(0, len(a), 65536):
        if a[i:i + 65536] != b[i:i + 65536]:
            j = next(k for k in range(i, min(i + 65536, len(a))) if a[k] != b[k])
            end = j
            while end < len(a) and a[end] != b[end] and end - j < 1 << 20:
                end += 1
            return f"first difference at byte {j} (~{end - j} bytes differ from there)"
    return "identical"
