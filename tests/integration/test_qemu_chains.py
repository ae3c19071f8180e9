"""Chains written by QEMU, read through vdisk: every byte equals ``qemu-img convert -O raw``.

The chains cover what QEMU produces: qcow2 v2 (compat=0.10) and v3, zero
clusters and discards, compressed clusters (``qemu-img convert -c`` and
``qemu-io write -c``), raw bases, backing files shorter than their children,
depth 1 to 16, mixed cluster sizes, with and without a recorded backing format,
and relative backing names opened from another working directory.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from nbdharness import KiB, MiB, first_difference, read_all, snapshot_tree
from qchain import Chain, Layer, build_chain

from vdisk import qemu_img, qemu_io

SIZE = 4 * MiB


def layer_io(i: int, size: int, cs: int, *, v3: bool = True, compress: bool = False) -> tuple:
    """qemu-io commands for layer i: data, partial clusters, zeroes, discards, all i-dependent."""
    step = 256 * KiB
    base = (i * 3 * 4 * KiB) % step
    cmds = [
        f"write -P {0x10 + i} {base + (i % 4) * step} {64 * KiB + i * 512}",
        f"write -P {0x80 + i} {(base + 7 * step + 1536) % (size - 8 * KiB)} {3 * KiB}",
    ]
    if size > 2 * MiB:
        cmds.append(f"write -P {0xC0 + i} {2 * MiB + i * 8 * KiB} {40 * KiB}")
    if i > 0:
        zero_at = ((i % 4) * step // cs) * cs
        cmds.append(f"write -z {zero_at} {cs}" if v3 else f"discard {zero_at} {cs}")
        cmds.append(f"discard {(((i + 2) % 4) * step // cs) * cs} {cs}")
    if compress:
        cmds.append(f"write -c -P {0x40 + i} {3 * MiB} {2 * cs}")
    return tuple(cmds)


def assert_served_equals_qemu(serve, chain: Chain, *, readonly: bool = False) -> None:
    before = snapshot_tree(chain.directory)
    served = serve(chain.top, readonly=readonly)
    h = served.connect()
    assert h.get_size() == chain.size
    data = read_all(h)
    expected = chain.raw()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected).hexdigest(), (
        first_difference(data, expected)
    )
    served.stop()
    # reading changes nothing, in any file of the chain
    assert snapshot_tree(chain.directory) == before
    assert qemu_img.check(chain.top)["corruptions"] == 0


def simple_chain(workdir: Path, *, compat: str, cs: int = 64 * KiB) -> Chain:
    v3 = compat != "0.10"
    layers = [
        Layer(compat=compat, cluster_size=cs, io=layer_io(0, SIZE, cs, v3=v3)),
        Layer(compat=compat, cluster_size=cs, io=layer_io(1, SIZE, cs, v3=v3)),
    ]
    return build_chain(workdir, layers, SIZE)


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("compat", ["1.1", "0.10"], ids=["v3", "v2"])
def test_two_layers(serve, workdir: Path, compat: str, readonly: bool) -> None:
    assert_served_equals_qemu(serve, simple_chain(workdir, compat=compat), readonly=readonly)


def test_compressed_base(serve, workdir: Path) -> None:
    layers = [
        Layer(compressed=True, io=layer_io(0, SIZE, 64 * KiB) + ("write -P 0x5a 1M 1M",)),
        Layer(io=layer_io(1, SIZE, 64 * KiB)),
    ]
    chain = build_chain(workdir, layers, SIZE)
    # the base really is compressed: qemu-img map shows no host offset for compressed data
    assert any(e["data"] and "offset" not in e for e in qemu_img.map(chain.paths[0]))
    assert_served_equals_qemu(serve, chain)


def test_compressed_clusters_in_overlay(serve, workdir: Path) -> None:
    layers = [
        Layer(io=layer_io(0, SIZE, 64 * KiB)),
        Layer(io=layer_io(1, SIZE, 64 * KiB, compress=True)),
    ]
    assert_served_equals_qemu(serve, build_chain(workdir, layers, SIZE))


@pytest.mark.parametrize("compat", ["1.1", "0.10"], ids=["v3", "v2"])
def test_raw_base(serve, workdir: Path, compat: str) -> None:
    layers = [
        Layer(fmt="raw", io=("write -P 0x61 0 1M", "write -P 0x62 3M 12345")),
        Layer(compat=compat, io=layer_io(1, SIZE, 64 * KiB, v3=compat == "1.1")),
    ]
    assert_served_equals_qemu(serve, build_chain(workdir, layers, SIZE))


@pytest.mark.parametrize(
    "base_size",
    [1 * MiB, 1 * MiB + 512, 3 * MiB + 64 * KiB + 4 * KiB],
    ids=["1M", "1M+512", "unaligned-cluster"],
)
def test_backing_shorter_than_child(serve, workdir: Path, base_size: int) -> None:
    layers = [
        Layer(size=base_size, io=(f"write -P 0x71 0 {base_size}",)),
        Layer(io=("write -P 0x72 512k 4k", f"write -P 0x73 {3 * MiB + 60 * KiB} 12k")),
    ]
    chain = build_chain(workdir, layers, SIZE)
    expected = chain.raw()
    # beyond the base's end the child reads zeros where it has no data
    assert expected[3 * MiB + 80 * KiB : SIZE] == bytes(SIZE - 3 * MiB - 80 * KiB)
    assert_served_equals_qemu(serve, chain)


def test_backing_longer_than_child(serve, workdir: Path) -> None:
    layers = [
        Layer(size=8 * MiB, io=("write -P 0x76 0 8M",)),
        Layer(size=SIZE + 4 * KiB, io=("write -P 0x77 1M 4k",)),
    ]
    chain = build_chain(workdir, layers, SIZE + 4 * KiB)
    served = serve(chain.top)
    h = served.connect()
    assert h.get_size() == SIZE + 4 * KiB
    # copy-on-write of the last, partial cluster takes only what the child can see
    h.pwrite(b"\x78" * 100, SIZE + 4 * KiB - 100)
    expected = chain.raw()[: SIZE + 4 * KiB - 100] + b"\x78" * 100
    assert read_all(h) == expected
    served.stop()
    assert qemu_img.check(chain.top)["corruptions"] == 0
    assert chain.reread() == expected


def test_raw_base_shorter_than_child(serve, workdir: Path) -> None:
    layers = [
        Layer(fmt="raw", size=1 * MiB + 4 * KiB + 7, io=("write -P 0x74 0 1028k",)),
        Layer(io=("write -P 0x75 1020k 8k",)),
    ]
    assert_served_equals_qemu(serve, build_chain(workdir, layers, SIZE))


@pytest.mark.parametrize("depth", [1, 4, 16])
def test_depth(serve, workdir: Path, depth: int) -> None:
    layers = [Layer(io=layer_io(i, SIZE, 64 * KiB)) for i in range(depth)]
    assert_served_equals_qemu(serve, build_chain(workdir, layers, SIZE))


def test_depth_16_nbdcopy(serve, workdir: Path) -> None:
    layers = [
        Layer(cluster_size=(4 * KiB if i % 2 else 64 * KiB), io=layer_io(i, SIZE, 64 * KiB))
        for i in range(16)
    ]
    chain = build_chain(workdir, layers, SIZE)
    served = serve(chain.top, readonly=True)
    out = workdir.parent / "copy.raw"
    subprocess.run(
        ["nbdcopy", "--", served.uri, str(out)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    data = out.read_bytes()
    assert data == chain.raw(), first_difference(data, chain.raw())


@pytest.mark.parametrize(
    "base_cs,top_cs",
    [(64 * KiB, 4 * KiB), (4 * KiB, 64 * KiB), (512, 2 * MiB), (2 * MiB, 512)],
    ids=["4k-on-64k", "64k-on-4k", "2M-on-512", "512-on-2M"],
)
def test_cluster_sizes(serve, workdir: Path, base_cs: int, top_cs: int) -> None:
    layers = [
        Layer(cluster_size=base_cs, io=layer_io(0, SIZE, base_cs)),
        Layer(cluster_size=top_cs, io=layer_io(1, SIZE, top_cs)),
    ]
    assert_served_equals_qemu(serve, build_chain(workdir, layers, SIZE))


def test_mixed_chain(serve, workdir: Path) -> None:
    """raw <- compressed-free v2 4k <- v3 64k <- v3 4k with compressed clusters."""
    layers = [
        Layer(fmt="raw", io=("write -P 0x21 0 2M",)),
        Layer(compat="0.10", cluster_size=4 * KiB, io=layer_io(1, SIZE, 4 * KiB, v3=False)),
        Layer(io=layer_io(2, SIZE, 64 * KiB)),
        Layer(cluster_size=4 * KiB, io=layer_io(3, SIZE, 4 * KiB, compress=True)),
    ]
    assert_served_equals_qemu(serve, build_chain(workdir, layers, SIZE))


def test_backing_format_omitted(serve, workdir: Path) -> None:
    layers = [
        Layer(io=layer_io(0, SIZE, 64 * KiB)),
        Layer(io=layer_io(1, SIZE, 64 * KiB), backing_fmt=False),
        Layer(io=layer_io(2, SIZE, 64 * KiB), backing_fmt=False),
    ]
    chain = build_chain(workdir, layers, SIZE)
    assert "backing-filename-format" not in qemu_img.info(chain.top)
    assert_served_equals_qemu(serve, chain)


def test_raw_base_backing_format_omitted(serve, workdir: Path) -> None:
    layers = [
        Layer(fmt="raw", io=("write -P 0x31 0 1M",)),
        Layer(io=("write -P 0x32 512k 8k",), backing_fmt=False),
    ]
    chain = build_chain(workdir, layers, SIZE)
    assert_served_equals_qemu(serve, chain)


def test_relative_names_from_another_cwd(serve, workdir: Path, tmp_path: Path, monkeypatch) -> None:
    """top.qcow2 -> sub2/mid.qcow2 -> ../sub1/base.qcow2, served with cwd elsewhere."""
    (workdir / "sub1").mkdir()
    (workdir / "sub2").mkdir()
    base = workdir / "sub1" / "base.qcow2"
    mid = workdir / "sub2" / "mid.qcow2"
    top = workdir / "top.qcow2"
    qemu_img.create(base, "qcow2", SIZE)
    qemu_io.run(base, *layer_io(0, SIZE, 64 * KiB), fmt="qcow2")
    qemu_img.create(mid, "qcow2", SIZE, backing="../sub1/base.qcow2", backing_fmt="qcow2")
    qemu_io.run(mid, *layer_io(1, SIZE, 64 * KiB), fmt="qcow2")
    qemu_img.create(top, "qcow2", SIZE, backing="sub2/mid.qcow2", backing_fmt="qcow2")
    qemu_io.run(top, *layer_io(2, SIZE, 64 * KiB), fmt="qcow2")
    chain = Chain(workdir, [base, mid, top], [Layer()] * 3, SIZE)
    expected = chain.raw()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub1").mkdir(parents=True)  # decoys: names must not resolve against the cwd
    (elsewhere / "sub2").mkdir()
    monkeypatch.chdir(elsewhere)
    h = serve(top, readonly=True).connect()
    data = read_all(h)
    assert data == expected, first_difference(data, expected)
