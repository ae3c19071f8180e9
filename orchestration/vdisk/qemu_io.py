"""Thin wrapper of qemu-io, QEMU's block layer exerciser.

Runs ``qemu-io -c CMD ...`` on an image: writing and verifying patterns
(``write -P 0xab 0 64k``, ``read -P 0xab 0 64k``), zeroing, discarding. Any
failed command makes the whole run fail with :class:`~vdisk.errors.QemuIoError`;
qemu-io reports some failures (pattern verification, I/O errors) on stdout,
which the error keeps as ``output``.

The binary is ``$QEMU_IO`` if set, else ``qemu-io`` from ``$PATH``.
"""

from __future__ import annotations

import logging
import os

from . import process
from .errors import QemuIoError

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]


def binary() -> str:
    return os.environ.get("QEMU_IO", "qemu-io")


def run(
    path: StrPath,
    *commands: str,
    fmt: str | None = None,
    readonly: bool = False,
    force_share: bool = False,
    cache: str | None = None,
) -> str:
    """Run qemu-io commands on an image in one process; return stdout.

    ``force_share`` (``-U``) opens the image without taking QEMU's locks; it
    implies ``readonly`` (QEMU allows it only read-only). ``cache`` is a
    qemu-io cache mode (``none``, ``writeback``, ...).
    """
    if not commands:
        raise ValueError("qemu_io.run needs at least one command")
    cmd = [binary()]
    if fmt is not None:
        cmd += ["-f", fmt]
    if readonly or force_share:
        cmd.append("-r")
    if force_share:
        cmd.append("-U")
    if cache is not None:
        cmd += ["-t", cache]
    for command in commands:
        cmd += ["-c", command]
    cmd.append(os.fspath(path))
    return process.run(cmd, QemuIoError, log=log, log_stdout=True).stdout
