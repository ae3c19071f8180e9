"""Demonstrate vdisk end to end: serve a qcow2 chain over NBD, read it, write it, check it.

    python -m vdisk.lab.demo [--base-format raw] [--keep DIR] [--verbose]

1. Builds a chain with qemu-img and qemu-io: a base image with a pattern, a
   qcow2 delta with a second pattern, an empty qcow2 delta on top.
2. Serves the top with nbdkit and the vdisk plugin (vdisk.nbdkit.NbdkitServer)
   and, through libnbd: prints the export size and an extents summary, reads
   both patterns through the chain, writes new data (cluster-aligned and not),
   flushes, reads it back, and times a sequential read of the whole disk.
3. Stops nbdkit; ``qemu-img check`` must find the top clean and ``qemu-img
   compare`` must find it equal to a raw image built independently with
   qemu-io from the same writes.

Exit code 0 on success; otherwise 1 with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__, qemu_img, qemu_io
from ..errors import Error
from ..nbdkit import PLUGIN, NbdkitServer

if TYPE_CHECKING:
    import nbd

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
READ_CHUNK = 1 * MiB

# base:allocation flags (NBD protocol)
STATE_HOLE = 1
STATE_ZERO = 2


class DemoFailure(Exception):
    """A check of the demo failed; the message is the one-line reason."""


@dataclass(frozen=True)
class Write:
    """A pattern written to the disk: by qemu-io into a layer, or by the NBD client."""

    pattern: int
    offset: int
    length: int

    @property
    def qemu_io(self) -> str:
        return f"write -P 0x{self.pattern:02x} {self.offset} {self.length}"

    def describe(self) -> str:
        return f"0x{self.pattern:02x} x {size_text(self.length)} at {offset_text(self.offset)}"


BASE_WRITE = Write(0xA5, 0, 32 * MiB)
DELTA_WRITE = Write(0x5C, 8 * MiB, 4 * MiB)
NBD_WRITES = (
    Write(0x3E, 40 * MiB, 2 * MiB),  # whole clusters where the chain has no data
    Write(0xC3, 12 * MiB - 3000, 6000),  # unaligned, across the delta/base boundary
)


def size_text(n: int) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def offset_text(n: int) -> str:
    return f"offset {size_text(n)}" if n % MiB == 0 and n else f"offset {n}"


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"== {title}")


def row(label: str, value: str) -> None:
    say(f"  {label:<22} {value}")


def expect(condition: bool, reason: str) -> None:
    if not condition:
        raise DemoFailure(reason)


def build_chain(workdir: Path, base_format: str) -> Path:
    """base <- delta1.qcow2 <- top.qcow2 with relative backing names; returns the top."""
    base = workdir / f"base.{base_format}"
    delta1 = workdir / "delta1.qcow2"
    top = workdir / "top.qcow2"
    qemu_img.create(base, base_format, SIZE)
    qemu_io.run(base, BASE_WRITE.qemu_io, fmt=base_format)
    qemu_img.create(delta1, "qcow2", backing=base.name, backing_fmt=base_format)
    qemu_io.run(delta1, DELTA_WRITE.qemu_io, fmt="qcow2")
    qemu_img.create(top, "qcow2", backing=delta1.name, backing_fmt="qcow2")
    for info in qemu_img.info(top, backing_chain=True):
        name = Path(info["filename"]).name
        backing = info.get("backing-filename")
        link = f"-> {backing}" if backing else "(base)"
        row(name, f"{info['format']:<5} {size_text(info['virtual-size'])} {link}")
    row("written by qemu-io", f"base {BASE_WRITE.describe()}; delta1 {DELTA_WRITE.describe()}")
    return top


def build_expected(path: Path) -> None:
    """The disk as it must read after the demo, written independently as a raw image."""
    writes = [BASE_WRITE, DELTA_WRITE, *NBD_WRITES]
    qemu_img.create(path, "raw", SIZE)
    qemu_io.run(path, *(w.qemu_io for w in writes), fmt="raw")


def extents(h: nbd.NBD, length: int) -> list[tuple[int, int]]:
    """(length, flags) of base:allocation extents covering [0, length)."""
    found: list[tuple[int, int]] = []

    def callback(metacontext: str, offset: int, entries: list[int], err: object) -> int:
        if metacontext == "base:allocation":
            found.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    offset = 0
    while offset < length:
        before = len(found)
        h.block_status(min(length - offset, 2**31), offset, callback)
        got = sum(n for n, _ in found[before:])
        expect(got > 0, f"block status at offset {offset} returned no extent")
        offset += got
    return found


def extents_summary(found: list[tuple[int, int]]) -> str:
    data = sum(n for n, flags in found if not flags & STATE_ZERO)
    zero = sum(n for n, flags in found if flags & STATE_ZERO)
    extents = "extent" if len(found) == 1 else "extents"
    return f"{len(found)} {extents}: {size_text(data)} data, {size_text(zero)} zero"


def check_read(h: nbd.NBD, write: Write, where: str) -> None:
    data = h.pread(write.length, write.offset)
    expect(
        data == bytes([write.pattern]) * write.length,
        f"read at {write.offset} did not return pattern 0x{write.pattern:02x} ({where})",
    )
    row(
        f"read {size_text(write.length)}",
        f"0x{write.pattern:02x} at {offset_text(write.offset)} from {where}: ok",
    )


def sequential_read(h: nbd.NBD, size: int) -> tuple[float, str]:
    """Read the whole disk in READ_CHUNK requests; return (seconds, sha256)."""
    digest = hashlib.sha256()
    start = time.perf_counter()
    for offset in range(0, size, READ_CHUNK):
        digest.update(h.pread(min(READ_CHUNK, size - offset), offset))
    return time.perf_counter() - start, digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def serve_and_exercise(top: Path, workdir: Path, expected: Path) -> dict[str, float]:
    import nbd  # Debian's python3-libnbd, in the system site-packages

    figures: dict[str, float] = {}
    server = NbdkitServer([f"image={top}"], workdir)
    say(f"  $ {shlex.join(server.cmd)}")
    started = time.perf_counter()
    with server:
        figures["startup_s"] = time.perf_counter() - started
        row("nbdkit pid", f"{server.pid}, ready in {figures['startup_s']:.2f} s")
        row("serving on", server.uri)
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(server.uri)
        try:
            size = h.get_size()
            row("export size", f"{size} bytes ({size_text(size)})")
            expect(size == SIZE, f"export size is {size}, expected {SIZE}")
            expect(not h.is_read_only(), "export is read-only")
            expect(h.can_meta_context("base:allocation"), "server has no base:allocation")
            row("extents", extents_summary(extents(h, size)))
            check_read(h, Write(BASE_WRITE.pattern, 0, MiB), "base, two layers down")
            check_read(h, DELTA_WRITE, "delta1, one layer down")
            for write in NBD_WRITES:
                h.pwrite(bytes([write.pattern]) * write.length, write.offset)
                row("write", write.describe())
            h.flush()
            row("flush", "ok")
            for write in NBD_WRITES:
                check_read(h, write, "the top, after flush")
            row("extents", extents_summary(extents(h, size)))
            seconds, digest = sequential_read(h, size)
            figures["read_s"] = seconds
            figures["read_mib_s"] = size / MiB / seconds
            row(
                "sequential read",
                f"{size_text(size)} in {seconds:.2f} s = {figures['read_mib_s']:.0f} MiB/s "
                f"({size_text(READ_CHUNK)} requests)",
            )
            expect(digest == file_sha256(expected), "the disk read over NBD differs from expected")
            row("whole disk", "equal to the expected raw image (sha256)")
        finally:
            h.shutdown()
    row("nbdkit stopped", f"exit code {server.returncode}")
    stderr = server.stderr_text().strip()
    if stderr:
        row("nbdkit stderr", stderr.replace("\n", " / "))
    return figures


def run_demo(workdir: Path, base_format: str) -> None:
    expect(PLUGIN.is_file(), f"the vdisk plugin is missing: {PLUGIN}")
    say(f"vdisk {__version__} demo: a qcow2 chain served over NBD by the vdisk nbdkit plugin")
    row("work directory", str(workdir))
    row("plugin", str(PLUGIN))

    step("Build the chain with qemu-img and qemu-io")
    top = build_chain(workdir, base_format)
    expected = workdir / "expected.raw"
    build_expected(expected)
    row("expected.raw", "the same writes, done independently on a raw image")

    step("Serve top.qcow2 with nbdkit and use it through libnbd")
    figures = serve_and_exercise(top, workdir, expected)

    step("Check with QEMU")
    check = qemu_img.check(top)
    expect(check["corruptions"] == 0, f"qemu-img check found {check['corruptions']} corruptions")
    row(
        "qemu-img check",
        f"top.qcow2 clean: {check.get('allocated-clusters', 0)} clusters allocated, "
        f"{check['leaks']} leaked",
    )
    qemu_img.compare(top, expected, fmt_a="qcow2", fmt_b="raw")
    row("qemu-img compare", "top.qcow2 (whole chain) and expected.raw are identical")

    written = sum(w.length for w in NBD_WRITES)
    step("Summary")
    say(
        f"  OK: served {size_text(SIZE)} through a 3-image chain; wrote {size_text(written)} "
        "over NBD; "
        f"read {size_text(SIZE)} sequentially at {figures['read_mib_s']:.0f} MiB/s; "
        f"nbdkit ready in {figures['startup_s']:.2f} s; qemu-img check clean, compare identical."
    )


@contextmanager
def demo_directory(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise DemoFailure(f"--keep {keep}: the directory must be new or empty")
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.absolute()
        return
    with tempfile.TemporaryDirectory(prefix="vdisk-demo-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vdisk.lab.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--base-format", choices=("qcow2", "raw"), default="qcow2")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it")
    parser.add_argument("--verbose", "-v", action="store_true", help="log external commands")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with demo_directory(args.keep) as workdir:
            run_demo(workdir, args.base_format)
    except (DemoFailure, Error, OSError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # libnbd's nbd.Error and anything unexpected
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
