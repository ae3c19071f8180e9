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
import shlex
import subprocess

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
    log.debug("Running %s", shlex.join(cmd))
    try:
        cp = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as e:
        log.warning("Cannot run %s: %s", cmd[0], e)
        raise QemuIoError(cmd, None, f"cannot run {cmd[0]}: {e}") from e
    if cp.returncode != 0:
        log.warning(
            "Command %s failed with exit code %d: stderr: %s stdout: %s",
            shlex.join(cmd),
            cp.returncode,
            cp.stderr,
            cp.stdout,
        )
        raise QemuIoError(cmd, cp.returncode, cp.stderr, cp.stdout)
    return cp.stdout
