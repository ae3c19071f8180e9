"""Fixtures of the consolidation suite: a datastore with one layered disk, served.

``disk_a`` is disk "a" of a fresh datastore, three qcow2 images written by
qemu-io, each with data of its own::

    a-0.qcow2 (base)  <-  a-1.qcow2 (frozen)  <-  a-2.qcow2 (top)

(32 MiB; ``big_a`` is the same shape at 96 MiB with a 64 MiB copy set, for
tests that must catch a job while it copies).

``serve_ds(ds, disks=("a",))`` starts one nbdkit worker per disk of that
datastore, each with its control socket, and stops (or has already killed)
every server it started when the test ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cons_datastore import (  # noqa: E402
    BASE_IO,
    BIG_SIZE,
    FROZEN_IO,
    SIZE,
    TOP_IO,
    Datastore,
    LayeredDisk,
    ServedDatastore,
    raw_view,
)


@pytest.fixture
def ds(tmp_path: Path) -> Datastore:
    return Datastore(tmp_path / "ds")


@pytest.fixture
def disk_a(ds: Datastore, tmp_path: Path) -> LayeredDisk:
    chain = ds.add_disk("a", [BASE_IO, FROZEN_IO, TOP_IO], SIZE)
    return LayeredDisk(ds, "a", chain, raw_view(chain[0], tmp_path / "initial.raw"))


@pytest.fixture
def big_a(ds: Datastore, tmp_path: Path) -> LayeredDisk:
    """Disk "a" with a copy set large enough (64 MiB) to catch the job copying."""
    chain = ds.add_disk("a", [("write -P 0x41 0 48M",), ("write -P 0x42 16M 48M",),
                              ("write -P 0x43 8M 64M", "write -z 80M 1M")], BIG_SIZE)
    return LayeredDisk(ds, "a", chain, raw_view(chain[0], tmp_path / "initial.raw"))


@pytest.fixture
def serve_ds(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Callable[..., ServedDatastore]]:
    """Factory: serve_ds(ds, name="nbdkit", fsize=None, disks=("a",)) -> a started
    ServedDatastore.

    Sockets live in a short temporary directory (the kernel limits their paths).
    """
    started: list[ServedDatastore] = []
    workdir = tmp_path_factory.mktemp("s")

    def _serve(ds: Datastore, name: str = "nbdkit", fsize: int | None = None,
               disks: tuple[str, ...] = ("a",)) -> ServedDatastore:
        served = ServedDatastore(ds, workdir, name=f"{name}{len(started)}", fsize=fsize,
                                 disks=disks)
        started.append(served)
        return served.start()

    yield _serve
    for served in started:
        served.stop()
