"""Checks shared by the job tests: the guest view, QEMU's word, the counts.

* :func:`verify_view` reads the whole disk in large reads and then many small
  ones (the engine's fast path: one slot of the cluster map) and compares
  both with the model.
* :func:`qemu_final` is QEMU's last word on a stopped chain: ``qemu-img check``
  clean (no corruption, no leak) on every image, ``qemu-img compare`` equal
  to the model written as a raw file.
* :func:`on_disk_view` is what a crash now would leave: QEMU reading the files
  of a chain that is still open (``-U``), without any flush.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from jobguest import first_difference
from nbdharness import EXAMPLES_RUN

from vdisk import qemu_img

MiB = 1 << 20

Read = Callable[[int, int], bytes]


def count(what: str, n: int = 1) -> None:
    """Add to the table of randomised cases that conftest prints at the end."""
    EXAMPLES_RUN[what] = EXAMPLES_RUN.get(what, 0) + n


def verify_view(read: Read, model: bytes, where: str, *, seed: int = 0,
                small: int = 96, chunk: int = MiB) -> None:
    """The guest view equals the model: whole-disk reads, then small random reads."""
    size = len(model)
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        diff = first_difference(read(n, off), model[off:off + n], off)
        assert diff is None, f"{where}: read [{off}, +{n}): {diff}"
    rng = random.Random(seed)
    for _ in range(small):
        off = rng.randrange(size)
        n = min(rng.choice((1, 512, rng.randint(1, 4096), rng.randint(1, 70_000))), size - off)
        diff = first_difference(read(n, off), model[off:off + n], off)
        assert diff is None, f"{where}: small read [{off}, +{n}): {diff}"


def chain_of(top: Path) -> list[Path]:
    return [Path(i["filename"]).resolve() for i in _chain_info(top)]


def _chain_info(top: Path) -> list[dict[str, Any]]:
    infos: list[dict[str, Any]] = qemu_img.info(top, backing_chain=True, force_share=True)
    return infos


def check_clean(infos: Iterable[dict[str, Any]], where: str, allow_leaks: bool = False) -> None:
    """qemu-img check on each qcow2 image (``qemu-img info`` dicts): no corruption, and
    no leak unless allowed (after a crash)."""
    for info in infos:
        if info["format"] != "qcow2":
            continue
        r = qemu_img.check(info["filename"])
        assert r["corruptions"] == 0 and (allow_leaks or r["leaks"] == 0), \
            f"{where}: qemu-img check {info['filename']}: {r}"


def compare_raw(top: Path, model: bytes, scratch: Path, where: str) -> None:
    """qemu-img compare of a chain with the model (raises on a mismatch)."""
    scratch.write_bytes(model)
    try:
        qemu_img.compare(top, scratch, fmt_b="raw", force_share=True)
    except Exception as e:
        raise AssertionError(f"{where}: qemu-img compare {top}: {e}") from None
    finally:
        scratch.unlink()


def qemu_final(top: Path, model: bytes, scratch: Path, where: str,
               also: Iterable[Path] = (), allow_leaks: bool = False) -> list[Path]:
    """QEMU's word on a stopped chain (and on other images left behind); the chain."""
    infos = _chain_info(top)
    check_clean([*infos, *(qemu_img.info(p, force_share=True) for p in also)], where,
                allow_leaks)
    compare_raw(top, model, scratch, where)
    return [Path(i["filename"]).resolve() for i in infos]


def on_disk_view(top: Path, scratch: Path) -> bytes:
    """The chain as its files hold it now (what a kill -9 would leave), read by QEMU."""
    qemu_img.convert(top, scratch, "raw", force_share=True)
    try:
        return scratch.read_bytes()
    finally:
        scratch.unlink()
