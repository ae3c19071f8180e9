"""vm-images/build: the guest image's layout, and the cache that makes rebuilds instant."""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

import pytest
from guestharness import sha256_file

from vdisk import qemu_img
from vdisk.lab import guest

pytestmark = pytest.mark.boot

MiB = 1024 * 1024


def test_guest_image_layout(guest_image: guest.GuestImage, tmp_path: Path) -> None:
    info = qemu_img.info(guest_image.path)
    assert (info["format"], info["virtual-size"]) == ("qcow2", guest_image.virtual_size)
    qemu_img.check_clean(guest_image.path, allow_leaks=False)
    assert sha256_file(guest_image.path) == guest_image.sha256

    raw = tmp_path / "guest.raw"
    qemu_img.convert(guest_image.path, raw, "raw", force_share=True)
    with open(raw, "rb") as f:
        mbr = f.read(512)
        f.seek(guest_image.boot_offset)
        fat = f.read(512)
    assert mbr[510:] == b"\x55\xaa"
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
    boot, data = entries[0], entries[1]
    assert boot == (0x80, 0x06, guest_image.boot_offset // 512, guest_image.boot_size // 512)
    assert data == (0x00, 0xDA, guest_image.data_offset // 512, guest_image.data_size // 512)
    assert entries[2][1] == entries[3][1] == 0
    assert fat[0x2B:0x36] == b"VDISKBOOT  " and fat[0x36:0x3E] == b"FAT16   "

    listing = subprocess.run(
        ["mdir", "-a", "-b", "-i", f"{raw}@@{guest_image.boot_offset}", "::/"],
        capture_output=True, text=True, check=True, timeout=60,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    ).stdout.split()  # fmt: skip
    names = {Path(p).name.lower() for p in listing}
    assert {"vmlinuz", "initrd.img", "syslinux.cfg", "vdisk.sum", "ldlinux.sys"} <= names


def test_second_build_is_near_instant(guest_image: guest.GuestImage) -> None:
    start = time.monotonic()
    again = guest.build(guest_image.path.parent)
    elapsed = time.monotonic() - start
    assert again == guest_image
    assert elapsed < 5.0, f"a build with unchanged inputs took {elapsed:.1f} s"
