"""Fixtures for engine tests: images made by qemu-img, opened without nbdkit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdisk import qemu_img
from vdisk_block import Disk, open_disk


@pytest.fixture
def opened() -> Iterator[Callable[..., Disk]]:
    """open_disk() that closes every disk it opened when the test ends."""
    disks: list[Disk] = []

    def _open(path: Path | str, readonly: bool = False) -> Disk:
        d = open_disk(str(path), readonly=readonly)
        disks.append(d)
        return d

    yield _open
    for d in disks:
        for f in d.layers:
            f.close()


def raw_view(image: Path, tmp: Path) -> bytes:
    """What QEMU reads from the chain whose top is image."""
    out = tmp / (image.name + ".view.raw")
    qemu_img.convert(image, out, "raw")
    return out.read_bytes()


def assert_matches_oracle(image: Path, oracle: bytes | bytearray, tmp: Path) -> None:
    """qemu-img check is clean and the chain reads back exactly as the oracle."""
    qemu_img.check_clean(image)
    expected = tmp / (image.name + ".oracle.raw")
    expected.write_bytes(oracle)
    qemu_img.compare(image, expected, fmt_b="raw")
