"""Fuzz: random byte flips in the metadata of a small valid chain.

Flips land in the header (with its extensions and backing name), the L1
table, an L2 table, the refcount table and a refcount block of the top of a
two-image chain. Whatever the damage, nbdkit either refuses to start cleanly
(normal exit code, no traceback) or starts and then survives reading the whole
disk, a write and a flush: failed requests are fine, a dead or hung server is
not. No file other than the damaged top is ever changed or created.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbd
import pytest
import qcow2layout as q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdharness import (
    EXAMPLES_RUN,
    KiB,
    MiB,
    ServerFactory,
    pread_deadline,
    pwrite_deadline,
    snapshot_tree,
    wait_command,
)

from vdisk import qemu_img, qemu_io
from vdisk.errors import NbdkitError

EXAMPLES = int(os.environ.get("VDISK_FUZZ_EXAMPLES", "150"))
SIZE = 2 * MiB
CS = 64 * KiB


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A base and a top with data, zero and compressed clusters; the top's metadata regions."""
    d = tmp_path_factory.mktemp("fuzz-template")
    base, top = d / "base.qcow2", d / "top.qcow2"
    qemu_img.create(base, "qcow2", SIZE)
    qemu_io.run(base, "write -P 0x11 0 1M", fmt="qcow2")
    qemu_img.create(top, "qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io.run(
        top,
        "write -P 0x22 64k 100k",
        "write -z 512k 64k",
        "write -c -P 0x33 1M 128k",
        "write -P 0x44 1536k 4k",
        fmt="qcow2",
    )
    layout = q.read_layout(top)
    regions = {
        "header": (0, 512),
        "l1": (layout.l1_offset, 8 * layout.l1_size),
        "l2": (layout.l2_offsets[0], 8 * (SIZE // CS)),
        "refcount-table": (layout.refcount_table_offset, 64),
        "refcount-block": (layout.refcount_blocks[0], 2 * (layout.file_size // CS + 1)),
    }
    return top, regions


def flips(regions: dict[str, tuple[int, int]]) -> st.SearchStrategy:
    def one(region: str) -> st.SearchStrategy:
        start, length = regions[region]
        return st.tuples(st.integers(start, start + length - 1), st.integers(1, 255))

    return st.lists(st.sampled_from(sorted(regions)).flatmap(one), min_size=1, max_size=4)


def exercise(served) -> None:
    """Read everything, write and flush; only request errors are acceptable."""
    h = served.connect()
    size = h.get_size()
    for offset in range(0, min(size, 4 * MiB), 256 * KiB):
        try:
            pread_deadline(h, min(256 * KiB, size - offset), offset)
        except nbd.Error:
            pass
        assert served.alive(), f"nbdkit died reading at {offset}: {served.stderr()}"
    for offset in (0, 70 * KiB, min(size, SIZE) - 4 * KiB):
        if offset < 0 or offset + 4 * KiB > size:
            continue
        try:
            pwrite_deadline(h, b"\x5a" * 4 * KiB, offset)
        except nbd.Error:
            pass
        assert served.alive(), f"nbdkit died writing at {offset}: {served.stderr()}"
    try:
        wait_command(h, h.aio_flush())
    except nbd.Error:
        pass
    assert served.alive(), f"nbdkit died flushing: {served.stderr()}"


def test_fuzz_metadata(chain, tmp_path_factory: pytest.TempPathFactory) -> None:
    template, regions = chain
    base = template.parent / "base.qcow2"
    key = "malformed fuzz examples"
    EXAMPLES_RUN[key] = 0
    outcomes = {"refused": 0, "served": 0}  # how the damage was met, for the log

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    @given(changes=flips(regions))
    def example(changes: list[tuple[int, int]]) -> None:
        EXAMPLES_RUN[key] += 1
        d = tmp_path_factory.mktemp("fuzz")
        image = d / "top.qcow2"
        shutil.copyfile(template, image)
        shutil.copyfile(base, d / "base.qcow2")
        data = bytearray(image.read_bytes())
        for offset, xor in changes:
            data[offset] ^= xor
        image.write_bytes(data)
        before = snapshot_tree(d)
        del before["top.qcow2"]
        factory = ServerFactory(lambda: tmp_path_factory.mktemp("s"))
        try:
            try:
                served = factory(image)
            except NbdkitError as e:
                assert e.returncode is not None and e.returncode > 0, f"{changes}: {e}"
                assert "Traceback (most recent call last)" not in e.stderr, e.stderr
                outcomes["refused"] += 1
            else:
                outcomes["served"] += 1
                exercise(served)
                served.close_handles()
                returncode = served.server.stop()
                assert returncode in (0, -15), f"{changes}: nbdkit exit {returncode}"
        finally:
            factory.close_all()
        after = snapshot_tree(d)
        assert "top.qcow2" in after
        del after["top.qcow2"]
        assert after == before, f"{changes}: files other than the image changed"

    example()
    print(f"fuzz outcomes: {outcomes}")
    assert EXAMPLES_RUN[key] >= min(EXAMPLES, 10)
