"""Build image chains the way QEMU writes them, and read QEMU's view of them.

A chain is described base first as a list of :class:`Layer`; each layer is
created with ``qemu-img create`` (backing name relative, so the chain can be
opened from any directory), then filled with ``qemu-io`` commands run on that
layer with its backing below it. A compressed layer is written into a scratch
image first and then converted with ``qemu-img convert -c``.

QEMU is the oracle: :meth:`Chain.raw` is ``qemu-img convert -O raw`` of the
chain, :meth:`Chain.below_has_data` comes from ``qemu-img map`` of the layer
under the top.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from vdisk import qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB

QCOW2_MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA


@dataclass(frozen=True)
class Layer:
    """One image of a chain.

    ``io``: qemu-io commands run on this layer once it exists (``write -P 0x11 0 64k``,
    ``write -z ...``, ``discard ...``). ``size`` defaults to the chain's size.
    ``backing_fmt=False`` removes the backing format extension from the header,
    as older qemu-img versions wrote images.
    """

    fmt: str = "qcow2"
    compat: str = "1.1"
    cluster_size: int = 64 * KiB
    size: int | None = None
    io: tuple[str, ...] = ()
    compressed: bool = False
    backing_fmt: bool = True
    refcount_bits: int = 16

    @property
    def v3(self) -> bool:
        return self.fmt == "qcow2" and self.compat != "0.10"


@dataclass
class Chain:
    """Files of a built chain, base first; ``top`` is what the plugin serves."""

    directory: Path
    paths: list[Path]
    layers: list[Layer]
    size: int
    _raw: bytes | None = field(default=None, repr=False)

    @property
    def top(self) -> Path:
        return self.paths[-1]

    @property
    def top_layer(self) -> Layer:
        return self.layers[-1]

    def raw(self) -> bytes:
        """QEMU's view of the whole chain (cached: call :meth:`reread` after writes)."""
        if self._raw is None:
            self._raw = qemu_raw(self.top, self.directory / "qemu-view.raw")
        return self._raw

    def reread(self) -> bytes:
        self._raw = None
        return self.raw()

    def below_has_data(self) -> list[bool]:
        """Per cluster of the top: does any layer below the top allocate data in it?"""
        cs = self.top_layer.cluster_size
        clusters = (self.size + cs - 1) // cs
        result = [False] * clusters
        if len(self.paths) < 2:
            return result
        backing = self.paths[-2]
        if self.layers[-2].fmt == "raw":
            # a raw file has data up to its end
            end = min(backing.stat().st_size, self.size)
            for c in range((end + cs - 1) // cs):
                result[c] = True
            return result
        for ext in qemu_img.map(backing, force_share=True):
            if not ext["present"]:
                continue
            start = ext["start"]
            end = min(start + ext["length"], self.size)
            for c in range(start // cs, (end + cs - 1) // cs):
                result[c] = True
        return result


def qemu_raw(image: Path, dst: Path) -> bytes:
    """``qemu-img convert -O raw`` of a chain, as bytes."""
    if dst.exists():
        dst.unlink()
    qemu_img.convert(image, dst, "raw", force_share=True)
    data = dst.read_bytes()
    dst.unlink()
    return data


def build_chain(directory: Path, layers: list[Layer], size: int, prefix: str = "l") -> Chain:
    """Create the chain in ``directory``: files ``{prefix}0.{ext}`` (base) .. top."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, layer in enumerate(layers):
        path = directory / f"{prefix}{i}.{'raw' if layer.fmt == 'raw' else 'qcow2'}"
        below = paths[-1] if paths else None
        _create_layer(path, layer, layer.size or size, below, layers[i - 1] if i else None)
        paths.append(path)
    return Chain(directory, paths, list(layers), size)


def _create_layer(
    path: Path, layer: Layer, size: int, below: Path | None, below_layer: Layer | None
) -> None:
    if layer.fmt == "raw":
        if below is not None:
            raise ValueError("a raw image has no backing file")
        qemu_img.create(path, "raw", size)
        if layer.io:
            qemu_io.run(path, *layer.io, fmt="raw")
        return
    options: dict[str, str | int] = {"compat": layer.compat, "cluster_size": layer.cluster_size}
    if layer.refcount_bits != 16:
        options["refcount_bits"] = layer.refcount_bits
    if layer.compressed:
        if below is not None:
            raise ValueError("compressed layers are built as bases here")
        scratch = path.with_suffix(".scratch")
        qemu_img.create(scratch, "qcow2", size, options=options)
        if layer.io:
            qemu_io.run(scratch, *layer.io, fmt="qcow2")
        qemu_img.convert(scratch, path, "qcow2", options=options, compressed=True)
        scratch.unlink()
        return
    if below is None:
        qemu_img.create(path, "qcow2", size, options=options)
    else:
        assert below_layer is not None
        qemu_img.create(
            path,
            "qcow2",
            size,
            backing=below.name,
            backing_fmt=below_layer.fmt,
            options=options,
        )
    if layer.io:
        qemu_io.run(path, *layer.io, fmt="qcow2")
    if below is not None and not layer.backing_fmt:
        drop_backing_format(path)


def header_extensions(data: bytes) -> tuple[int, list[tuple[int, bytes]], int]:
    """(start offset, [(magic, payload)], end offset) of a qcow2 header's extension area."""
    version = struct.unpack_from(">I", data, 4)[0]
    start = struct.unpack_from(">I", data, 100)[0] if version >= 3 else 72
    exts: list[tuple[int, bytes]] = []
    pos = start
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        pos += 8
        if magic == 0:
            break
        exts.append((magic, data[pos : pos + length]))
        pos += (length + 7) & ~7
    return start, exts, pos


def drop_backing_format(path: Path) -> None:
    """Remove the backing format header extension (images then rely on probing)."""
    with path.open("r+b") as f:
        head = bytearray(f.read(4096))
        start, exts, end = header_extensions(bytes(head))
        area = bytearray()
        for magic, payload in exts:
            if magic == EXT_BACKING_FORMAT:
                continue
            area += struct.pack(">II", magic, len(payload)) + payload
            area += b"\0" * (-len(payload) % 8)
        area += b"\0" * 8
        area += b"\0" * (end - start - len(area))
        f.seek(start)
        f.write(area)
    info = qemu_img.info(path)
    assert "backing-filename-format" not in info, info


def vdisk_write(path: Path, data: bytes, offset: int) -> None:
    """One open of the chain by vdisk's engine: write, flush, close (a write that
    keeps the image's content identity valid, unlike a qemu-io write)."""
    from vdisk_block.chain import open_disk

    d = open_disk(str(path))
    try:
        d.write(data, offset)
        d.flush()
    finally:
        d.close()
