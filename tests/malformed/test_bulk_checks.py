"""The bulk checks and map building at open agree with the entry-by-entry ones.

Opening an image checks every L2 entry and every cluster's references, and
builds the cluster map, a whole L2 table at a time where its entries are
plain data (image.plain_offsets, TopImage._references_fit, ClusterMap._apply_plain),
whole tables at once as lanes of one integer (lanes.py).
The entry-by-entry code stays for compressed clusters and for the error
messages; these tests hold the two to the same answers on damaged images
and random tables.
"""

from __future__ import annotations

import shutil
from array import array
from pathlib import Path
from unittest import mock

import pytest
import qcow2layout as q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk import qemu_img, qemu_io
from vdisk_block import lanes
from vdisk_block.clustermap import CHUNK, ClusterMap
from vdisk_block.create import create_qcow2
from vdisk_block.errors import MalformedImage
from vdisk_block.image import COMPRESSED, COPIED, L2_RESERVED, OFFSET_MASK, ZERO_FLAG, Qcow2File
from vdisk_block.top import TopImage

KiB, MiB = 1024, 1024 * 1024
CS = 64 * KiB


def _template(root: Path, compressed: bool) -> Path:
    path = root / ("compressed.qcow2" if compressed else "plain.qcow2")
    qemu_img.create(path, "qcow2", 8 * MiB, options={"cluster_size": CS})
    io = ["write -P 0x11 0 64k", "write -P 0x22 1M 192k", "write -z 2M 64k",
          "write -P 0x44 5M 64k"]
    if compressed:
        io.append("write -c -P 0x33 3M 64k")
    qemu_io.run(path, *io, fmt="qcow2")
    assert qemu_img.check(path)["corruptions"] == 0
    return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("bulk-templates")
    return {c: _template(root, c) for c in (False, True)}


# one damage: ("refcount", which referenced cluster, new count) or
# ("entry", which data entry, what it points at now)
damage = st.one_of(
    st.tuples(st.just("refcount"), st.integers(0, 63), st.sampled_from([0, 1])),
    st.tuples(st.just("entry"), st.integers(0, 63),
              st.sampled_from(["other-data", "l1", "refcount-table", "header", "beyond-eof",
                               "unaligned", "reserved", "zero-with-offset", "zero",
                               "compressed", "unallocated", "l2-table"])),
)


def _damage(path: Path, what: tuple) -> None:
    layout = q.read_layout(path)
    data = layout.data_entries()
    kind, index, how = what
    if kind == "refcount":
        used = sorted({e & OFFSET_MASK for _g, e in data} | set(layout.l2_offsets)
                      | {0, layout.l1_offset, layout.refcount_table_offset})
        host = used[index % len(used)]
        q.poke(path, layout.refcount_position(host), how.to_bytes(2, "big"))
        return
    guest, entry = data[index % len(data)]
    host = entry & OFFSET_MASK
    others = [e & OFFSET_MASK for _g, e in data if e & OFFSET_MASK != host]
    new = {
        "other-data": others[index % len(others)] | COPIED,
        "l1": layout.l1_offset | COPIED,
        "refcount-table": layout.refcount_table_offset | COPIED,
        "header": COPIED,
        "beyond-eof": (layout.file_size // CS + 3) * CS | COPIED,
        "unaligned": (host + 512) | COPIED,
        "reserved": host | COPIED | (1 << 57),
        "zero-with-offset": host | COPIED | ZERO_FLAG,
        "zero": ZERO_FLAG,
        "compressed": COMPRESSED | host,
        "unallocated": 0,
        "l2-table": layout.l2_offsets[0] | COPIED,
    }[how]
    q.poke_u64(path, layout.l2_entry_position(guest), new)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(compressed=st.booleans(), damages=st.lists(damage, min_size=0, max_size=3))
def test_reference_check_in_bulk_agrees(templates, tmp_path: Path, compressed: bool,
                                        damages: list) -> None:
    path = tmp_path / "disk.qcow2"
    shutil.copyfile(templates[compressed], path)
    for what in damages:
        _damage(path, what)
    f = Qcow2File(str(path), writable=True)
    try:
        with mock.patch.object(TopImage, "_check_references", lambda self: None):
            top = TopImage(f)
        fit = top._references_fit()
        try:
            top._check_references_one_by_one()
            passes = True
        except MalformedImage:
            passes = False
        has_compressed = any(e & COMPRESSED for l2 in top.l2.values() for e in l2)
        if has_compressed:
            assert not fit          # compressed clusters are left to the one-by-one check
        else:
            assert fit == passes, damages
        if not damages and not compressed:
            assert fit              # the undamaged image takes the bulk path
    finally:
        f.close()


@pytest.mark.parametrize("shared_with", ["data", "l1"])
def test_a_cluster_marked_copied_and_shared_is_refused(templates, tmp_path: Path,
                                                      shared_with: str) -> None:
    """Two references to one cluster whose refcount counts both: the refcount
    check passes, but an entry marked COPIED would be written in place and
    change the other user (QEMU calls it corruption too)."""
    path = tmp_path / "disk.qcow2"
    shutil.copyfile(templates[False], path)
    layout = q.read_layout(path)
    data = layout.data_entries()
    (guest, entry), (_g2, other) = data[0], data[1]
    host = other & OFFSET_MASK if shared_with == "data" else layout.l1_offset
    q.poke_u64(path, layout.l2_entry_position(guest), host | COPIED)
    q.poke(path, layout.refcount_position(host), (2).to_bytes(2, "big"))
    q.poke(path, layout.refcount_position(entry & OFFSET_MASK), (0).to_bytes(2, "big"))
    _refused_for_writing(path, "marked as used once but has 2 references")
    report = qemu_img.check(path)
    assert report["corruptions"] > 0     # QEMU agrees


def test_an_l2_table_shared_by_two_l1_entries_is_refused(tmp_path: Path) -> None:
    """Two L1 entries on one L2 table (COPIED clear, refcount 2: QEMU itself
    would copy the table before writing it): vdisk writes L2 tables in
    place, so the write through one entry would show through the other."""
    path = tmp_path / "disk.qcow2"
    qemu_img.create(path, "qcow2", 4 * MiB, options={"cluster_size": 4096})
    qemu_io.run(path, "write -P 0x11 0 4k", fmt="qcow2")
    layout = q.read_layout(path)
    table = layout.l2_offsets[0]
    q.poke_u64(path, layout.l1_offset + 8, table)
    for host in (table, *(e & OFFSET_MASK for _g, e in layout.data_entries())):
        q.poke(path, layout.refcount_position(host), (2).to_bytes(2, "big"))
    _refused_for_writing(path, "L2 table of L1 entry .* has 2 references")


def _refused_for_writing(path: Path, message: str) -> None:
    f = Qcow2File(str(path), writable=True)
    try:
        with pytest.raises(MalformedImage, match=message):
            TopImage(f)
    finally:
        f.close()


# -- the map ------------------------------------------------------------------

FILE_END = 1 << 40
entry_kinds = st.sampled_from(["unallocated", "copied-only", "data", "data-copied", "zero",
                               "zero-with-offset"])


def _entry(kind: str, cluster: int, cs: int) -> int:
    host = (cluster + 1) * cs
    return {"unallocated": 0, "copied-only": COPIED, "data": host, "data-copied": host | COPIED,
            "zero": ZERO_FLAG, "zero-with-offset": host | ZERO_FLAG}[kind]


def _tables(draw, span: int, nl1: int, cs: int) -> list[tuple[int, int, array]]:
    tables = []
    for l1_index in draw(st.lists(st.integers(0, nl1 - 1), unique=True, max_size=nl1)):
        runs = draw(st.lists(st.tuples(entry_kinds, st.integers(1, span)), min_size=1,
                             max_size=6))
        entries: list[int] = []
        for kind, n in runs:
            for _ in range(n):
                if len(entries) < span:
                    entries.append(_entry(kind, l1_index * span + len(entries), cs))
        entries += [0] * (span - len(entries))
        tables.append((l1_index, 0, array("Q", entries)))
    return tables


@st.composite
def map_cases(draw):
    cluster_bits = draw(st.sampled_from([9, 12, 16, 21]))
    cs = 1 << cluster_bits
    span = cs // 8
    nl1 = draw(st.integers(1, 3))
    # sizes that end inside a table, at its end, and past the last table
    size = draw(st.integers(1, nl1 * span)) * cs - draw(st.sampled_from([0, 0, 512]))
    size = max(size, cs)
    return cluster_bits, size, _tables(draw, span, nl1, cs), _tables(draw, span, nl1, cs)


def _slow(cmap: ClusterMap, layer: int, f: Qcow2File, tables) -> None:
    """apply_layer as it was, entry by entry."""
    tag = (layer + 1) << 56
    visible = -(-min(f.size, cmap.size) // cmap.g)
    cmap.clear(visible, cmap.nslots)
    span = f.header.l2_entries
    for l1_index, _off, l2 in tables:
        for k, e in enumerate(l2):
            if not e & ~COPIED:
                continue
            first = l1_index * span + k
            if first >= visible:
                break
            cmap.set_cluster(first, 1, tag, e, min(visible, first + 1))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=map_cases())
def test_map_built_by_tables_agrees(tmp_path: Path, case) -> None:
    cluster_bits, size, lower, upper = case
    path = tmp_path / f"layer-{cluster_bits}-{size}.qcow2"
    if not path.exists():
        create_qcow2(str(path), size, cluster_bits=cluster_bits)
    f = Qcow2File(str(path), writable=False)
    try:
        f.file_size = FILE_END
        fast, slow = ClusterMap(size, f.cluster_size), ClusterMap(size, f.cluster_size)
        for layer, tables in enumerate((lower, upper)):
            fast.apply_layer(layer, f, tables)
            _slow(slow, layer, f, tables)
        assert len(fast.chunks) == len(slow.chunks)
        for i, (a, b) in enumerate(zip(fast.chunks, slow.chunks, strict=True)):
            a = a if a is not None else array("Q", bytes(8 * CHUNK))
            b = b if b is not None else array("Q", bytes(8 * CHUNK))
            assert a == b, f"chunk {i}"
    finally:
        f.close()


def test_a_bad_entry_in_a_table_is_still_named(tmp_path: Path) -> None:
    """A table the bulk check refuses goes entry by entry, whose error names the entry."""
    path = tmp_path / "disk.qcow2"
    create_qcow2(str(path), 4 * MiB, cluster_bits=16)
    f = Qcow2File(str(path), writable=False)
    try:
        f.file_size = FILE_END
        l2 = array("Q", [0] * (CS // 8))
        l2[3] = (5 * CS) | COPIED
        l2[7] = (9 * CS + 512) | COPIED
        assert f.plain_offsets(l2, len(l2)) is None
        assert f.plain_offsets(l2, 7) is not None
        assert f.plain_offsets(array("Q", [L2_RESERVED & ~(L2_RESERVED - 1) | CS]), 1) is None
        cmap = ClusterMap(4 * MiB, CS)
        with pytest.raises(MalformedImage, match=f"guest offset {7 * CS} is unaligned"):
            cmap.apply_layer(0, f, [(0, 0, l2)])
    finally:
        f.close()


@pytest.mark.parametrize("host, message", [
    (20 * CS, "points outside the image data"),       # beyond the file's end
    (0, None),                                         # unallocated
])
def test_a_backing_entry_beyond_the_file_is_refused(tmp_path: Path, host: int,
                                                    message: str | None) -> None:
    """Read-only layers have no refcount check behind the bulk one: it must see the end."""
    path = tmp_path / "disk.qcow2"
    create_qcow2(str(path), 4 * MiB, cluster_bits=16)
    f = Qcow2File(str(path), writable=False)
    try:
        f.file_size = 8 * CS
        l2 = array("Q", [0] * (CS // 8))
        l2[1] = (2 * CS) | COPIED
        l2[2] = host | COPIED if host else 0
        cmap = ClusterMap(4 * MiB, CS)
        if message:
            with pytest.raises(MalformedImage, match=message):
                cmap.apply_layer(0, f, [(0, 0, l2)])
        else:
            cmap.apply_layer(0, f, [(0, 0, l2)])
            assert cmap.get(1) == (1 << 56) | 2 * CS and cmap.get(2) == 0
    finally:
        f.close()


# -- one table's check, against the entry-by-entry one -----------------------

def _any_entry(cs: int, end: int):
    """Entries near every edge the check draws: offsets around the header,
    the file's end and alignment, each flag and reserved bit."""
    offsets = st.one_of(st.just(0), st.sampled_from([cs, 2 * cs, end - cs, end, end + cs]),
                        st.integers(0, 2 * end).map(lambda o: o & ~511),
                        st.integers(0, (1 << 56) - 1))
    bits = st.lists(st.sampled_from([0, 1, 8, 9, 56, 57, 61, 62, 63]), max_size=3)
    return st.builds(lambda o, b: (o & OFFSET_MASK) | sum(1 << i for i in set(b)) if b
                     else o & OFFSET_MASK, offsets, bits)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), cluster_bits=st.sampled_from([9, 12, 16, 21]))
def test_plain_offsets_agrees_with_the_entry_check(tmp_path: Path, data, cluster_bits: int) -> None:
    path = tmp_path / f"c{cluster_bits}.qcow2"
    if not path.exists():
        create_qcow2(str(path), 4 * MiB, cluster_bits=cluster_bits)
    f = Qcow2File(str(path), writable=False)
    try:
        cs = 1 << cluster_bits
        f.file_size = end = cs * data.draw(st.integers(2, 64))
        plain = data.draw(st.lists(st.sampled_from([0, COPIED, ZERO_FLAG]) | st.integers(
            1, end // cs - 1).map(lambda c: c * cs | COPIED), min_size=1, max_size=300))
        odd = data.draw(st.lists(_any_entry(cs, end), max_size=3))
        entries = list(plain)
        for e in odd:
            entries.insert(data.draw(st.integers(0, len(entries))), e)
        l2 = array("Q", entries)
        limit = data.draw(st.integers(1, len(l2)))
        got = f.plain_offsets(l2, limit)
        expected = True
        for k, e in enumerate(l2[:limit]):
            if e & COMPRESSED:
                expected = False
                continue
            try:
                f.check_l2_entry(e, k * cs)
            except MalformedImage:
                expected = False
        assert (got is not None) == expected, [hex(e) for e in l2[:limit]]
        if got is not None:
            assert list(lanes.entries(got, limit)) == [e & OFFSET_MASK for e in l2[:limit]]
    finally:
        f.close()
