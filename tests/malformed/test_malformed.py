"""Malformed and unsupported images: refused cleanly, never a crash, never a write.

Each test copies a small valid image that QEMU wrote, breaks one thing, and
serves it read-write. Either nbdkit refuses to start with a one-line error
naming the reason (no traceback, a normal exit code), or, for damage that only
a request can find, that request fails while the server keeps answering the
others. Either way the image files are byte-for-byte unchanged and no other
file appears or changes.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
import qcow2layout as q
from nbdharness import KiB, MiB, Served, pread_deadline, pwrite_deadline, snapshot_tree

from vdisk import qemu_img, qemu_io
from vdisk.errors import NbdkitError

SIZE = 4 * MiB
CS = 64 * KiB
COPIED = 1 << 63
GENERIC = ("malformed", "out of range", "invalid")
IO = (
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 128k",
    "write -z 2M 64k",
    "write -c -P 0x33 3M 64k",
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("malformed-template") / "disk.qcow2"
    qemu_img.create(path, "qcow2", SIZE, options={"cluster_size": CS})
    qemu_io.run(path, *IO, fmt="qcow2")
    assert qemu_img.check(path)["corruptions"] == 0
    return path


@pytest.fixture
def image(template: Path, workdir: Path) -> Path:
    path = workdir / "disk.qcow2"
    shutil.copyfile(template, path)
    return path


@dataclass
class Refused:
    stderr: str


def serve_or_refuse(serve, image: Path, keywords: tuple[str, ...]) -> Served | Refused:
    """Serve; if nbdkit refuses, check the refusal is clean and names a keyword."""
    try:
        return serve(image)
    except NbdkitError as e:
        assert e.returncode is not None and e.returncode > 0, f"not a clean exit: {e}"
        text = e.stderr
        assert "Traceback (most recent call last)" not in text, text
        lines = [line for line in text.splitlines() if any(k in line.lower() for k in keywords)]
        assert lines, f"no line of the error names any of {keywords}: {text!r}"
        return Refused(text)


def assert_refused(serve, image: Path, *keywords: str) -> str:
    before = snapshot_tree(image.parent)
    outcome = serve_or_refuse(serve, image, keywords)
    assert isinstance(outcome, Refused), f"nbdkit served {image.name} (expected: {keywords})"
    assert snapshot_tree(image.parent) == before
    return outcome.stderr


def assert_refused_or_request_fails(
    serve, image: Path, bad: int, good: int | None, *keywords: str
) -> None:
    """Refused at start, or the read of guest offset ``bad`` fails and ``good`` still reads.

    With ``good=None`` (no undamaged region to read) the server must still be
    alive and answer a request that needs no data (the export size).
    """
    before = snapshot_tree(image.parent)
    outcome = serve_or_refuse(serve, image, keywords)
    if isinstance(outcome, Served):
        h = outcome.connect()
        with pytest.raises(nbd.Error):
            pread_deadline(h, 4096, bad)
        assert outcome.alive(), "nbdkit died after a failed request"
        if good is not None:
            assert len(pread_deadline(h, 4096, good)) == 4096
        else:
            assert outcome.connect().get_size() == SIZE
        text = outcome.stderr().lower()
        assert any(k in text for k in keywords), f"no error names {keywords}: {text!r}"
        outcome.stop()
        assert outcome.server.returncode in (0, -15), outcome.server.returncode
    assert snapshot_tree(image.parent) == before


# --- header fields ------------------------------------------------------------

HEADER_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("bad-magic", lambda p: q.set_field(p, "magic", 0x514649FA), ("magic", "not a qcow2", "raw")),
    ("version-1", lambda p: q.set_field(p, "version", 1), ("version",)),
    ("version-4", lambda p: q.set_field(p, "version", 4), ("version",)),
    ("cluster-bits-8", lambda p: q.set_field(p, "cluster_bits", 8), ("cluster",)),
    ("cluster-bits-22", lambda p: q.set_field(p, "cluster_bits", 22), ("cluster",)),
    ("cluster-bits-63", lambda p: q.set_field(p, "cluster_bits", 63), ("cluster",)),
    ("size-huge", lambda p: q.set_field(p, "size", 1 << 62), ("size", "l1")),
    ("size-negative", lambda p: q.set_field(p, "size", 0xFFFF_FFFF_FFFF_FE00), ("size", "l1")),
    ("size-beyond-l1", lambda p: q.set_field(p, "size", 1 << 40), ("l1", "size")),
    ("l1-size-zero", lambda p: q.set_field(p, "l1_size", 0), ("l1",)),
    ("l1-beyond-eof", lambda p: q.set_field(p, "l1_table_offset", 1000 * CS), ("l1", "beyond")),
    ("l1-unaligned", lambda p: q.set_field(p, "l1_table_offset", 3 * CS + 8), ("l1", "align")),
    ("refcount-table-beyond-eof", lambda p: q.set_field(p, "refcount_table_offset", 1000 * CS),
     ("refcount",)),
    ("refcount-table-unaligned", lambda p: q.set_field(p, "refcount_table_offset", CS + 512),
     ("refcount",)),
    ("refcount-table-zero", lambda p: q.set_field(p, "refcount_table_offset", 0), ("refcount",)),
    ("refcount-table-clusters-zero", lambda p: q.set_field(p, "refcount_table_clusters", 0),
     ("refcount",)),
    ("refcount-order-7", lambda p: q.set_field(p, "refcount_order", 7), ("refcount",)),
    ("header-length-short", lambda p: q.set_field(p, "header_length", 96), ("header",)),
    ("header-length-unaligned", lambda p: q.set_field(p, "header_length", 113), ("header",)),
]


@pytest.mark.parametrize("mutate,keywords", [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
def test_bad_header_field(serve, image: Path, mutate, keywords) -> None:
    mutate(image)
    assert_refused(serve, image, *keywords, *GENERIC)


# --- feature bits: refused by name ----------------------------------------------

FEATURE_CASES = [
    ("corrupt-bit", 1 << 1, 0, ("corrupt",)),
    ("dirty-bit", 1 << 0, 0, ("dirty",)),
    ("external-data-file", 1 << 2, 0, ("external data file",)),
    ("extended-l2", 1 << 4, 0, ("extended l2",)),
    ("zstd", 1 << 3, 1, ("zstd",)),
    ("unknown-incompatible-bit-5", 1 << 5, 0, ("unknown incompatible feature",)),
    ("unknown-incompatible-bit-63", 1 << 63, 0, ("unknown incompatible feature",)),
]


@pytest.mark.parametrize("bit,compression,keywords", [c[1:] for c in FEATURE_CASES],
                         ids=[c[0] for c in FEATURE_CASES])
def test_incompatible_feature(serve, image: Path, bit: int, compression: int, keywords) -> None:
    q.set_field(image, "incompatible_features", q.get_field(image, "incompatible_features") | bit)
    if compression:
        assert q.get_field(image, "header_length") > 104
        q.set_field(image, "compression_type", compression)
    assert_refused(serve, image, *keywords)


def test_encrypted(serve, image: Path) -> None:
    q.set_field(image, "crypt_method", 1)
    assert_refused(serve, image, "encrypt")


def test_dirty_after_qemu_abort(serve, workdir: Path) -> None:
    """A lazy-refcounts image QEMU left dirty (qemu-io aborted after a write)."""
    path = workdir / "lazy.qcow2"
    qemu_img.create(path, "qcow2", SIZE, options={"lazy_refcounts": True})
    proc = subprocess.run(
        [qemu_io.binary(), "-f", "qcow2", "-c", "write -P 0x44 0 64k", "-c", "abort", str(path)],
        capture_output=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )
    assert proc.returncode != 0
    assert qemu_img.info(path)["dirty-flag"] is True
    assert_refused(serve, path, "dirty")


# --- L2 entries and refcounts -------------------------------------------------------


@pytest.mark.parametrize("where", ["beyond-eof", "into-l1-table", "into-refcount-table",
                                   "unaligned"])
def test_bad_l2_entry(serve, image: Path, where: str) -> None:
    layout = q.read_layout(image)
    guest = 1 * MiB
    entry = dict(layout.data_entries())[guest]
    host = entry & q.OFFSET_MASK
    target = {
        "beyond-eof": (layout.file_size // CS + 100) * CS,
        "into-l1-table": layout.l1_offset,
        "into-refcount-table": layout.refcount_table_offset,
        "unaligned": host + 512,
    }[where]
    q.poke_u64(image, layout.l2_entry_position(guest), target | COPIED)
    assert_refused_or_request_fails(serve, image, guest, 0, "l2", "beyond", "align", "overlap",
                                    "metadata", "refcount", *GENERIC)


def test_l1_entry_beyond_eof(serve, image: Path) -> None:
    layout = q.read_layout(image)
    q.poke_u64(image, layout.l1_offset, ((layout.file_size // CS + 100) * CS) | COPIED)
    assert_refused_or_request_fails(serve, image, 0, None, "l2", "l1", "beyond", *GENERIC)


@pytest.mark.parametrize("what", ["data", "l2-table"])
def test_refcount_too_low(serve, image: Path, what: str) -> None:
    """A used cluster with refcount 0: never hand it out again (QEMU check calls it corrupt)."""
    layout = q.read_layout(image)
    original = qemu_view(image)
    if what == "data":
        host = dict(layout.data_entries())[1 * MiB] & q.OFFSET_MASK
    else:
        host = layout.l2_offsets[0]
    q.poke(image, layout.refcount_position(host), b"\0\0")
    assert qemu_img.check(image)["corruptions"] > 0
    before = snapshot_tree(image.parent)
    outcome = serve_or_refuse(serve, image, ("refcount", "corrupt", *GENERIC))
    if isinstance(outcome, Refused):
        assert snapshot_tree(image.parent) == before
        return
    h = outcome.connect()
    written = {}
    failed = False
    for i, guest in enumerate([1536 * KiB, 2560 * KiB, 3584 * KiB, 3 * MiB + CS]):
        data = bytes([0x60 + i]) * CS
        try:
            pwrite_deadline(h, data, guest)
            written[guest] = data
        except nbd.Error:
            failed = True
    assert outcome.alive()
    if failed:
        assert not written, "some allocating writes failed and others succeeded"
        outcome.stop()
        assert snapshot_tree(image.parent) == before
        return
    # the engine accepted the writes: they must not have landed on the used cluster
    h.flush()
    outcome.stop()
    after = qemu_view(image)
    for guest, data in written.items():
        assert after[guest : guest + CS] == data
    mask = set(range(len(original) // CS)) - {g // CS for g in written}
    for c in sorted(mask):
        assert after[c * CS : (c + 1) * CS] == original[c * CS : (c + 1) * CS], (
            f"guest cluster {c} changed: a cluster in use was handed out again"
        )


def qemu_view(image: Path) -> bytes:
    raw = image.parent.parent / "view.raw"
    qemu_img.convert(image, raw, "raw", force_share=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


# --- backing files -----------------------------------------------------------------


def test_backing_loop(serve, workdir: Path) -> None:
    a, b = workdir / "a.qcow2", workdir / "b.qcow2"
    qemu_img.create(b, "qcow2", SIZE)
    qemu_img.create(a, "qcow2", SIZE, backing="b.qcow2", backing_fmt="qcow2")
    qemu_img.rebase(b, "a.qcow2", "qcow2", unsafe=True)
    assert_refused(serve, a, "loop")


def test_backing_self_loop(serve, workdir: Path) -> None:
    a = workdir / "a.qcow2"
    qemu_img.create(a, "qcow2", SIZE)
    qemu_img.rebase(a, "a.qcow2", "qcow2", unsafe=True)
    assert_refused(serve, a, "loop")


@pytest.mark.parametrize("name", ["missing.qcow2", "/nonexistent/dir/missing.qcow2"])
def test_missing_backing_file(serve, image: Path, name: str) -> None:
    qemu_img.rebase(image, name, "qcow2", unsafe=True)
    stderr = assert_refused(serve, image, "not found")
    assert "backing" in stderr.lower()


def test_missing_backing_file_deeper(serve, workdir: Path) -> None:
    base, mid, top = workdir / "base.qcow2", workdir / "mid.qcow2", workdir / "top.qcow2"
    qemu_img.create(base, "qcow2", SIZE)
    qemu_img.create(mid, "qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2")
    qemu_img.create(top, "qcow2", SIZE, backing="mid.qcow2", backing_fmt="qcow2")
    base.unlink()
    assert_refused(serve, top, "not found")


@pytest.mark.parametrize("how", ["too-long", "outside-header-cluster", "beyond-eof"])
def test_bad_backing_name(serve, image: Path, how: str) -> None:
    qemu_img.rebase(image, "backing.qcow2", "qcow2", unsafe=True)
    if how == "too-long":
        q.set_field(image, "backing_file_size", 1024)
    elif how == "outside-header-cluster":
        q.set_field(image, "backing_file_offset", CS - 4)
    else:
        q.set_field(image, "backing_file_offset", 1000 * CS)
    assert_refused(serve, image, "backing", *GENERIC)


# --- truncated files -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["in-header", "l1-table", "last-data-cluster"])
def test_truncated(serve, image: Path, where: str) -> None:
    layout = q.read_layout(image)
    last_data = max(e & q.OFFSET_MASK for _, e in layout.data_entries())
    length = {
        "in-header": 50,
        "l1-table": layout.l1_offset + 4,
        "last-data-cluster": last_data + 100,
    }[where]
    with image.open("r+b") as f:
        f.truncate(length)
    if where == "last-data-cluster":
        guest = next(g for g, e in layout.data_entries() if e & q.OFFSET_MASK == last_data)
        assert_refused_or_request_fails(serve, image, guest + 4096, 0, "beyond", "truncated",
                                        "end of the file", "eof", *GENERIC)
    else:
        assert_refused(serve, image, "beyond", "truncated", "magic", "end of the file",
                       "header", *GENERIC)
