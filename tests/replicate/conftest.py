"""Fixtures of the replicate suite (helpers in replharness.py).

``source`` is a fresh datastore with three disks sharing layers (see
:func:`replharness.build_source`); ``target`` is the path of a second
datastore that does not exist yet (``vdisk replicate`` creates it).
``serve_ds(datastore)`` runs ``vdisk serve`` on a datastore until the test ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "cli"):         # replharness, and the CLI suite's cliharness
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cliharness import Datastore, Served, start_serve  # noqa: E402
from replharness import Source, build_source, new_datastore  # noqa: E402


@pytest.fixture(scope="session")
def source_template(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return build_source(new_datastore(tmp_path_factory.mktemp("template")))


@pytest.fixture
def source(source_template: Source, tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A copy of the template source for one test (same images, same content IDs)."""
    # short paths: vdisk serve puts its Unix sockets in the datastore directory
    return source_template.copy_to(tmp_path_factory.mktemp("src") / "ds")


@pytest.fixture
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the target datastore goes: a path that does not exist yet."""
    return tmp_path_factory.mktemp("dst") / "ds"


@pytest.fixture
def serve_ds() -> Iterator[Callable[[Datastore], Served]]:
    """Factory: ``serve_ds(datastore)`` -> a running ``vdisk serve``, stopped at the end."""
    started: list[Served] = []

    def factory(ds: Datastore) -> Served:
        served = start_serve(ds)
        started.append(served)
        return served

    try:
        yield factory
    finally:
        for served in started:
            served.stop()
