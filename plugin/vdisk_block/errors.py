"""Errors raised by the block driver.

Every error carries an errno (what nbdkit reports to the client) and renders as
one line naming the image and the reason, so nbdkit's log and the client's
error say what is wrong without a traceback.
"""

from __future__ import annotations

import errno as _errno


class ImageError(Exception):
    """Base class: an image cannot be opened or a request cannot be served."""

    errno = _errno.EIO
    template = "{path}: {reason}"

    def __init__(self, path: str, reason: str, *, errno: int | None = None) -> None:
        self.path = path
        self.reason = reason
        if errno is not None:
            self.errno = errno
        super().__init__(self.template.format(path=path, reason=reason))


class MalformedImage(ImageError):
    """The image's metadata is inconsistent or out of range."""

    template = "{path}: malformed image: {reason}"


class UnsupportedImage(ImageError):
    """A valid image that uses a feature this driver does not implement."""

    errno = _errno.ENOTSUP
    template = "{path}: unsupported image: {reason}"


class ChainError(ImageError):
    """The backing chain is broken: missing file, loop, bad format."""

    errno = _errno.ENOENT
    template = "{path}: backing chain: {reason}"


class ImageLocked(ImageError):
    """Another process (QEMU) holds a conflicting image lock."""

    errno = _errno.EAGAIN
    template = "{path}: image is in use: {reason}"


class RequestError(ImageError):
    """A single request cannot be served; the disk stays usable."""

    errno = _errno.EINVAL
    template = "{path}: {reason}"


class NotFast(RequestError):
    """A zero request with FAST_ZERO that would need to write data."""

    errno = _errno.ENOTSUP
