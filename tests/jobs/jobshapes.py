"""Random chain shapes for the job tests, built by QEMU and read back by QEMU.

A shape is a chain of 1 to 5 images, base first: qcow2 v2 (compat=0.10) or
v3 with cluster sizes from 512 B to 2 MiB mixed across the layers, or a raw
base; a layer may be shorter (or longer) than the disk. Each layer gets a few
qemu-io requests: data, zero clusters (``write -z``), discards (unallocated
clusters that let the layer below show) and compressed clusters
(``write -c``, whole clusters)::

    top   v3 4k   [ d ][ z ]      [ d ]            size 3 MiB
    mid   v2 64k       [   c   ][   c   ]   [ d ]  size 2 MiB (shorter)
    base  raw     [ d d d d d d d d d d d d d d ]

Data is position-dependent (:func:`data_for`): every sector names its own
offset, so a read served from the wrong place never matches, and it still
compresses, so ``write -c`` really stores compressed clusters. QEMU is the
oracle of the initial guest view (``qemu-img convert -O raw``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from vdisk import qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512


def data_for(seed: int, offset: int, length: int) -> bytes:
    """Compressible bytes that name their position: each 512-byte sector starts
    with its seed and number, the rest is a fixed ramp."""
    first = offset // SECTOR
    last = (offset + length + SECTOR - 1) // SECTOR
    text = b"".join([struct.pack(">4sHI", b"SECT", seed & 0xFFFF, s) + _RAMP
                     for s in range(first, last)])
    skip = offset - first * SECTOR
    return text[skip:skip + length]


_RAMP = bytes(i % 251 for i in range(SECTOR - 10))
_CODE = {"data": "d", "zero": "z", "discard": "u", "compressed": "c"}


@dataclass(frozen=True)
class LayerSpec:
    fmt: str                    # qcow2 or raw
    compat: str                 # 1.1 (v3) or 0.10 (v2); ignored for raw
    cluster: int                # bytes; 0 for raw
    size: int                   # virtual size
    io: tuple[tuple[str, int, int, int], ...]   # (kind, offset, length, seed)

    @property
    def v3(self) -> bool:
        return self.fmt == "qcow2" and self.compat == "1.1"

    def describe(self) -> str:
        if self.fmt == "raw":
            return f"raw {self.size}"
        kinds = "".join(_CODE[k] for k, *_ in self.io) or "-"
        return f"{'v3' if self.v3 else 'v2'} {self.cluster // KiB or self.cluster}" \
               f"{'k' if self.cluster >= KiB else 'b'} size {self.size} io {kinds}"


@dataclass(frozen=True)
class ShapeSpec:
    size: int                   # the disk's (top's) virtual size
    layers: tuple[LayerSpec, ...]   # base first

    def describe(self) -> str:
        return f"{self.size} bytes: " + " <- ".join(f"[{x.describe()}]" for x in self.layers)

    @property
    def depth(self) -> int:
        return len(self.layers)


@dataclass
class Built:
    spec: ShapeSpec
    paths: list[Path]           # base first
    initial: bytes              # QEMU's view of the chain

    @property
    def top(self) -> Path:
        return self.paths[-1]


# -- strategies ------------------------------------------------------------------------

CLUSTERS = st.one_of(st.sampled_from([4 * KiB, 64 * KiB]),
                     st.integers(9, 21).map(lambda b: 1 << b))


@st.composite
def layer_io(draw: st.DrawFn, fmt: str, cluster: int, size: int
             ) -> tuple[tuple[str, int, int, int], ...]:
    sectors = size // SECTOR
    kinds = ["data", "zero", "discard"] + (["compressed"] * 2 if fmt == "qcow2" else [])
    ops = []
    squeezed: dict[int, int] = {}     # compressed clusters: first, into empty clusters only
    if draw(st.integers(0, 3)) == 0:       # a layer full of data: every misread shows
        ops.append(("data", 0, size, draw(st.integers(1, 255))))
    for _ in range(draw(st.integers(0 if ops else 1, 5))):
        kind = draw(st.sampled_from(kinds))
        seed = draw(st.integers(1, 255))
        if kind == "compressed":
            whole = size // cluster
            if whole == 0:
                continue
            c = draw(st.integers(0, whole - 1))
            for k in range(draw(st.integers(1, min(3, whole - c)))):
                squeezed.setdefault(c + k, seed)
            continue
        start = draw(st.integers(0, sectors - 1))
        n = draw(st.one_of(st.integers(1, 8), st.integers(1, 1024)))
        n = min(n, sectors - start)
        ops.append((kind, start * SECTOR, n * SECTOR, seed))
    # qemu-io writes compressed clusters only where the layer has none yet
    first = [("compressed", c * cluster, cluster, seed) for c, seed in sorted(squeezed.items())]
    return tuple(first + ops)


@st.composite
def layer_spec(draw: st.DrawFn, size: int, *, base: bool, top: bool, qcow2_only: bool
               ) -> LayerSpec:
    raw = base and not top and not qcow2_only and draw(st.integers(0, 4)) == 0
    fmt = "raw" if raw else "qcow2"
    compat = draw(st.sampled_from(["1.1", "1.1", "0.10"]))
    cluster = 0 if raw else draw(CLUSTERS)
    own = size
    if not top and draw(st.integers(0, 5)) == 0:       # a backing shorter (or longer)
        own = draw(st.integers(size // SECTOR // 4, size // SECTOR * 5 // 4)) * SECTOR
        own = max(own, SECTOR)
    io = draw(layer_io(fmt, cluster or SECTOR, own))
    return LayerSpec(fmt, compat, cluster, own, io)


@st.composite
def shapes(draw: st.DrawFn, *, min_depth: int = 1, max_depth: int = 5,
           qcow2_only: bool = False) -> ShapeSpec:
    size = draw(st.sampled_from([1, 2, 3, 4])) * MiB + \
        draw(st.sampled_from([0, 0, SECTOR, 20 * KiB, 300 * KiB]))
    depth = draw(st.integers(min_depth, max_depth))
    layers = tuple(draw(layer_spec(size, base=i == 0, top=i == depth - 1,
                                   qcow2_only=qcow2_only)) for i in range(depth))
    return ShapeSpec(size, layers)


# -- building ------------------------------------------------------------------------------


def build(spec: ShapeSpec, directory: Path, prefix: str = "l") -> Built:
    """Create the chain in directory (relative backing names), base first."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, layer in enumerate(spec.layers):
        path = directory / f"{prefix}{i}.{'raw' if layer.fmt == 'raw' else 'qcow2'}"
        size = layer.size if i < spec.depth - 1 else spec.size
        if layer.fmt == "raw":
            qemu_img.create(path, "raw", size)
        else:
            below = spec.layers[i - 1] if i else None
            qemu_img.create(path, "qcow2", size,
                            backing=paths[-1].name if paths else None,
                            backing_fmt=below.fmt if below else None,
                            options={"compat": layer.compat, "cluster_size": layer.cluster})
        _fill(path, layer, directory)
        paths.append(path)
    view = directory / "initial.raw"
    qemu_img.convert(paths[-1], view, "raw", force_share=True)
    initial = view.read_bytes()
    view.unlink()
    return Built(spec, paths, initial)


def _fill(path: Path, layer: LayerSpec, scratch: Path) -> None:
    if not layer.io:
        return
    cmds, files = [], []
    for n, (kind, offset, length, seed) in enumerate(layer.io):
        if kind == "zero":
            cmds.append(f"write -z {offset} {length}")
        elif kind == "discard":
            cmds.append(f"discard {offset} {length}")
        else:
            src = scratch / f".{path.name}.{n}.src"
            src.write_bytes(data_for(seed, offset, length))
            files.append(src)
            flag = "-c " if kind == "compressed" else ""
            cmds.append(f"write {flag}-s {src} {offset} {length}")
    try:
        qemu_io.run(path, *cmds, fmt=layer.fmt)
    finally:
        for f in files:
            os.unlink(f)
