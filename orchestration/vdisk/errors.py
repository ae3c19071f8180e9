"""Errors of the vdisk orchestration package.

Every error is a class with a message template (``msg``) formatted from its
named fields, so callers can both print it and inspect what went wrong::

    try:
        qemu_img.compare(a, b)
    except errors.ContentMismatch as e:
        print(e.cmd, e.returncode, e.output)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _one_line(text: str, limit: int = 2000) -> str:
    """Join the lines of a command's output for a one-line message."""
    line = " / ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line or "(no output)"


class Error(Exception):
    """Base class of vdisk errors; ``str(e)`` is ``msg`` formatted with ``self``."""

    msg = "{self.reason}"
    reason = "unknown error"

    def __str__(self) -> str:
        return self.msg.format(self=self)


class CommandError(Error):
    """An external command failed.

    Fields: ``cmd`` (the argument list), ``returncode`` (None if the command
    did not exit, e.g. on a timeout), ``stderr`` and ``output`` (stdout; some
    tools, qemu-io for one, report errors there).
    """

    msg = "Command {self.command} failed with exit code {self.returncode}: {self.detail}"

    def __init__(
        self,
        cmd: Sequence[str],
        returncode: int | None,
        stderr: str,
        output: str = "",
    ) -> None:
        super().__init__(cmd, returncode, stderr, output)
        self.cmd = [str(a) for a in cmd]
        self.returncode = returncode
        self.stderr = stderr
        self.output = output

    @property
    def command(self) -> str:
        return " ".join(self.cmd)

    @property
    def detail(self) -> str:
        """stderr, or stdout when stderr is empty, as one line."""
        return _one_line(self.stderr or self.output)


class QemuImgError(CommandError):
    """qemu-img failed."""


class ContentMismatch(QemuImgError):
    """``qemu-img compare`` found different contents (exit code 1)."""

    msg = "Images differ ({self.command}): {self.detail}"

    @property
    def detail(self) -> str:
        return _one_line(self.output or self.stderr)


class ImageCorrupted(QemuImgError):
    """``qemu-img check`` reported corruptions (or leaks, where not allowed).

    Extra fields: ``path``, ``corruptions``, ``leaks`` and ``result`` (the
    parsed JSON of ``qemu-img check``).
    """

    msg = (
        "qemu-img check found {self.corruptions} corruptions and {self.leaks} leaked "
        "clusters in {self.path}"
    )

    def __init__(
        self,
        cmd: Sequence[str],
        returncode: int | None,
        stderr: str,
        output: str,
        *,
        path: str | Path,
        result: dict[str, Any],
    ) -> None:
        super().__init__(cmd, returncode, stderr, output)
        self.path = str(path)
        self.result = result
        self.corruptions = int(result.get("corruptions", 0))
        self.leaks = int(result.get("leaks", 0))


class QemuIoError(CommandError):
    """qemu-io failed to open the image or one of its commands failed."""

    @property
    def detail(self) -> str:
        # qemu-io reports failed commands (pattern verification, I/O errors) on stdout.
        return _one_line(f"{self.stderr}\n{self.output}")


class NbdkitError(CommandError):
    """nbdkit failed to start: it exited before accepting connections."""

    msg = "nbdkit exited with code {self.returncode} before serving: {self.detail}"


class NbdkitTimeout(NbdkitError):
    """nbdkit is running but did not accept connections in time."""

    msg = (
        "nbdkit did not accept connections on {self.address} within {self.timeout:g} s "
        "(stderr: {self.detail})"
    )

    def __init__(self, cmd: Sequence[str], stderr: str, *, address: str, timeout: float) -> None:
        super().__init__(cmd, None, stderr)
        self.address = address
        self.timeout = timeout


class AddressInUse(Error):
    """Another process already serves on the Unix socket or TCP port we were asked to use."""

    msg = "{self.address} is in use by another server"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


class SocketPathTooLong(Error):
    """A Unix socket path longer than the kernel accepts (107 bytes)."""

    msg = "Unix socket path {self.path} is {self.length} bytes long; the limit is {self.limit}"

    def __init__(self, path: str | Path, limit: int) -> None:
        super().__init__(path, limit)
        self.path = str(path)
        self.length = len(str(path).encode())
        self.limit = limit
