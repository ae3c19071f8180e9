"""Content identity (docs/content-id.md): the header extension and its autoclear bit.

QEMU is the oracle for everything but the identity itself: ``qemu-img check``
must stay clean, ``qemu-img info`` must still resolve the backing file, and
``qemu-img compare`` must read the data vdisk and QEMU wrote. The identity is
read from the file with ``identity.read`` and, for the on-disk layout, with a
decoder of its own written from the document.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import assert_matches_oracle, raw_view
from qchain import vdisk_write

from vdisk import qemu_img, qemu_io
from vdisk.errors import QemuImgError
from vdisk_block import ImageError, open_chain, open_disk
from vdisk_block import identity as ident
from vdisk_block.chainops import snapshot
from vdisk_block.create import create_qcow2
from vdisk_block.errors import UnsupportedImage

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB
MODIFIED = "modified since the child was created"
BIT = 1 << 63
EXT_TYPE = 0x76644944


# -- helpers ------------------------------------------------------------------------------


def identity_of(path: Path) -> ident.Identity:
    return ident.read(str(path))[1]


def autoclear_of(path: Path) -> int:
    return struct.unpack_from(">Q", path.read_bytes(), 88)[0]


def raw_extension(path: Path) -> tuple[int, int, bytes, bytes] | None:
    """(version, flags, content ID, parent ID) of the 'vdID' extension, decoded from
    the bytes as docs/content-id.md lays them out; None if there is none."""
    data = path.read_bytes()
    header_length = struct.unpack_from(">I", data, 100)[0]
    backing_offset = struct.unpack_from(">Q", data, 8)[0]
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    end = min(cluster, backing_offset) if backing_offset else cluster
    off = header_length
    while off + 8 <= end:
        ext_type, length = struct.unpack_from(">II", data, off)
        if ext_type == 0:
            return None
        if ext_type == EXT_TYPE:
            assert length == 40, f"extension length {length}"
            return struct.unpack_from(">II16s16s", data, off + 8)
        off = (off + 8 + length + 7) & ~7
    raise AssertionError("no end of the header extension area")


def header_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(64 * KiB)).hexdigest()




def backing_name(path: Path) -> str | None:
    return qemu_img.info(path).get("backing-filename")


def qemu_create(path: Path, backing: str | None = None, cluster: int = 64 * KiB,
                compat: str = "1.1") -> None:
    qemu_img.create(path, size=SIZE, backing=backing, backing_fmt="qcow2" if backing else None,
                    options={"cluster_size": cluster, "compat": compat})


def long_name(length: int, target: str = "base.qcow2") -> str:
    """A relative name of exactly length bytes naming target: './././...target'."""
    pad = length - len(target)
    name = "./" * (pad // 2) + ("/" if pad % 2 else "") + target
    assert len(name) == length
    return name


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A qemu-img image with data, no identity."""
    path = tmp_path / "base.qcow2"
    qemu_create(path)
    qemu_io.run(path, "write -P 0x11 0 3M")
    return path


# -- format -------------------------------------------------------------------------------


def test_created_images_carry_a_valid_identity(tmp_path: Path) -> None:
    parent = tmp_path / "parent.qcow2"
    child = tmp_path / "child.qcow2"
    pid = create_qcow2(str(parent), SIZE)
    cid = create_qcow2(str(child), SIZE, backing="parent.qcow2", backing_format="qcow2",
                       parent_id=pid)
    assert cid != pid and len(cid) == len(pid) == 16
    # the layout of docs/content-id.md, read without the module
    assert autoclear_of(parent) == BIT and autoclear_of(child) == BIT
    assert raw_extension(parent) == (1, 0, pid, bytes(16))
    assert raw_extension(child) == (1, 1, cid, pid)
    p, c = identity_of(parent), identity_of(child)
    assert p.valid and p.content_id == pid and p.parent_id is None
    assert c.valid and c.content_id == cid and c.parent_id == pid
    assert c.describe()["parent_id"] == str(uuid.UUID(bytes=pid))
    for path in (parent, child):
        qemu_img.check_clean(path, allow_leaks=False)
    info = qemu_img.info(child)
    assert info["format"] == "qcow2" and info["backing-filename"] == "parent.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    # readers that open read-only leave the bit (and the file) alone
    digest = header_digest(child)
    qemu_img.info(child, backing_chain=True)
    qemu_img.check(child)
    qemu_img.map(child)
    qemu_io.run(child, "read 0 64k", readonly=True)
    assert header_digest(child) == digest
    assert identity_of(child) == c


# -- what QEMU does -------------------------------------------------------------------------

KEEPS = {
    "qemu-img info": ["qemu-img", "info", "IMG"],
    "qemu-img check": ["qemu-img", "check", "IMG"],
    "qemu-img map": ["qemu-img", "map", "IMG"],
    "qemu-img convert": ["qemu-img", "convert", "-O", "raw", "IMG", "OUT"],
    "qemu-img compare": ["qemu-img", "compare", "IMG", "IMG"],
    "qemu-io -r read": ["qemu-io", "-r", "-c", "read 0 4k", "IMG"],
}
CLEARS = {
    "qemu-io write": ["qemu-io", "-c", "write -P 0x5a 0 4k", "IMG"],
    "qemu-io read-write open, read only": ["qemu-io", "-c", "read 0 4k", "IMG"],
    "qemu-img check -r leaks": ["qemu-img", "check", "-r", "leaks", "IMG"],
    "qemu-img resize": ["qemu-img", "resize", "IMG", "8M"],
    "qemu-img commit (its top)": ["qemu-img", "commit", "IMG"],
    "qemu-img amend": ["qemu-img", "amend", "-o", "lazy_refcounts=off", "IMG"],
    "qemu-img snapshot -c": ["qemu-img", "snapshot", "-c", "s1", "IMG"],
    "qemu-img rebase -u": ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "parent.qcow2",
                           "IMG"],
    "qemu-img bitmap --add": ["qemu-img", "bitmap", "--add", "IMG", "b0"],
}


@pytest.mark.parametrize("what", [*KEEPS, *CLEARS])
def test_qemu_keeps_the_extension_and_clears_the_bit_when_it_opens_read_write(
        tmp_path: Path, what: str) -> None:
    parent = tmp_path / "parent.qcow2"
    img = tmp_path / "img.qcow2"
    pid = create_qcow2(str(parent), SIZE)
    cid = create_qcow2(str(img), SIZE, backing="parent.qcow2", backing_format="qcow2",
                       parent_id=pid)
    cmd = [str(tmp_path / "out.raw") if a == "OUT" else str(img) if a == "IMG" else a
           for a in (KEEPS | CLEARS)[what]]
    subprocess.run(cmd, check=True, capture_output=True)
    assert raw_extension(img) == (1, 1, cid, pid), "QEMU must keep the extension as it was"
    if what in KEEPS:
        assert autoclear_of(img) == BIT
        assert identity_of(img).content_id == cid
    else:
        assert autoclear_of(img) & BIT == 0
        got = identity_of(img)
        assert got.state == ident.UNKNOWN and got.content_id is None
        assert "identity bit is clear" in got.reason
    qemu_img.check_clean(img)


# -- writes through vdisk ---------------------------------------------------------------------


def test_first_write_after_open_gives_a_fresh_id(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    bid = create_qcow2(str(tmp_path / "parent.qcow2"), SIZE)
    create_qcow2(str(top), SIZE, backing="parent.qcow2", backing_format="qcow2", parent_id=bid)
    first = identity_of(top)

    d = open_disk(str(top))                 # reading only changes nothing
    digest = header_digest(top)
    assert d.read(64 * KiB, 0) == bytes(64 * KiB)
    d.close()
    assert header_digest(top) == digest and identity_of(top) == first

    d = open_disk(str(top))
    try:
        d.write(b"\x21" * 5000, 100)
        second = identity_of(top)           # on disk before the write returned
        assert second.valid and second.content_id not in (None, first.content_id)
        assert second.parent_id == bid
        d.write(b"\x22" * 5000, 1 * MiB)    # same open: no other ID
        d.zero(64 * KiB, 2 * MiB)
        d.flush()
        assert identity_of(top) == second
    finally:
        d.close()
    assert identity_of(top) == second

    vdisk_write(top, b"\x23" * 512, 3 * MiB)     # a new open: a new ID
    third = identity_of(top)
    assert third.valid and third.content_id not in (first.content_id, second.content_id)
    assert third.parent_id == bid
    oracle = bytearray(SIZE)
    oracle[100:5100] = b"\x21" * 5000
    oracle[MiB:MiB + 5000] = b"\x22" * 5000
    oracle[3 * MiB:3 * MiB + 512] = b"\x23" * 512
    assert_matches_oracle(top, oracle, tmp_path)


def test_qemu_write_after_vdisk_makes_identity_unknown(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    create_qcow2(str(img), SIZE)
    vdisk_write(img, b"\x31" * 4096, 0)
    cid = identity_of(img).content_id
    qemu_io.run(img, "write -P 0x32 4k 4k")
    got = identity_of(img)
    assert got.state == ident.UNKNOWN and autoclear_of(img) & BIT == 0
    assert raw_extension(img) == (1, 0, cid, bytes(16))
    vdisk_write(img, b"\x33" * 4096, 8 * KiB)   # vdisk writes again: valid, fresh
    again = identity_of(img)
    assert again.valid and again.content_id != cid
    oracle = bytearray(SIZE)
    oracle[0:12 * KiB] = b"\x31" * 4096 + b"\x32" * 4096 + b"\x33" * 4096
    assert_matches_oracle(img, oracle, tmp_path)


# cluster size, backing file name, whether the header cluster has room for the extension
QEMU_IMAGES = [
    pytest.param(64 * KiB, None, True, id="no-backing"),
    pytest.param(64 * KiB, "base.qcow2", True, id="backing"),
    pytest.param(64 * KiB, long_name(1023), True, id="backing-1023"),
    pytest.param(4 * KiB, long_name(1023), True, id="4k-backing-1023"),
    pytest.param(512, None, True, id="512-no-backing"),
    pytest.param(512, "base.qcow2", True, id="512-backing"),
    pytest.param(512, long_name(180), True, id="512-backing-180"),
    pytest.param(512, long_name(200), False, id="512-backing-200"),
    pytest.param(2 * KiB, long_name(1023), False, id="2k-backing-1023"),
]


@pytest.mark.parametrize("cluster,backing,fits", QEMU_IMAGES)
def test_first_vdisk_write_adds_the_extension(tmp_path: Path, base: Path, cluster: int,
                                              backing: str | None, fits: bool) -> None:
    img = tmp_path / "img.qcow2"
    qemu_create(img, backing, cluster)
    qemu_io.run(img, "write -P 0x41 1M 64k")
    oracle = bytearray(raw_view(img, tmp_path))
    assert identity_of(img).state == ident.UNKNOWN

    vdisk_write(img, b"\x42" * 3000, 2 * MiB - 1000)
    oracle[2 * MiB - 1000:2 * MiB + 2000] = b"\x42" * 3000
    got = identity_of(img)
    if fits:
        assert got.valid and got.parent_id is None and autoclear_of(img) == BIT
        assert raw_extension(img) == (1, 0, got.content_id, bytes(16))
    else:
        assert got.state == ident.UNKNOWN and raw_extension(img) is None
        assert autoclear_of(img) == 0
    assert backing_name(img) == backing
    assert_matches_oracle(img, oracle, tmp_path)

    vdisk_write(img, b"\x43" * 512, 0)          # and writes again
    oracle[0:512] = b"\x43" * 512
    assert identity_of(img).valid == fits
    qemu_io.run(img, "write -P 0x44 3M 4k")     # QEMU opens and writes what we left
    oracle[3 * MiB:3 * MiB + 4096] = b"\x44" * 4096
    assert identity_of(img).state == ident.UNKNOWN
    assert (raw_extension(img) is not None) == fits
    assert backing_name(img) == backing
    assert_matches_oracle(img, oracle, tmp_path)


def test_vdisk_write_clears_the_autoclear_bits_it_does_not_maintain(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    qemu_create(img)
    qemu_img.run(["bitmap", "--add", img, "b0"])
    assert autoclear_of(img) == 1               # QEMU's bitmaps bit
    vdisk_write(img, b"\x51" * 4096, 0)
    assert autoclear_of(img) == BIT and identity_of(img).valid
    qemu_io.run(img, "read -P 0x51 0 4k", readonly=True)
    # QEMU now takes the bitmaps for inconsistent, and their clusters for leaked
    r = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True,
                       check=True)
    assert "a program lacking bitmap support modified this file" in r.stderr, r.stderr
    result = qemu_img.check(img)
    assert result["corruptions"] == 0 and result["leaks"] > 0


def test_v2_images_have_no_identity(tmp_path: Path) -> None:
    img = tmp_path / "v2.qcow2"
    qemu_create(img, compat="0.10")
    assert identity_of(img).state == ident.UNSUPPORTED
    before = img.read_bytes()[:72]
    vdisk_write(img, b"\x61" * 4096, 0)         # written, not given an ID
    assert img.read_bytes()[:72] == before and identity_of(img).state == ident.UNSUPPORTED
    with pytest.raises(UnsupportedImage, match="version 2"):
        ident.write_path(str(img), ident.new_id(), None)
    d = open_disk(str(img))                     # a child of it records no parent
    try:
        snapshot(d, str(tmp_path / "child.qcow2"))
    finally:
        d.close()
    child = identity_of(tmp_path / "child.qcow2")
    assert child.valid and child.parent_id is None
    open_chain(str(tmp_path / "child.qcow2"), readonly=True)[0].close()


def _patch_extension(path: Path, offset_in_data: int, value: bytes) -> None:
    h, _ = ident.read(str(path))
    assert h is not None
    with path.open("r+b") as f:
        f.seek(h.ext_offsets[ident.hdr.EXT_VDISK_IDENTITY] + offset_in_data)
        f.write(value)


@pytest.mark.parametrize("change,state", [
    ("version 2", ident.UNKNOWN),
    ("flags 0", ident.VALID),          # the parent field is not read
    ("reserved flag", ident.VALID),    # unknown flag bits are ignored
])
def test_reader_rules(tmp_path: Path, change: str, state: str) -> None:
    img = tmp_path / "img.qcow2"
    pid = ident.new_id()
    cid = create_qcow2(str(img), SIZE, parent_id=pid)
    if change == "version 2":
        _patch_extension(img, 0, struct.pack(">I", 2))
    elif change == "flags 0":
        _patch_extension(img, 4, struct.pack(">I", 0))
    else:
        _patch_extension(img, 4, struct.pack(">I", 1 | 1 << 7))
    got = identity_of(img)
    assert got.state == state
    if state == ident.VALID:
        assert got.content_id == cid
        assert got.parent_id == (None if change == "flags 0" else pid)
    vdisk_write(img, b"\x71" * 512, 0)          # a writer rewrites version 1
    after = identity_of(img)
    # no backing file: the fresh ID records no parent, and no reserved flag
    assert after.valid and raw_extension(img)[:2] == (1, 0)
    assert after.parent_id is None


# -- snapshots and chains ---------------------------------------------------------------------


def test_snapshot_records_the_old_tops_id(tmp_path: Path, opened) -> None:
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), SIZE)
    d = opened(top)
    d.write(b"\x81" * 4096, 0)
    written = identity_of(top)
    snap = tmp_path / "snap.qcow2"
    snapshot(d, str(snap))
    assert identity_of(top) == written            # frozen with the ID of its content
    new = identity_of(snap)
    assert new.valid and new.parent_id == written.content_id
    d.write(b"\x82" * 4096, 4096)               # the new top's first write
    after = identity_of(snap)
    assert after.valid and after.content_id != new.content_id
    assert after.parent_id == written.content_id
    d.close()
    open_chain(str(snap), readonly=True)[0].close()
    for p in (top, snap):
        qemu_img.check_clean(p, allow_leaks=False)


@pytest.mark.parametrize("backing", [None, "./" * 95 + "/base.qcow2"],
                         ids=["fits", "512-no-room"])
def test_snapshot_stamps_an_unknown_top_first(tmp_path: Path, base: Path, opened,
                                              backing: str | None) -> None:
    top = tmp_path / "top.qcow2"
    qemu_create(top, backing, 512 if backing else 64 * KiB)
    qemu_io.run(top, "write -P 0x91 0 64k")
    oracle = raw_view(top, tmp_path)
    assert identity_of(top).state == ident.UNKNOWN
    d = opened(top)
    snap = tmp_path / "snap.qcow2"
    snapshot(d, str(snap))
    d.close()
    old, new = identity_of(top), identity_of(snap)
    assert new.valid
    if backing is None:
        assert old.valid and new.parent_id == old.content_id
    else:                                       # no room: nothing to record
        assert old.state == ident.UNKNOWN and new.parent_id is None
    open_chain(str(snap), readonly=True)[0].close()
    assert_matches_oracle(snap, oracle, tmp_path)
    qemu_img.check_clean(top, allow_leaks=False)


@pytest.fixture
def chain3(tmp_path: Path) -> list[Path]:
    """base <- mid <- top, made by vdisk (each child records its parent), top first."""
    paths = [tmp_path / n for n in ("top.qcow2", "mid.qcow2", "base.qcow2")]
    parent = create_qcow2(str(paths[2]), SIZE)
    parent = create_qcow2(str(paths[1]), SIZE, backing="base.qcow2", backing_format="qcow2",
                          parent_id=parent)
    create_qcow2(str(paths[0]), SIZE, backing="mid.qcow2", backing_format="qcow2",
                 parent_id=parent)
    return paths


def test_open_chain_accepts_an_unchanged_chain(chain3: list[Path]) -> None:
    for readonly in (True, False):
        for f in open_chain(str(chain3[0]), readonly):
            f.close()


@pytest.mark.parametrize("layer", [1, 2], ids=["mid", "base"])
@pytest.mark.parametrize("writer", ["qemu-io", "vdisk"])
def test_open_chain_refuses_a_modified_parent(chain3: list[Path], layer: int,
                                              writer: str) -> None:
    parent = chain3[layer]
    recorded = identity_of(chain3[layer - 1]).parent_id
    top_before = identity_of(chain3[0])
    if writer == "qemu-io":
        qemu_io.run(parent, "write -P 0xa1 0 4k")
        why = "its identity is unknown"
    else:
        vdisk_write(parent, b"\xa1" * 4096, 0)      # the parent opened alone
        why = (f"its content ID is {ident.format_id(identity_of(parent).content_id)}, "
               f"the child recorded {ident.format_id(recorded)}")
    for readonly in (True, False):
        with pytest.raises(ImageError) as excinfo:
            open_chain(str(chain3[0]), readonly)
        text = str(excinfo.value)
        assert f"{chain3[layer - 1]}: backing chain: parent {parent} {MODIFIED}: " in text
        assert why in text
    assert identity_of(chain3[0]) == top_before     # the refusal wrote nothing


def test_a_child_that_recorded_no_parent_opens(tmp_path: Path) -> None:
    parent = tmp_path / "parent.qcow2"
    create_qcow2(str(parent), SIZE)
    child = tmp_path / "child.qcow2"
    qemu_create(child, "parent.qcow2")
    vdisk_write(parent, b"\xb1" * 4096, 0)      # the parent changes
    qemu_io.run(parent, "write -P 0xb2 4k 4k")   # ... and is even unknown now
    vdisk_write(child, b"\xb3" * 4096, 8 * KiB)  # the child is given an ID, no parent
    got = identity_of(child)
    assert got.valid and got.parent_id is None
    open_chain(str(child), readonly=True)[0].close()


@pytest.mark.parametrize("lost", ["check-r-leaks", "qemu-io-write", "never-recorded"])
def test_a_vdisk_write_ties_the_image_to_its_parent_again(tmp_path: Path, lost: str) -> None:
    """An image whose link to its parent is not recorded (another writer cleared its
    identity bit, or it was made without a parent ID) records the parent's current
    ID at vdisk's next write, so a later change of the parent is refused."""
    parent = tmp_path / "parent.qcow2"
    pid = create_qcow2(str(parent), SIZE)
    child = tmp_path / "child.qcow2"
    create_qcow2(str(child), SIZE, backing="parent.qcow2", backing_format="qcow2",
                 parent_id=None if lost == "never-recorded" else pid)
    if lost == "check-r-leaks":
        qemu_img.run(["check", "-q", "-r", "leaks", child])
    elif lost == "qemu-io-write":
        qemu_io.run(child, "write -P 0xc1 0 4k")
    expect = ident.VALID if lost == "never-recorded" else ident.UNKNOWN
    assert identity_of(child).state == expect

    vdisk_write(child, b"\xc2" * 4096, 8 * KiB)
    got = identity_of(child)
    assert got.valid and got.parent_id == pid
    for f in open_chain(str(child), readonly=True):
        f.close()

    vdisk_write(parent, b"\xc3" * 4096, 0)      # the parent changes: the chain is refused
    with pytest.raises(ImageError, match=MODIFIED):
        open_chain(str(child), readonly=True)


# -- crash safety ---------------------------------------------------------------------------


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs (no except clause catches it)."""


def _kinds(tmp_path: Path, base: Path) -> dict[str, tuple[Path, str | None]]:
    """Images whose first vdisk write takes each path through identity.write."""
    out: dict[str, tuple[Path, str | None]] = {}
    p = tmp_path / "t-plain.qcow2"
    qemu_create(p)
    out["insert"] = (p, None)
    p = tmp_path / "t-backing.qcow2"
    qemu_create(p, "base.qcow2")
    out["insert, moving the backing name"] = (p, "base.qcow2")
    p = tmp_path / "t-512.qcow2"
    qemu_create(p, long_name(100), 512)
    out["insert, 512-byte clusters"] = (p, long_name(100))
    p = tmp_path / "t-bitset.qcow2"       # the bit set without an extension
    qemu_create(p, "base.qcow2")
    with p.open("r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", BIT))
    out["insert, bit set first"] = (p, "base.qcow2")
    pid = create_qcow2(str(tmp_path / "vparent.qcow2"), SIZE)
    p = tmp_path / "t-rewrite.qcow2"
    create_qcow2(str(p), SIZE, backing="vparent.qcow2", backing_format="qcow2", parent_id=pid)
    out["rewrite in place"] = (p, "vparent.qcow2")
    p = tmp_path / "t-rewrite-clear.qcow2"
    create_qcow2(str(p), SIZE, backing="base.qcow2", backing_format="qcow2")
    qemu_io.run(p, "write -P 0xc1 0 4k")
    out["rewrite, then set the bit"] = (p, "base.qcow2")
    return out


def _crash_during_identity_write(image: Path, stop: int, torn: int | None,
                                 monkeypatch: pytest.MonkeyPatch
                                 ) -> tuple[list[int], list[bytes]]:
    """Write through vdisk, dying at the stop-th pwrite/fdatasync of identity.write
    (its first torn bytes written, if torn). Returns the calls made (the length
    written by a pwrite, 0 for an fdatasync) and the IDs the run generated."""
    calls: list[int] = []
    made: list[bytes] = []
    real_pwrite, real_sync, real_write = os.pwrite, os.fdatasync, ident.write
    real_new_id = ident.new_id

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if len(calls) == stop:
            if torn is not None:
                real_pwrite(fd, bytes(data)[:torn], offset)
            raise Crash
        calls.append(len(data))
        return real_pwrite(fd, data, offset)

    def fdatasync(fd: int) -> None:
        if len(calls) == stop:
            raise Crash
        calls.append(0)
        real_sync(fd)

    def write(*args, **kwargs) -> ident.Identity:
        with monkeypatch.context() as m:
            m.setattr(ident.os, "pwrite", pwrite)
            m.setattr(ident.os, "fdatasync", fdatasync)
            return real_write(*args, **kwargs)

    def new_id() -> bytes:
        made.append(real_new_id())
        return made[-1]

    d = open_disk(str(image))
    try:
        with monkeypatch.context() as m:
            m.setattr(ident, "write", write)
            m.setattr(ident, "new_id", new_id)
            try:
                d.write(b"\xd1" * 4096, 64 * KiB)
                d.flush()
            except Crash:
                pass
    finally:
        for f in d.layers:
            f.close()
    return calls, made


def test_a_crash_at_any_step_of_an_identity_write_leaves_a_sound_image(
        tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step of identity.write/_insert is followed by an fdatasync, so a
    crash leaves the file as it was after some prefix of the steps, the last
    one possibly torn. For every such state: QEMU opens the image (check
    clean, same backing file, same data), its identity is unknown or valid
    with an ID of its own, and the next vdisk write gives it a valid one.
    """
    base_view = raw_view(base, tmp_path)
    tried = 0
    kinds = _kinds(tmp_path, base)
    ids = [identity_of(p) for p in tmp_path.glob("*.qcow2")]
    others = {i.content_id for i in ids if i.valid} | {i.parent_id for i in ids if i.valid}
    for kind, (template, backing) in kinds.items():
        before = identity_of(template)
        own = {before.content_id} if before.valid else set()
        expected = tmp_path / "expected.raw"
        expected.write_bytes(raw_view(template, tmp_path))
        calls, _ = _crash_during_identity_write(_copy(template, "count"), -1, None,
                                                monkeypatch)
        assert len(calls) >= 2 and calls[-1] == 0, kind    # the last step is a sync
        unrelated = others - own
        for stop, length in enumerate(calls):
            for torn in (None, *(t for t in (8, 20) if t < length)):
                image = _copy(template, "trial")
                _, made = _crash_during_identity_write(image, stop, torn, monkeypatch)
                where = f"{kind}: crash at call {stop}, torn={torn}"
                got = identity_of(image)
                assert got.state in (ident.VALID, ident.UNKNOWN), where
                if got.valid:       # the old ID, a new one, or a torn mix of the two
                    mixes = {n[:j] + o[j:] for n in made for o in own for j in range(17)}
                    assert got.content_id in own | set(made) | mixes, where
                    assert got.content_id not in unrelated, where
                h, _ = ident.read(str(image))
                assert h is not None and h.backing_file == backing, where
                r = qemu_img.check(image)
                assert r["corruptions"] == 0 and r["leaks"] == 0, (where, r)
                try:
                    qemu_img.compare(image, expected, fmt_b="raw")
                except QemuImgError as e:
                    raise AssertionError(f"{where}: {e}") from e
                vdisk_write(image, b"\xd2" * 512, 0)        # restart: a valid ID
                assert identity_of(image).valid, where
                tried += 1
    assert tried >= 50, tried
    assert raw_view(base, tmp_path) == base_view


def _copy(template: Path, name: str) -> Path:
    path = template.with_name(f"{name}.qcow2")
    path.write_bytes(template.read_bytes())
    return path


def test_a_crash_after_moving_the_backing_name_leaves_room_to_retry(
        tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header cluster has room for the extension; a crash after _insert moved
    the backing name (and pointed the header at it) must not take that room away:
    a retry finds the name already out of the way and does not move it again.
    """
    name = long_name(150)
    fresh = tmp_path / "fresh.qcow2"
    qemu_create(fresh, name, 512)
    vdisk_write(fresh, b"\xe1" * 512, 0)
    assert identity_of(fresh).valid             # room for the extension, without a crash
    img = tmp_path / "img.qcow2"
    qemu_create(img, name, 512)
    oracle = bytearray(raw_view(img, tmp_path))
    # calls of identity.write: 0 write the name, 1 sync, 2 point at it, 3 sync, 4 zero...
    _crash_during_identity_write(img, 4, None, monkeypatch)
    h, got = ident.read(str(img))
    assert h is not None and h.backing_file == name and got.state == ident.UNKNOWN
    vdisk_write(img, b"\xe2" * 512, 0)
    oracle[0:512] = b"\xe2" * 512
    assert_matches_oracle(img, oracle, tmp_path)
    assert identity_of(img).valid, identity_of(img).reason
