"""Shared pieces of the boot tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

BOOT_TIMEOUT = 120.0  # boot to the workload's verdict under TCG takes ~5-10 s here
EXIT_TIMEOUT = 30.0  # the guest powers off right after its verdict


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class GuestChain:
    base: Path  # a copy of the built guest image
    top: Path  # an empty qcow2 overlay on it; vdisk serves this one
    base_sha256: str

