"""Differential tests: random request sequences through NBD against an in-memory model.

Each hypothesis example takes a fresh copy of the top of a chain that QEMU
wrote (the backing files are shared and never written), serves it, applies a
sequence of write / zero / trim / flush / fast-zero requests with any offset
and length, and checks every request's effect by reading it back. Then the
server stops and QEMU has the last word: ``qemu-img check`` finds the top clean
and ``qemu-img compare`` finds it equal to the model.

The model starts as ``qemu-img convert -O raw`` of the chain and follows the
plugin contract (see diskmodel.py), including its deterministic trim rule.

Variants: one connection; two connections taking turns (each request read
back through the other one); and pipelined, with up to 16 requests in flight
at once (never two overlapping ones, so the result is defined).

``VDISK_DIFF_EXAMPLES`` sets the number of sequences per test (default 120,
so 1440 sequences over 9 chains with one connection and 3 with two, plus
180 pipelined ones).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import nbd
import pytest
from diskmodel import DiskModel, Op
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nbdharness import (
    EXAMPLES_RUN,
    AsyncStream,
    KiB,
    MiB,
    ServerFactory,
    first_difference,
    is_enotsup,
    pattern,
    read_all,
)
from qchain import Chain, Layer, build_chain, qemu_raw

from vdisk import qemu_img

pytestmark = pytest.mark.differential

EXAMPLES = int(os.environ.get("VDISK_DIFF_EXAMPLES", "120"))
# Shrinking costs hundreds of server starts (minutes); the failure message
# already names the first request whose effect was wrong. VDISK_DIFF_SHRINK=1
# shrinks anyway, for a minimal sequence when debugging.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
if os.environ.get("VDISK_DIFF_SHRINK") == "1":
    PHASES.append(Phase.shrink)


def _io(seed: int, size: int, cs: int, *, zeros: bool) -> tuple[str, ...]:
    """Non-zero data in a few places; zero clusters and discards only where allowed."""
    cmds = [
        f"write -P {0x10 + seed} 0 {cs + 3 * KiB}",
        f"write -P {0x20 + seed} {size // 2 - cs // 2} {2 * cs}",
        f"write -P {0x30 + seed} {size - max(3 * cs, 8 * KiB) + 512} {5 * KiB}",
    ]
    if zeros:
        cmds += [f"write -z {4 * cs} {cs}", f"discard {size // 2 + cs} {cs}"]
    return tuple(cmds)


# name -> (layers base first, virtual size). Below a v2 top there are no zero
# clusters, so "a layer below has data" and "below reads non-zero" coincide.
CHAINS: dict[str, tuple[list[Layer], int]] = {
    "v3-64k-on-compressed": (
        [
            Layer(
                compressed=True,
                io=_io(1, 2 * MiB, 64 * KiB, zeros=False) + ("write -P 0x5 1M 256k",),
            ),
            Layer(io=_io(2, 2 * MiB, 64 * KiB, zeros=True)),
        ],
        2 * MiB,
    ),
    "v3-4k-on-raw": (
        [
            Layer(fmt="raw", io=("write -P 0x41 0 512k", "write -P 0x42 1536k 64k")),
            Layer(cluster_size=4 * KiB, io=_io(3, 2 * MiB, 4 * KiB, zeros=True)),
        ],
        2 * MiB,
    ),
    "v2-64k-on-4k": (
        [
            Layer(cluster_size=4 * KiB, io=_io(4, 2 * MiB, 4 * KiB, zeros=False)),
            Layer(compat="0.10", io=_io(5, 2 * MiB, 64 * KiB, zeros=False)),
        ],
        2 * MiB,
    ),
    "v2-4k-on-compressed-64k": (
        [
            # whole base clusters only: a 4k top cluster is "above data" iff it reads data
            Layer(
                compressed=True,
                io=("write -P 0x16 0 128k", "write -P 0x17 448k 128k", "write -P 0x18 896k 64k"),
            ),
            Layer(compat="0.10", cluster_size=4 * KiB, io=_io(7, 1 * MiB, 4 * KiB, zeros=False)),
        ],
        1 * MiB,
    ),
    "v3-4k-on-64k-depth3": (
        [
            Layer(io=_io(8, 2 * MiB, 64 * KiB, zeros=False)),
            Layer(io=_io(9, 2 * MiB, 64 * KiB, zeros=True)),
            Layer(cluster_size=4 * KiB, io=_io(10, 2 * MiB, 4 * KiB, zeros=True)),
        ],
        2 * MiB,
    ),
    "v3-64k-alone": ([Layer(io=_io(11, 4 * MiB, 64 * KiB, zeros=True))], 4 * MiB),
    # a base that ends inside a cluster of the top, under a top whose last
    # cluster is cut short by its virtual size
    "v3-64k-on-short-base-odd-size": (
        [
            Layer(size=1 * MiB + 512, io=("write -P 0x61 0 1049088",)),
            Layer(io=_io(12, 2 * MiB + 20 * KiB, 64 * KiB, zeros=True)),
        ],
        2 * MiB + 20 * KiB,
    ),
    # small clusters and wide refcounts: allocation reaches new refcount blocks
    # and a refcount table that has to grow and move
    "v3-512-rc64-on-64k": (
        [
            Layer(io=_io(14, 4 * MiB, 64 * KiB, zeros=True)),
            # filled close to the 2 MiB of file its first refcount table covers
            Layer(
                cluster_size=512,
                refcount_bits=64,
                io=_io(15, 4 * MiB, 512, zeros=True) + ("write -P 0x51 1M 1800k",),
            ),
        ],
        4 * MiB,
    ),
    "v2-64k-on-short-base": (
        [
            Layer(size=1 * MiB + 512, io=("write -P 0x62 0 1049088",)),
            Layer(compat="0.10", io=_io(13, 2 * MiB, 64 * KiB, zeros=False)),
        ],
        2 * MiB,
    ),
}


@dataclass
class Template:
    name: str
    chain: Chain
    initial: bytes
    below_has_data: list[bool]
    copies: count

    @property
    def cluster_size(self) -> int:
        return self.chain.top_layer.cluster_size

    def fresh_top(self) -> Path:
        """A copy of the top next to the original (same relative backing names)."""
        path = self.chain.directory / f"example-{next(self.copies)}.qcow2"
        shutil.copyfile(self.chain.top, path)
        return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    result = {}
    for name, (layers, size) in CHAINS.items():
        chain = build_chain(tmp_path_factory.mktemp(name), layers, size)
        below = chain.below_has_data()
        if not chain.top_layer.v3 and len(chain.paths) > 1:
            # the trim rule of a v2 top is modelled on allocation below; QEMU agrees
            below_raw = qemu_raw(chain.paths[-2], chain.directory / "below.raw")
            below_raw = below_raw.ljust(size, b"\0")
            cs = chain.top_layer.cluster_size
            nonzero = [any(below_raw[c * cs : (c + 1) * cs]) for c in range(-(-size // cs))]
            assert nonzero == below, f"{name}: allocation below the top is ambiguous"
        result[name] = Template(name, chain, chain.raw(), below, count())
    return result


ALL_KINDS = ["write"] * 5 + ["zero"] * 2 + ["trim"] * 2 + ["fastzero", "flush"]


def op_strategy(size: int, cs: int, kinds: list[str] = ALL_KINDS) -> st.SearchStrategy[Op]:
    clusters = -(-size // cs)
    aligned = st.integers(0, clusters - 1).map(lambda c: c * cs)
    near_boundary = st.tuples(st.integers(1, clusters - 1), st.integers(-600, 600)).map(
        lambda t: t[0] * cs + t[1]
    )
    offset = st.one_of(aligned, near_boundary, st.integers(0, size - 1))
    length = st.one_of(
        st.integers(1, 3).map(lambda n: n * cs),
        st.integers(1, 600),
        st.integers(1, 3 * cs + cs // 2),
        st.integers(1, 512 * KiB),
    )

    def build(kind: str, off: int, ln: int, seed: int, may_trim: bool, fua: bool) -> Op:
        off = min(max(off, 0), size - 1)
        ln = max(1, min(ln, size - off))
        if kind == "flush":
            return Op("flush")
        return Op(kind, off, ln, seed=seed, may_trim=may_trim, fua=fua)

    seeds = st.integers(0, 2**32)
    return st.builds(
        build, st.sampled_from(kinds), offset, length, seeds, st.booleans(), st.booleans()
    )


def apply(h: nbd.NBD, model: DiskModel, op: Op) -> None:
    if op.kind == "write":
        data = pattern(op.seed, op.length)
        h.pwrite(data, op.offset, flags=nbd.CMD_FLAG_FUA if op.fua else 0)
        model.write(op.offset, data)
    elif op.kind == "zero":
        h.zero(op.length, op.offset, flags=0 if op.may_trim else nbd.CMD_FLAG_NO_HOLE)
        model.zero(op.offset, op.length)
    elif op.kind == "fastzero":
        try:
            h.zero(op.length, op.offset, flags=nbd.CMD_FLAG_FAST_ZERO)
        except nbd.Error as e:
            if not is_enotsup(e):
                raise
        else:
            model.zero(op.offset, op.length)
    elif op.kind == "trim":
        h.trim(op.length, op.offset)
        model.trim(op.offset, op.length)
    elif op.kind == "flush":
        h.flush()
    else:
        raise AssertionError(op)


def fresh_model(template: Template) -> DiskModel:
    """The model of a fresh top over ``template``'s chain."""
    return DiskModel(
        template.initial, template.cluster_size, template.chain.top_layer.v3,
        template.below_has_data,
    )


def check_with_qemu(top: Path, model: DiskModel) -> None:
    """QEMU's word on the stopped top: ``qemu-img check`` is clean and ``qemu-img compare``
    finds the model's bytes; then the top is removed."""
    result = qemu_img.check(top)
    assert result["corruptions"] == 0 and result["leaks"] == 0, result
    raw = top.with_suffix(".expected")
    raw.write_bytes(model.data)
    qemu_img.compare(raw, top, fmt_a="raw", fmt_b="qcow2")
    raw.unlink()
    top.unlink()


def run_sequence(
    template: Template, ops: list[Op], factory: ServerFactory, connections: int
) -> None:
    top = template.fresh_top()
    cs = template.cluster_size
    model = fresh_model(template)
    try:
        served = factory(top)
        handles = [served.connect(meta=False) for _ in range(connections)]
        for i, op in enumerate(ops):
            h = handles[i % connections]
            apply(h, model, op)
            if op.kind != "flush":
                # read back through the other connection (or the same one)
                reader = handles[(i + 1) % connections]
                lo, hi = max(0, op.offset - cs), min(model.size, op.end() + cs)
                got = reader.pread(hi - lo, lo)
                want = bytes(model.data[lo:hi])
                assert got == want, f"after op #{i} {op}: {first_difference(got, want)}"
        for h in handles:
            got = read_all(h)
            assert got == model.data, f"whole disk: {first_difference(got, bytes(model.data))}"
        served.stop()
    finally:
        factory.close_all()
    check_with_qemu(top, model)


def _run(
    templates: dict[str, Template],
    name: str,
    connections: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    template = templates[name]
    size = template.chain.size
    key = f"differential {name} ({connections} connection{'s' if connections > 1 else ''})"
    EXAMPLES_RUN[key] = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        phases=PHASES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    @given(ops=st.lists(op_strategy(size, template.cluster_size), min_size=1, max_size=24))
    def sequence(ops: list[Op]) -> None:
        EXAMPLES_RUN[key] += 1
        factory = ServerFactory(lambda: tmp_path_factory.mktemp("s"))
        run_sequence(template, ops, factory, connections)

    sequence()
    print(f"{key}: {EXAMPLES_RUN[key]} sequences")
    assert EXAMPLES_RUN[key] >= min(EXAMPLES, 10)


@pytest.mark.parametrize("name", list(CHAINS))
def test_one_connection(templates, name: str, tmp_path_factory) -> None:
    _run(templates, name, 1, tmp_path_factory)


@pytest.mark.parametrize(
    "name", ["v3-64k-on-compressed", "v2-64k-on-4k", "v3-64k-on-short-base-odd-size"]
)
def test_two_connections(templates, name: str, tmp_path_factory) -> None:
    _run(templates, name, 2, tmp_path_factory)


def test_model_trim_rule() -> None:
    """The model itself: only fully covered clusters, only where allowed."""
    cs = 4
    model = DiskModel(b"\x01" * 16, cs, top_v3=False, below_has_data=[True, False, False, True])
    model.trim(1, 14)  # covers clusters 1 and 2 fully; 0 and 3 partially
    assert bytes(model.data) == b"\x01" * 4 + b"\0" * 8 + b"\x01" * 4
    model = DiskModel(b"\x01" * 16, cs, top_v3=False, below_has_data=[True] * 4)
    model.trim(0, 16)
    assert bytes(model.data) == b"\x01" * 16
    model = DiskModel(b"\x01" * 16, cs, top_v3=True, below_has_data=[True] * 4)
    model.trim(0, 15)
    assert bytes(model.data) == b"\0" * 12 + b"\x01" * 4
    model = DiskModel(b"\x01" * 14, cs, top_v3=True, below_has_data=[True] * 4)
    model.trim(8, 6)  # reaches the end: the short last cluster counts as covered
    assert bytes(model.data) == b"\x01" * 8 + b"\0" * 6
    model.trim(0, 7)  # stops short of the end: cluster 1 is cut by the range, not the disk
    assert bytes(model.data) == b"\0" * 4 + b"\x01" * 4 + b"\0" * 6


PIPELINED_KINDS = ["write"] * 5 + ["zero"] * 2 + ["trim"] * 2 + ["flush"]


def run_pipelined(
    template: Template, ops: list[Op], depth: int, factory: ServerFactory
) -> None:
    """Up to ``depth`` requests in flight (never two overlapping ones)."""
    top = template.fresh_top()
    model = fresh_model(template)
    try:
        served = factory(top)
        h = served.connect(meta=False)
        stream = AsyncStream(h)
        for op in ops:
            stream.issue(op, depth)
            if op.kind == "write":
                model.write(op.offset, pattern(op.seed, op.length))
            elif op.kind == "zero":
                model.zero(op.offset, op.length)
            elif op.kind == "trim":
                model.trim(op.offset, op.length)
        stream.drain()
        got = read_all(h)
        assert got == model.data, f"after the stream: {first_difference(got, bytes(model.data))}"
        served.stop()
    finally:
        factory.close_all()
    check_with_qemu(top, model)


@pytest.mark.parametrize("name", ["v3-64k-on-compressed", "v2-64k-on-4k", "v3-4k-on-raw"])
def test_pipelined(templates, name: str, tmp_path_factory) -> None:
    template = templates[name]
    key = f"differential {name} (pipelined)"
    EXAMPLES_RUN[key] = 0
    strategy = op_strategy(template.chain.size, template.cluster_size, PIPELINED_KINDS)

    @settings(
        max_examples=max(1, EXAMPLES // 2),
        deadline=None,
        phases=PHASES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    @given(ops=st.lists(strategy, min_size=1, max_size=40), depth=st.integers(2, 16))
    def sequence(ops: list[Op], depth: int) -> None:
        EXAMPLES_RUN[key] += 1
        factory = ServerFactory(lambda: tmp_path_factory.mktemp("s"))
        run_pipelined(template, ops, depth, factory)

    sequence()
    assert EXAMPLES_RUN[key] >= min(EXAMPLES // 2, 10)
