"""One test per NBD feature, through libnbd against nbdkit running the vdisk plugin.

Every test that writes ends the same way: stop the server, ``qemu-img check``
must be clean (no corruptions, no leaks) and ``qemu-img compare`` must find the
top equal to the bytes the test expects.
"""

from __future__ import annotations

import errno
from pathlib import Path

import nbd
import pytest
from diskmodel import DiskModel
from nbdharness import HOLE, ZERO, KiB, MiB, Served, extents, first_difference, pattern, read_all
from qchain import Chain, Layer, build_chain

from vdisk import qemu_img

SIZE = 4 * MiB
CS = 64 * KiB

BASE_IO = (
    "write -P 0x11 0 1M",
    "write -P 0x22 2M 192k",
    "write -P 0x33 3076k 8k",
)
TOP_IO = (
    "write -P 0x44 512k 64k",
    "write -z 2M 64k",
)


def make_chain(workdir: Path, compat: str = "1.1") -> Chain:
    return build_chain(
        workdir,
        [Layer(io=BASE_IO), Layer(compat=compat, io=TOP_IO)],
        SIZE,
    )


@pytest.fixture
def chain(workdir: Path) -> Chain:
    return make_chain(workdir)


def finish(served: Served, chain: Chain, expected: bytes) -> None:
    """Stop serving; the top must be clean and equal to ``expected`` for QEMU."""
    served.stop()
    result = qemu_img.check_clean(chain.top, allow_leaks=False)
    assert result["corruptions"] == 0 and result["leaks"] == 0, result
    raw = chain.directory / "expected.raw"
    raw.write_bytes(expected)
    qemu_img.compare(raw, chain.top, fmt_a="raw", fmt_b="qcow2")
    assert chain.reread() == expected, first_difference(chain.raw(), expected)


def test_size(serve, chain: Chain) -> None:
    h = serve(chain.top).connect()
    assert h.get_size() == SIZE == qemu_img.info(chain.top, force_share=True)["virtual-size"]


def test_default_export_name(serve, chain: Chain) -> None:
    served = serve(chain.top)
    by_uri = served.connect()
    by_name = served.connect(export="")
    assert by_uri.get_size() == by_name.get_size() == SIZE
    assert by_name.pread(4096, 0) == b"\x11" * 4096


def test_read_whole_chain(serve, chain: Chain) -> None:
    h = serve(chain.top).connect()
    data = read_all(h)
    assert data == chain.raw(), first_difference(data, chain.raw())


def test_pwrite_pread_round_trip(serve, chain: Chain) -> None:
    served = serve(chain.top)
    h = served.connect()
    expected = bytearray(chain.raw())
    for i, offset in enumerate([0, 1 * MiB, 2 * MiB + 64 * KiB, SIZE - 128 * KiB]):
        data = pattern(i, 128 * KiB)
        h.pwrite(data, offset)
        expected[offset : offset + len(data)] = data
        assert h.pread(len(data), offset) == data
    assert read_all(h) == expected
    finish(served, chain, bytes(expected))


UNALIGNED = [
    (1, 1),  # one byte inside base data
    (4095, 2),  # across a 4k boundary
    (CS - 7, 100),  # across a cluster boundary
    (1 * MiB - 10, 20),  # base data / unallocated boundary
    (1 * MiB + 12345, 3 * CS + 17),  # several clusters, unaligned both ends, no data below
    (512 * KiB + 100, 300),  # inside a top cluster
    (2 * MiB + 5, 70 * KiB),  # over a zero cluster into base data
    (SIZE - 3, 3),  # the last bytes of the disk
]


def test_unaligned_writes(serve, chain: Chain) -> None:
    served = serve(chain.top)
    h = served.connect()
    expected = bytearray(chain.raw())
    for i, (offset, length) in enumerate(UNALIGNED):
        data = pattern(100 + i, length)
        h.pwrite(data, offset)
        expected[offset : offset + length] = data
        # the bytes around the write are untouched (copy-on-write of the rest of the cluster)
        lo, hi = max(0, offset - CS), min(SIZE, offset + length + CS)
        got = h.pread(hi - lo, lo)
        assert got == expected[lo:hi], (offset, length, first_difference(got, expected[lo:hi]))
    finish(served, chain, bytes(expected))


ZERO_RANGES = [
    (0, CS),  # a whole cluster of base data
    (100, 1000),  # partial cluster of base data
    (CS - 10, CS + 20),  # crossing clusters, unaligned
    (512 * KiB, 64 * KiB),  # a top data cluster
    (2 * MiB + 64 * KiB, 3 * CS),  # base data, aligned
    (3 * MiB, 1 * MiB),  # to the end of the disk
]


@pytest.mark.parametrize("may_trim", [False, True], ids=["plain", "may_trim"])
def test_zero(serve, chain: Chain, may_trim: bool) -> None:
    served = serve(chain.top)
    h = served.connect()
    assert h.can_zero()
    expected = bytearray(chain.raw())
    flags = 0 if may_trim else nbd.CMD_FLAG_NO_HOLE
    for offset, length in ZERO_RANGES:
        h.zero(length, offset, flags=flags)
        expected[offset : offset + length] = bytes(length)
        assert h.pread(length, offset) == bytes(length), (offset, length)
    assert read_all(h) == expected
    finish(served, chain, bytes(expected))


@pytest.mark.parametrize(
    "offset,length",
    [(0, CS), (1 * MiB + CS, 2 * CS), (100, 1000), (512 * KiB, CS), (CS - 10, CS + 20)],
    ids=["base-cluster", "unallocated", "partial", "top-cluster", "unaligned"],
)
def test_fast_zero(serve, chain: Chain, offset: int, length: int) -> None:
    served = serve(chain.top)
    h = served.connect()
    assert h.can_fast_zero(), "FAST_ZERO is in the plugin contract"
    expected = bytearray(chain.raw())
    try:
        h.zero(length, offset, flags=nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        assert e.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP), e
        # failing fast means nothing was written
        assert h.pread(length, offset) == expected[offset : offset + length]
    else:
        expected[offset : offset + length] = bytes(length)
        assert h.pread(length, offset) == bytes(length)
    finish(served, chain, bytes(expected))


TRIM_RANGES = [
    (0, CS),  # one whole cluster of base data
    (CS + 1, 2 * CS),  # covers one cluster fully, two partially
    (512 * KiB, CS),  # the top's data cluster, base data below
    (1 * MiB + CS, 2 * CS),  # unallocated everywhere
    (1 * MiB + 100, 200),  # partial: unchanged
    (2 * MiB + CS - 5, 2 * CS + 10),  # base data, one full cluster in the middle
    (3 * MiB, 1 * MiB),  # to the end
]


@pytest.mark.parametrize("compat", ["1.1", "0.10"], ids=["v3", "v2"])
def test_trim(serve, workdir: Path, compat: str) -> None:
    # v2 tops cannot have zero clusters: the top writes only data there
    top_io = TOP_IO if compat == "1.1" else TOP_IO[:1]
    chain = build_chain(workdir, [Layer(io=BASE_IO), Layer(compat=compat, io=top_io)], SIZE)
    served = serve(chain.top)
    h = served.connect()
    assert h.can_trim()
    model = DiskModel(chain.raw(), CS, chain.top_layer.v3, chain.below_has_data())
    for offset, length in TRIM_RANGES:
        h.trim(length, offset)
        model.trim(offset, length)
        lo, hi = max(0, offset - CS), min(SIZE, offset + length + CS)
        got = h.pread(hi - lo, lo)
        want = bytes(model.data[lo:hi])
        assert got == want, (offset, length, first_difference(got, want))
    finish(served, chain, bytes(model.data))


def test_flush_survives_kill(serve, chain: Chain) -> None:
    served = serve(chain.top)
    h = served.connect()
    assert h.can_flush()
    expected = bytearray(chain.raw())
    for i, (offset, length) in enumerate([(0, 4096), (1 * MiB + 3, CS), (3 * MiB, 2 * CS)]):
        data = pattern(200 + i, length)
        h.pwrite(data, offset)
        expected[offset : offset + length] = data
    h.flush()
    served.kill()
    result = qemu_img.check_clean(chain.top)
    assert result["corruptions"] == 0, result
    got = chain.reread()
    assert got == expected, first_difference(got, bytes(expected))


def test_fua_write_survives_kill(serve, chain: Chain) -> None:
    served = serve(chain.top)
    h = served.connect()
    assert h.can_fua()
    expected = bytearray(chain.raw())
    for i, (offset, length) in enumerate([(CS + 100, 5000), (1536 * KiB, 2 * CS)]):
        data = pattern(300 + i, length)
        h.pwrite(data, offset, flags=nbd.CMD_FLAG_FUA)
        expected[offset : offset + length] = data
    served.kill()
    result = qemu_img.check_clean(chain.top)
    assert result["corruptions"] == 0, result
    got = chain.reread()
    assert got == expected, first_difference(got, bytes(expected))


def test_extents_match_qemu_map(serve, chain: Chain) -> None:
    served = serve(chain.top)
    h = served.connect()
    assert h.can_meta_context("base:allocation")
    h.pwrite(pattern(400, 100), 1 * MiB + 2 * CS + 7)  # a new data cluster in the top
    h.zero(CS, 2 * MiB + CS)  # a whole cluster of base data zeroed
    h.flush()
    ext = extents(h)
    data = read_all(h)
    assert sum(length for _, length, _ in ext) == SIZE

    def flags_at(offset: int) -> int:
        for start, length, flags in ext:
            if start <= offset < start + length:
                return flags
        raise AssertionError(f"no extent covers {offset}")

    # what NBD calls zero must read as zeros
    for start, length, flags in ext:
        if flags & ZERO:
            assert data[start : start + length] == bytes(length), (start, length, flags)

    qmap = qemu_img.map(chain.top, force_share=True)
    for e in qmap:
        for offset in range(e["start"], e["start"] + e["length"], CS // 4):
            flags = flags_at(offset)
            where = f"offset {offset}: qemu {e}, nbd flags {flags}"
            if e["data"]:
                assert flags == 0, where  # data where written (in any layer)
            elif not e["present"]:
                assert flags == HOLE | ZERO, where  # a hole all the way down
            else:
                assert flags & ZERO, where  # zero clusters read as zeros
    # the sparse overlay really has holes and data
    assert any(f == HOLE | ZERO for _, _, f in ext)
    assert any(f == 0 for _, _, f in ext)


def test_block_size_hints(serve, chain: Chain) -> None:
    h = serve(chain.top).connect()
    minimum = h.get_block_size(nbd.SIZE_MINIMUM)
    preferred = h.get_block_size(nbd.SIZE_PREFERRED)
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
    sizes = (minimum, preferred, maximum)
    # advertised at all (0 means not advertised) and consistent
    assert all(s > 0 for s in sizes), sizes
    # byte-granular requests are part of the contract (unaligned writes)
    assert minimum == 1, sizes
    assert preferred & (preferred - 1) == 0 and 512 <= preferred <= 32 * MiB, sizes
    assert minimum <= preferred <= maximum, sizes
    # a request of the advertised maximum works
    length = min(maximum, SIZE)
    assert len(h.pread(length, 0)) == length


def test_multi_conn(serve, chain: Chain) -> None:
    served = serve(chain.top)
    h1 = served.connect()
    h2 = served.connect()
    assert h1.can_multi_conn() and h2.can_multi_conn()
    expected = bytearray(chain.raw())
    a = pattern(500, 3 * CS)
    h1.pwrite(a, 100)
    h1.flush()
    expected[100 : 100 + len(a)] = a
    assert h2.pread(len(a), 100) == a
    b = pattern(501, 5000)
    h2.pwrite(b, 1 * MiB + 3)
    h2.flush()
    expected[1 * MiB + 3 : 1 * MiB + 3 + len(b)] = b
    assert h1.pread(len(b), 1 * MiB + 3) == b
    # a flush on one connection makes the other's writes durable too
    c = pattern(502, CS)
    h1.pwrite(c, 3 * MiB)
    h2.flush()
    expected[3 * MiB : 3 * MiB + CS] = c
    served.kill()
    assert qemu_img.check_clean(chain.top)["corruptions"] == 0
    got = chain.reread()
    assert got == expected, first_difference(got, bytes(expected))


def test_readonly_refuses_writes(serve, chain: Chain) -> None:
    before = {p.name: p.read_bytes() for p in chain.paths}
    served = serve(chain.top, readonly=True)
    h = served.connect()
    assert h.is_read_only()
    assert h.pread(4096, 0) == b"\x11" * 4096
    h.set_strict_mode(0)  # send the requests instead of refusing them in libnbd
    for call in (
        lambda: h.pwrite(b"x" * 4096, 0),
        lambda: h.zero(CS, 0),
        lambda: h.trim(CS, 0),
    ):
        with pytest.raises(nbd.Error) as excinfo:
            call()
        assert excinfo.value.errnum in (errno.EPERM, errno.EROFS), excinfo.value
    assert h.pread(4096, 0) == b"\x11" * 4096
    served.stop()
    assert {p.name: p.read_bytes() for p in chain.paths} == before


def test_served_from_another_cwd(serve, chain: Chain, tmp_path: Path, monkeypatch) -> None:
    # the chain's relative backing names resolve against the image, not the cwd
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    h = serve(chain.top).connect()
    assert read_all(h) == chain.raw()
