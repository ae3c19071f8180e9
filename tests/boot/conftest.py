"""Fixtures of the boot tests: the built test guest and chains on top of it.

``guest_image`` runs ``vm-images/build`` once per session into the cache
directory of :func:`vdisk.lab.guest.default_outdir` (near-instant when nothing
changed). A host without QEMU's system emulator, or without apt to build the
guest from Debian packages, skips these tests; a failing build fails them.

``guest_chain`` gives each test its own copy of the guest as the base of a
fresh qcow2 overlay, so a test can prove the base is left byte for byte
unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from guestharness import GuestChain, sha256_file

from vdisk import qemu_img
from vdisk.lab import guest, machine


@pytest.fixture(scope="session")
def guest_image() -> guest.GuestImage:
    # ci/install installs QEMU: its absence is a broken install, not a host limit
    assert shutil.which(machine.binary()), \
        f"{machine.binary()} is not installed (package qemu-system-x86; run ci/install)"
    assert shutil.which("apt-get") and shutil.which("dpkg"), \
        "building the test guest needs a Debian host (apt-get, dpkg), as the README says"
    return guest.build()


@pytest.fixture
def guest_chain(guest_image: guest.GuestImage, tmp_path: Path) -> GuestChain:
    images = tmp_path / "images"
    images.mkdir()
    base = images / "base.qcow2"
    shutil.copyfile(guest_image.path, base)
    top = images / "top.qcow2"
    qemu_img.create(top, backing="base.qcow2", backing_fmt="qcow2")
    return GuestChain(base, top, sha256_file(base))


@pytest.fixture
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for nbdkit's sockets (Unix socket paths are limited to 107 bytes)."""
    return tmp_path_factory.mktemp("srv")
