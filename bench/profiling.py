"""Sampling profiles of the vdisk server with py-spy (optional: ``--profile DIR``).

py-spy attaches to the running nbdkit process and samples the Python stacks of
the plugin without stopping it (``--nonblocking``). The raw output is one line
per distinct stack, ``frame;frame;...;frame COUNT``, which flamegraph.pl turns
into an SVG; ``summarize`` turns it into a short text table.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from vdisk import process
from vdisk.process import ProcessOwner

log = logging.getLogger(__name__)


def find_py_spy() -> str | None:
    """py-spy from $PY_SPY, next to this Python (the venv), or on PATH."""
    if os.environ.get("PY_SPY"):
        return os.environ["PY_SPY"]
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpy(ProcessOwner):
    """Records ``pid`` while the ``with`` block runs; stops py-spy in any case."""

    def __init__(self, binary: str, pid: int, out: Path, rate: int = 250) -> None:
        super().__init__(out.with_suffix(".log"))
        self.argv = [binary, "record", "--pid", str(pid), "--rate", str(rate),
                     "--format", "raw", "--nonblocking", "-o", str(out)]
        self.out = out

    def start(self) -> None:
        self._require_not_started()
        log.debug("running %s", " ".join(self.argv))
        with open(self._output_path, "wb") as logf:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                          stdout=logf, stderr=subprocess.STDOUT)

    def _stop_on_exit(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                process.stop(proc, 10, log=log, name="py-spy")
        if not self.out.exists():
            log.warning("py-spy wrote no profile: %s", self.stderr_text().strip()[-300:])


def summarize(raw: Path, top: int = 8) -> str:
    """The frames with the most samples, by own time and by time including callees."""
    own: collections.Counter[str] = collections.Counter()
    total_in: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            total_in[frame] += n
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} samples; own time:"]
    lines += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  including callees:")
    lines += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in total_in.most_common(top)]
    return "\n".join(lines)
