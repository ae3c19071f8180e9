"""Shared fixtures: import paths, temporary work directories, served images.

Layout without ``__init__.py`` files: this conftest puts ``plugin/`` on
``sys.path`` (so ``import vdisk_block`` works in unit tests), falls back to
``orchestration/`` when the ``vdisk`` package is not installed, and puts
``tests/integration`` on ``sys.path`` so every suite can ``import nbdharness``.

The ``serve`` fixture starts nbdkit with the vdisk plugin on a Unix socket and
hands out connected libnbd handles; everything it started is closed and stopped
when the test ends, whatever happens::

    def test_size(serve, chain):
        served = serve(chain.top)
        h = served.connect()
        assert h.get_size() == chain.size
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

for _path in (REPO / "plugin", TESTS / "integration"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

try:
    import vdisk  # noqa: F401
except ImportError:  # not installed with `pip install -e .`: use the checkout
    sys.path.insert(0, str(REPO / "orchestration"))

import nbdharness  # noqa: E402


def _short_bytes_explanation() -> None:
    """Explain a failed == on large byte strings by the first difference.

    pytest explains a failed comparison with difflib, even when the assert has
    a message, which takes minutes on the megabytes these suites compare: a
    failure would look like a hang until the timeout. The built-in explainer
    always runs, so it is wrapped rather than pre-empted by a hook.
    """
    from _pytest.assertion import util

    original = util.assertrepr_compare

    def explain(op, left, right, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if op == "==" and isinstance(left, (bytes, bytearray, memoryview)) and \
                isinstance(right, (bytes, bytearray, memoryview)) and \
                max(len(left), len(right)) > 4096:
            a, b = bytes(left), bytes(right)
            first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
            where = f"first difference at byte {first}" if first is not None else \
                "one is a prefix of the other"
            return iter([f"{len(a)} bytes == {len(b)} bytes", where])
        return original(op, left, right, *args, **kwargs)

    util.assertrepr_compare = explain


_short_bytes_explanation()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh directory for the images of one test."""
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nbdharness.ServerFactory]:
    """Factory: ``serve(image, readonly=False)`` -> a running :class:`nbdharness.Served`.

    Server work directories are short (``.../s0``) so that the Unix socket path
    stays under the kernel's 107-byte limit whatever the test is called.
    """
    factory = nbdharness.ServerFactory(lambda: tmp_path_factory.mktemp("s"))
    try:
        yield factory
    finally:
        factory.close_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if nbdharness.EXAMPLES_RUN:
        terminalreporter.section("randomised examples run")
        for what, n in nbdharness.EXAMPLES_RUN.items():
            terminalreporter.write_line(f"{n:6d}  {what}")
        total = sum(nbdharness.EXAMPLES_RUN.values())
        terminalreporter.write_line(f"{total:6d}  total")
