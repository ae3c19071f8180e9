"""vdisk.process.dies_with_us: a command we start gets the chosen signal when we die.

A parent process starts a child under the prefix, waits until the child has
installed its SIGTERM handler, and exits; the child records what it got.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vdisk import process

pytestmark = pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"
)

# argv: RECORD; writes "ready" once its handler is in place, "SIGTERM" when it gets one
CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    record = Path(sys.argv[1])
    def on_term(signum, frame):
        record.write_text("SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    record.write_text("ready")
    time.sleep(30)
""")

# argv: SIGNAL RECORD; starts the child under dies_with_us(SIGNAL), prints its pid, exits
PARENT = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    from vdisk import process
    sig, record = signal.Signals[sys.argv[1]], Path(sys.argv[2])
    child = subprocess.Popen([*process.dies_with_us(sig), sys.executable, "-c", sys.argv[3],
                              str(record)])
    deadline = time.monotonic() + 20
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    print(child.pid, flush=True)
""")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def run_parent(sig: signal.Signals, record: Path) -> int:
    cp = subprocess.run([sys.executable, "-c", PARENT, sig.name, str(record), CHILD],
                        capture_output=True, text=True, timeout=30, check=True,
                        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    return int(cp.stdout)


def wait_until_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_prefix_names_the_signal() -> None:
    assert process.dies_with_us()[1:] == ["--pdeathsig", "KILL", "--"]
    assert process.dies_with_us(signal.SIGTERM)[1:] == ["--pdeathsig", "TERM", "--"]


def test_sigterm_lets_the_child_clean_up(tmp_path: Path) -> None:
    record = tmp_path / "record"
    pid = run_parent(signal.SIGTERM, record)
    assert wait_until_gone(pid), f"child {pid} outlived its parent"
    assert record.read_text() == "SIGTERM"


def test_sigkill_ends_the_child_at_once(tmp_path: Path) -> None:
    record = tmp_path / "record"
    pid = run_parent(signal.SIGKILL, record)
    assert wait_until_gone(pid), f"child {pid} outlived its parent"
    assert record.read_text() == "ready"
