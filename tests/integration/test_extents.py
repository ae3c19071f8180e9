"""base:allocation extents over many chain shapes, checked against ``qemu-img map``.

Rules, per byte:
- NBD says ZERO  -> the byte reads as zero (always);
- QEMU says data (in any layer)  -> NBD reports plain data (flags 0);
- QEMU says not present anywhere -> NBD reports a hole that reads zeros (3);
- QEMU says a qcow2 zero cluster -> NBD reports ZERO.
(QEMU's view of a raw file's holes comes from SEEK_DATA; NBD may call them data.)
"""

from __future__ import annotations

import bisect
from pathlib import Path

import nbd
import pytest
from nbdharness import HOLE, ZERO, KiB, MiB, collector, extents, pattern, read_all
from qchain import Chain, Layer, build_chain

from vdisk import qemu_img

SIZE = 4 * MiB

CHAINS = {
    "v3-64k": [
        Layer(io=("write -P 0x11 0 1M", "write -z 1536k 64k")),
        Layer(io=("write -P 0x12 512k 64k", "write -z 64k 128k", "discard 2M 64k")),
    ],
    "v2-64k": [
        Layer(compat="0.10", io=("write -P 0x11 0 1M",)),
        Layer(compat="0.10", io=("write -P 0x12 512k 64k", "write -z 1M 128k")),
    ],
    "compressed-base": [
        Layer(compressed=True, io=("write -P 0x21 0 1M", "write -P 0x22 3M 64k")),
        Layer(io=("write -P 0x23 100k 8k",)),
    ],
    "raw-base": [
        Layer(fmt="raw", io=("write -P 0x31 0 512k", "write -P 0x32 2M 4k")),
        Layer(cluster_size=4 * KiB, io=("write -P 0x33 1M 8k", "write -z 0 8k")),
    ],
    "short-base-odd-size": [
        Layer(size=1 * MiB + 512, io=("write -P 0x41 0 1049088",)),
        Layer(size=SIZE - 20 * KiB, io=("write -P 0x42 3M 4k",)),
    ],
    "4k-on-64k-depth3": [
        Layer(io=("write -P 0x51 0 2M",)),
        Layer(io=("write -z 256k 256k",)),
        Layer(cluster_size=4 * KiB, io=("write -P 0x52 300k 4k", "discard 1M 64k")),
    ],
}


def check_against_qemu(h: nbd.NBD, chain: Chain) -> list[tuple[int, int, int]]:
    size = h.get_size()
    ext = extents(h)
    assert sum(length for _, length, _ in ext) == size
    assert [start for start, _, _ in ext] == sorted(start for start, _, _ in ext)
    data = read_all(h)
    for start, length, flags in ext:
        if flags & ZERO:
            assert data[start : start + length] == bytes(length), (start, length, flags)
    starts = [start for start, _, _ in ext]

    def flags_at(offset: int) -> int:
        return ext[bisect.bisect_right(starts, offset) - 1][2]

    step = min(layer.cluster_size for layer in chain.layers if layer.fmt == "qcow2") // 2
    biggest = max(layer.cluster_size for layer in chain.layers if layer.fmt == "qcow2")
    qmap = qemu_img.map(chain.top, force_share=True)

    def qemu_data_in_cluster(offset: int) -> bool:
        lo = offset // biggest * biggest
        return any(
            e["data"] and e["start"] < lo + biggest and lo < e["start"] + e["length"]
            for e in qmap
        )

    for e in qmap:
        layer = chain.layers[len(chain.layers) - 1 - e["depth"]]
        for offset in range(e["start"], e["start"] + e["length"], step):
            flags = flags_at(offset)
            where = f"offset {offset}: qemu {e}, nbd flags {flags}"
            if e["data"]:
                assert flags == 0, where
            elif not e["present"]:
                # a hole, unless it shares a cluster with data (e.g. past a short
                # backing file's end): reporting data there is imprecise, not wrong
                assert flags == HOLE | ZERO or (flags == 0 and qemu_data_in_cluster(offset)), where
            elif layer.fmt == "qcow2":
                assert flags & ZERO, where
    return ext


@pytest.mark.parametrize("name", list(CHAINS))
def test_extents_match_qemu_map(serve, workdir: Path, name: str) -> None:
    size = SIZE - 20 * KiB if name == "short-base-odd-size" else SIZE
    chain = build_chain(workdir, CHAINS[name], size)
    h = serve(chain.top, readonly=True).connect()
    check_against_qemu(h, chain)


@pytest.mark.parametrize("name", ["v3-64k", "v2-64k", "raw-base"])
def test_extents_after_writes(serve, workdir: Path, name: str) -> None:
    chain = build_chain(workdir, CHAINS[name], SIZE)
    served = serve(chain.top)
    h = served.connect()
    h.pwrite(pattern(1, 5000), 3 * MiB + 100)
    h.zero(200 * KiB, 700 * KiB)
    h.trim(128 * KiB, 2 * MiB + 64 * KiB)
    h.zero(64 * KiB, 3 * MiB + 512 * KiB, flags=nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    check_against_qemu(h, chain)


def test_extents_unaligned_and_req_one(serve, workdir: Path) -> None:
    chain = build_chain(workdir, CHAINS["v3-64k"], SIZE)
    h = serve(chain.top, readonly=True).connect()
    full = extents(h)
    starts = [start for start, _, _ in full]
    for offset, length in [(1, 100), (64 * KiB - 1, 3), (511 * KiB, 130 * KiB), (SIZE - 7, 7)]:
        # a query at any offset agrees with the whole-disk answer
        for start, ln, flags in extents(h, offset, length):
            i = bisect.bisect_right(starts, start) - 1
            while i < len(full) and full[i][0] < start + ln:
                assert full[i][2] == flags, (offset, length, (start, ln, flags), full[i])
                i += 1
        got: list[tuple[int, int]] = []
        h.block_status(length, offset, collector(got), flags=nbd.CMD_FLAG_REQ_ONE)
        assert len(got) == 1 and 0 < got[0][0] <= length, (offset, length, got)
        i = bisect.bisect_right(starts, offset) - 1
        assert got[0][1] == full[i][2], (offset, got, full[i])
