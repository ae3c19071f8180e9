"""Resolve a backing chain: top -> backing -> ... -> base.

Relative backing names are resolved against the directory of the image that
names them, as QEMU does. The backing format comes from the header extension
or, when absent, from the file's magic. A loop, a missing file or a name that
is not a plain file path is refused with a message naming the image.
"""

from __future__ import annotations

import os

from .clustermap import MAX_LAYERS as MAX_DEPTH
from .disk import Disk
from .errors import ChainError, ImageError, UnsupportedImage
from .identity import check_link
from .image import Qcow2File, RawFile, open_image


def resolve_backing(image_path: str, name: str) -> str:
    if name.startswith("json:") or (":" in name.split("/")[0] and not os.path.exists(name)):
        raise UnsupportedImage(image_path, f"backing file {name!r} is not a plain file path")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def open_chain(path: str, readonly: bool) -> list[Qcow2File | RawFile]:
    """Open every image of the chain (top writable unless readonly), locked as QEMU does."""
    layers: list[Qcow2File | RawFile] = []
    seen: set[tuple[int, int]] = set()
    current, fmt = os.path.abspath(path), None
    try:
        while True:
            try:
                st = os.stat(current)
            except FileNotFoundError:
                if not layers:
                    raise ChainError(current, "image not found") from None
                raise ChainError(layers[-1].path, f"backing file {layers[-1].backing_file!r} "
                                 f"({current}) not found") from None
            if (st.st_dev, st.st_ino) in seen:
                raise ChainError(layers[-1].path, f"backing loop: {current} is already "
                                 "in the chain", errno=40)   # ELOOP
            if len(layers) >= MAX_DEPTH:
                raise ChainError(path, f"chain deeper than {MAX_DEPTH} images")
            seen.add((st.st_dev, st.st_ino))
            if fmt not in (None, "qcow2", "raw"):
                raise UnsupportedImage(layers[-1].path, f"backing format {fmt!r}")
            f = open_image(current, fmt, writable=not readonly and not layers)
            layers.append(f)
            if len(layers) > 1:
                child = layers[-2]
                check_link(child.path, child.identity, f.path, f.identity)
            if not f.backing_file:
                return layers
            current, fmt = resolve_backing(current, f.backing_file), f.backing_format
    except BaseException:
        for f in layers:
            f.close()
        raise


def open_disk(path: str, readonly: bool = False) -> Disk:
    layers = open_chain(path, readonly)
    try:
        return Disk(layers, readonly)
    except BaseException:
        for f in layers:
            f.close()
        raise


def chain_paths(path: str, partial: bool = False) -> list[str]:
    """Paths of the chain whose top is path, top first, read from the headers only.

    Takes no locks and opens nothing for long: for looking at chains that
    someone else (this process included) may be serving. With ``partial``, a
    broken chain (a missing or unreadable image, a loop) gives the images
    that exist down to the break instead of an error.
    """
    out, error = _walk(path)
    if error is not None and not partial:
        raise error
    return out


def chain_walk(path: str) -> tuple[list[str], bool]:
    """The chain as far as it can be followed, and whether that is all of it.

    For deciding what an image is used by: a header the block driver refuses
    (an unknown feature, QEMU's corrupt bit that ``qemu-img check -r`` mends)
    still names its backing file, which is followed; only a missing or
    unreadable file (or a loop) ends the walk early, and then the images
    below the break are unknown.
    """
    out, error = _walk(path, lenient=True)
    return out, error is None


def _walk(path: str, lenient: bool = False) -> tuple[list[str], ImageError | OSError | None]:
    from . import header as hdr
    out: list[str] = []
    current: str | None = os.path.abspath(path)
    try:
        while current is not None:
            if current in out or len(out) >= MAX_DEPTH:
                raise ChainError(out[-1], f"backing loop: {current} is already in the chain",
                                 errno=40)
            try:
                fd = os.open(current, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not out:
                    raise ChainError(current, "image not found") from None
                raise ChainError(out[-1], f"backing file {current} not found") from None
            out.append(current)
            try:
                if os.pread(fd, 4, 0) != hdr.MAGIC:
                    break
                try:
                    backing = hdr.parse_header(fd, current).backing_file
                except ImageError:
                    if not lenient:
                        raise
                    backing = hdr.raw_backing_name(fd, current)
            finally:
                os.close(fd)
            current = resolve_backing(current, backing) if backing else None
    except (ImageError, OSError) as e:
        return out, e
    return out, None
