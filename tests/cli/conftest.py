"""Fixtures of the ``vdisk`` command-line tests (helpers in cliharness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cliharness import Datastore, Served, run_vdisk, start_serve


@pytest.fixture
def datastore(tmp_path_factory: pytest.TempPathFactory) -> Datastore:
    # short paths: Unix sockets live in here too
    path = tmp_path_factory.mktemp("ds")
    run_vdisk("datastore", "init", path)
    return Datastore(path)


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Factory: ``serve(datastore, *extra_args)`` -> a running :class:`Served`."""
    started: list[Served] = []

    def factory(ds: Datastore, *extra: str) -> Served:
        served = start_serve(ds, *extra)
        started.append(served)
        return served

    try:
        yield factory
    finally:
        for served in started:
            served.stop()


