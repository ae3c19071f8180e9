"""Content identity of a qcow2 image (docs/content-id.md).

An image's identity is a header extension of type EXT_VDISK_IDENTITY holding a
128-bit content ID and, when the image was created on a parent, the parent's
content ID at that moment. It is valid only while the autoclear feature bit
AUTOCLEAR_IDENTITY is set: a writer that does not know it (QEMU, qemu-img)
clears the bit when it opens the image read-write, so the identity of an image
someone else changed is "unknown", never wrongly trusted.

Rules this module keeps:

- a content ID is random and names one content: whoever changes an image's
  data gives it a fresh ID first (durably, before the first changed byte);
- a child records its parent's ID; a chain whose parent no longer has it is
  refused ("parent modified since the child was created");
- every change of the extension or the bit is ordered so that a crash at any
  point leaves either the old identity, a new one, or an unknown one.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from . import header as hdr
from .errors import ChainError, UnsupportedImage

AUTOCLEAR_IDENTITY = 1 << 63
ID_BYTES = 16
VERSION = 1
FLAG_PARENT = 1 << 0            # the parent ID field is set
_EXT = struct.Struct(">II16s16s")   # version, flags, content ID, parent ID
EXT_LENGTH = _EXT.size          # 40

VALID = "valid"
UNKNOWN = "unknown"
UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Identity:
    state: str                  # VALID, UNKNOWN or UNSUPPORTED
    content_id: bytes | None = None
    parent_id: bytes | None = None
    reason: str = ""            # why it is not valid

    @property
    def valid(self) -> bool:
        return self.state == VALID

    def describe(self) -> dict:
        return {"state": self.state, "content_id": format_id(self.content_id),
                "parent_id": format_id(self.parent_id), "reason": self.reason or None}


def new_id() -> bytes:
    return os.urandom(ID_BYTES)


def format_id(value: bytes | None) -> str | None:
    return str(uuid.UUID(bytes=value)) if value else None


def encode(content_id: bytes, parent_id: bytes | None) -> bytes:
    return _EXT.pack(VERSION, FLAG_PARENT if parent_id else 0, content_id,
                     parent_id or bytes(ID_BYTES))


def extension(content_id: bytes, parent_id: bytes | None) -> bytes:
    return hdr.extension(hdr.EXT_VDISK_IDENTITY, encode(content_id, parent_id))


def of_header(h: hdr.Header) -> Identity:
    if h.version < 3:
        return Identity(UNSUPPORTED, reason="qcow2 version 2 has no autoclear feature bits")
    data = h.extensions.get(hdr.EXT_VDISK_IDENTITY)
    if data is None:
        return Identity(UNKNOWN, reason="no content ID was ever given to this image")
    if len(data) < EXT_LENGTH:
        return Identity(UNKNOWN, reason=f"identity extension of {len(data)} bytes is too short")
    version, flags, cid, pid = _EXT.unpack_from(data)
    if version != VERSION:
        return Identity(UNKNOWN, reason=f"identity extension version {version} is not known")
    if not h.autoclear & AUTOCLEAR_IDENTITY:
        return Identity(UNKNOWN, reason="another writer changed the image after its content "
                        "ID was given (the identity bit is clear)")
    return Identity(VALID, cid, pid if flags & FLAG_PARENT else None)


def read(path: str) -> tuple[hdr.Header | None, Identity]:
    """Header and identity of an image file, without locks (raw files: no header)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.pread(fd, 4, 0) != hdr.MAGIC:
            return None, Identity(UNSUPPORTED, reason="raw image")
        h = hdr.parse_header(fd, path)
    finally:
        os.close(fd)
    return h, of_header(h)


# -- writing ------------------------------------------------------------------------------


def _sync(fd: int) -> None:
    os.fdatasync(fd)


def write(fd: int, path: str, h: hdr.Header, content_id: bytes, parent_id: bytes | None,
          autoclear: int | None = None, durable: bool = True) -> Identity:
    """Give the image (open read-write on fd) this identity, durably (unless
    ``durable`` is false and the extension is rewritten in place: the caller
    then says who syncs it, or redoes it after a crash).

    ``autoclear`` is the autoclear field to leave behind (the identity bit is
    always set); by default the other bits are kept. ``h`` is updated to what
    the file now says. The data of the extension is written while either the
    bit is clear (so it is not trusted yet) or the old and new contents differ
    in a random ID (so even a torn write names no other image's content).
    """
    if h.version < 3:
        raise UnsupportedImage(path, "a qcow2 version 2 image cannot carry a content ID "
                               "(convert it with 'qemu-img amend -o compat=1.1')")
    want = (h.autoclear if autoclear is None else autoclear) | AUTOCLEAR_IDENTITY
    payload = encode(content_id, parent_id)
    data = h.extensions.get(hdr.EXT_VDISK_IDENTITY)
    if data is not None and len(data) >= EXT_LENGTH:
        os.pwrite(fd, payload, h.ext_offsets[hdr.EXT_VDISK_IDENTITY])
        h.extensions[hdr.EXT_VDISK_IDENTITY] = payload + data[EXT_LENGTH:]
        if not durable and want == h.autoclear:
            return of_header(h)
    elif data is not None:
        raise UnsupportedImage(path, "its identity extension is too short to rewrite")
    else:
        _insert(fd, path, h, payload)
    _sync(fd)
    if want != h.autoclear:
        hdr.write_u64(fd, hdr.OFF_AUTOCLEAR, want)
        _sync(fd)
        h.autoclear = want
    return of_header(h)


def _insert(fd: int, path: str, h: hdr.Header, payload: bytes) -> None:
    """Add the extension to an image that has none, with the identity bit clear.

    QEMU reads extensions up to the backing file name, so the name moves first
    to a place past both the new extension area and its old place (written,
    synced, then pointed at); then the area the new extension will take is
    zeroed, so a torn write of it always meets an end marker.
    """
    if h.autoclear & AUTOCLEAR_IDENTITY:
        hdr.write_u64(fd, hdr.OFF_AUTOCLEAR, h.autoclear & ~AUTOCLEAR_IDENTITY)
        _sync(fd)
        h.autoclear &= ~AUTOCLEAR_IDENTITY
    cs = h.cluster_size
    ext = hdr.extension(hdr.EXT_VDISK_IDENTITY, payload)
    at = h.ext_end - 8                      # the end marker becomes our extension
    new_end = at + len(ext) + 8
    if h.backing_file_offset and h.backing_file_offset < new_end:
        # (a retry after a crash finds the name already moved out of the way)
        name_end = h.backing_file_offset + h.backing_file_size
        place = (max(new_end, name_end) + 7) & ~7
        if place + h.backing_file_size > cs:
            raise UnsupportedImage(path, "no room in the header cluster for a content ID")
        name = os.pread(fd, h.backing_file_size, h.backing_file_offset)
        os.pwrite(fd, name, place)
        _sync(fd)
        os.pwrite(fd, struct.pack(">Q", place), hdr.OFF_BACKING_FILE)
        _sync(fd)
        h.backing_file_offset = place
    elif new_end > (h.backing_file_offset or cs):
        raise UnsupportedImage(path, "no room in the header cluster for a content ID")
    os.pwrite(fd, bytes(new_end - h.ext_end), h.ext_end)
    _sync(fd)
    os.pwrite(fd, ext + bytes(8), at)
    h.extensions[hdr.EXT_VDISK_IDENTITY] = payload
    h.ext_offsets[hdr.EXT_VDISK_IDENTITY] = at + 8
    h.ext_end = new_end


def write_path(path: str, content_id: bytes, parent_id: bytes | None,
               lock: bool = True) -> Identity:
    """Rewrite the identity of an image file.

    With ``lock``, QEMU's write lock is taken first, so an image anybody
    (this process included) serves or reads as a backing file is refused;
    without, the caller owns the image's chain (a consolidation rebinding its
    own layers).
    """
    from . import locking
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if lock:
            locking.lock_for_write(fd, path)
        h = hdr.parse_header(fd, path)
        return write(fd, path, h, content_id, parent_id)
    finally:
        os.close(fd)


# -- chains -------------------------------------------------------------------------------


def parent_mismatch(child: Identity, parent: Identity) -> str | None:
    """Why a child's recorded parent ID is not its parent's, or None if it is (or
    the child recorded none)."""
    if not child.valid or child.parent_id is None:
        return None
    if not parent.valid:
        return f"its identity is {parent.state} ({parent.reason})"
    if parent.content_id != child.parent_id:
        return (f"its content ID is {format_id(parent.content_id)}, the child recorded "
                f"{format_id(child.parent_id)}")
    return None


def link_proven(child: Identity, parent: Identity) -> bool:
    """Whether the link child -> parent is proven: the child's identity is valid and
    records, as its parent ID, the parent's current valid content ID."""
    return child.valid and parent.valid and child.parent_id == parent.content_id


def chain_proven(chain: Sequence[Identity]) -> bool:
    """Whether every link of a chain (top first, down to its base, which has no
    backing file and needs nothing) is proven: the chain then reads as it did
    when its top's content ID was given."""
    return all(link_proven(c, p) for c, p in zip(chain, chain[1:], strict=False))


def check_link(child_path: str, child: Identity, parent_path: str, parent: Identity) -> None:
    why = parent_mismatch(child, parent)
    if why is not None:
        raise ChainError(child_path, f"parent {parent_path} modified since the child was "
                         f"created: {why}")


def set_parent(f, parent_id: bytes | None, durable: bool = True) -> bool:
    """Record parent_id in an open image (a Qcow2File of our own chain, whose
    header and identity in memory follow); ``durable`` as for write. Returns
    whether it wrote."""
    cur: Identity = f.identity
    if not cur.valid or cur.parent_id is None or cur.parent_id == parent_id:
        return False
    assert cur.content_id is not None
    fd = f.fd if f.writable else os.open(f.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        f.identity = write(fd, f.path, f.header, cur.content_id, parent_id, durable=durable)
    finally:
        if fd != f.fd:
            os.close(fd)
    return True


def rebind(child_path: str, parent_path: str, lock: bool = True) -> bool:
    """Record the parent's current ID in the child, for a parent whose data changed in a
    way the chain view keeps (consolidation into it). Returns whether it wrote."""
    _h, parent = read(parent_path)
    _hc, child = read(child_path)
    if not child.valid or not parent.valid or child.parent_id == parent.content_id:
        return False
    assert child.content_id is not None
    write_path(child_path, child.content_id, parent.content_id, lock)
    return True
