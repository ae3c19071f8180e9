"""QEMU's image locking: vdisk and QEMU never both write one image.

While vdisk serves a chain read-write, QEMU cannot open its top (or any
backing file) for writing; while QEMU holds an image for writing, vdisk
refuses to serve it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdharness import KiB, MiB, first_difference, read_all
from qchain import Chain, Layer, build_chain

from vdisk import qemu_img, qemu_io
from vdisk.errors import NbdkitError, QemuIoError

SIZE = 4 * MiB
QEMU_WRITE_LOCK_ERROR = re.compile(r'Failed to get (shared )?"write" lock')

# QEMU's lock bytes (block/file-posix.c): 100 + perm bit while using a permission
PERM_WRITE_BYTE = 100 + 1
_FLOCK = struct.Struct("hh4xqqi4x")


@pytest.fixture
def chain(workdir: Path) -> Chain:
    return build_chain(
        workdir,
        [
            Layer(io=("write -P 0x11 0 1M",)),
            Layer(io=("write -P 0x22 1M 64k",)),
            Layer(io=("write -P 0x33 2M 64k",)),
        ],
        SIZE,
    )


def write_lock_held(path: Path) -> bool:
    """True if some process holds QEMU's "uses write permission" lock byte of path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        probe = _FLOCK.pack(fcntl.F_WRLCK, 0, PERM_WRITE_BYTE, 1, 0)
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def owned(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def qemu_io_holding(image: Path) -> Iterator[subprocess.Popen]:
    """An interactive qemu-io that has the image open read-write (waiting on stdin)."""
    proc = subprocess.Popen(
        [qemu_io.binary(), "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    with owned(proc):
        wait_until(
            lambda: proc.poll() is not None or write_lock_held(image), "qemu-io to lock the image"
        )
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield proc
        assert proc.stdin is not None
        proc.stdin.close()  # EOF: qemu-io quits
        proc.wait(10)


@contextlib.contextmanager
def qemu_nbd_serving(image: Path, sock: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(image)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def accepting() -> bool:
        if proc.poll() is not None:
            return True
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock))
            except OSError:
                return False
        return True

    with owned(proc):
        wait_until(accepting, "qemu-nbd to listen")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield proc


def assert_refused_for_lock(serve, image: Path) -> None:
    before = image.read_bytes()
    with pytest.raises(NbdkitError) as excinfo:
        serve(image)
    text = excinfo.value.stderr.lower()
    assert "lock" in text or "in use" in text, excinfo.value.stderr
    assert image.read_bytes() == before


def assert_qemu_write_refused(image: Path) -> None:
    with pytest.raises(QemuIoError) as excinfo:
        qemu_io.run(image, "write -P 0x99 0 4k", fmt=None)
    assert QEMU_WRITE_LOCK_ERROR.search(excinfo.value.stderr), excinfo.value.stderr


def test_qemu_cannot_write_served_top(serve, chain: Chain) -> None:
    expected = chain.raw()
    served = serve(chain.top)
    h = served.connect()
    assert_qemu_write_refused(chain.top)
    h.pwrite(b"\x44" * 4096, 3 * MiB)  # vdisk itself still writes
    served.stop()
    expected = expected[: 3 * MiB] + b"\x44" * 4096 + expected[3 * MiB + 4096 :]
    got = chain.reread()
    assert got == expected, first_difference(got, expected)
    # once vdisk is gone, QEMU can write again
    qemu_io.run(chain.top, "write -P 0x55 0 4k", fmt="qcow2")


@pytest.mark.parametrize("layer", [0, 1], ids=["base", "middle"])
def test_qemu_cannot_write_backing_file_while_served(serve, chain: Chain, layer: int) -> None:
    backing = chain.paths[layer]
    before = backing.read_bytes()
    served = serve(chain.top)
    served.connect().pread(4096, 0)
    assert_qemu_write_refused(backing)
    served.stop()
    assert backing.read_bytes() == before
    qemu_io.run(backing, "write -P 0x55 0 4k", fmt="qcow2")


def test_qemu_cannot_write_backing_file_while_served_readonly(serve, chain: Chain) -> None:
    # a read-only export still needs a consistent view of its backing files
    served = serve(chain.top, readonly=True)
    served.connect().pread(4096, 0)
    assert_qemu_write_refused(chain.paths[0])


def test_second_vdisk_refused(serve, chain: Chain) -> None:
    first = serve(chain.top)
    first.connect().pwrite(b"\x66" * 512, 0)
    assert_refused_for_lock(serve, chain.top)
    assert first.alive()
    assert first.connect().pread(512, 0) == b"\x66" * 512


def test_refused_while_qemu_io_writes(serve, chain: Chain) -> None:
    with qemu_io_holding(chain.top):
        assert_refused_for_lock(serve, chain.top)
    # the lock was the reason: with qemu-io gone the same image serves
    h = serve(chain.top).connect()
    assert read_all(h) == chain.raw()


def test_refused_while_qemu_nbd_serves(serve, chain: Chain, tmp_path: Path) -> None:
    with qemu_nbd_serving(chain.top, tmp_path / "qemu-nbd.sock"):
        assert_refused_for_lock(serve, chain.top)
    h = serve(chain.top).connect()
    assert read_all(h) == chain.raw()


def test_refused_while_qemu_writes_a_backing_file(serve, chain: Chain) -> None:
    # QEMU writing the base would change what the served chain reads under it
    with qemu_io_holding(chain.paths[0]):
        with pytest.raises(NbdkitError) as excinfo:
            serve(chain.top)
        text = excinfo.value.stderr.lower()
        assert "lock" in text or "in use" in text, excinfo.value.stderr
    assert qemu_img.check(chain.top)["corruptions"] == 0


def test_readonly_export_refused_while_qemu_writes(serve, chain: Chain) -> None:
    # a consistent read is impossible while another process writes the image
    with qemu_io_holding(chain.top):
        with pytest.raises(NbdkitError) as excinfo:
            serve(chain.top, readonly=True)
        text = excinfo.value.stderr.lower()
        assert "lock" in text or "in use" in text, excinfo.value.stderr


def test_lock_released_after_kill(serve, chain: Chain) -> None:
    served = serve(chain.top)
    served.connect().pwrite(b"\x77" * 4096, 64 * KiB)
    served.kill()
    # OFD locks die with the process: QEMU can write at once
    qemu_io.run(chain.top, "write -P 0x78 0 4k", fmt="qcow2")
    assert qemu_img.check(chain.top)["corruptions"] == 0
