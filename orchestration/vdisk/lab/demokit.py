"""What the demo programs share: their command line, output and failures.

:func:`demo_main` is a demo's ``main``: it parses the common options, runs
the demo in a (temporary) work directory and prints its summary; a
:class:`DemoFailure` (or a vdisk error) ends it with one line on stderr and
exit code 1. :func:`say` prints from any thread, :func:`cli` runs a ``vdisk``
command and shows it first, :func:`job_lines` and :func:`check_job` show and
check a consolidation job's figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import Error
from ..progress import human_bytes
from . import guest, records
from .vdiskrun import vdisk

BOOT_TIMEOUT = 180.0  # boot to the workload's first marker: ~7 s under TCG here
EXIT_TIMEOUT = 30.0
DISK = "vm"  # the guest's disk in the demos' datastores

Summary = list[tuple[str, str]]


class DemoFailure(Exception):
    """A check failed; the message is the one-line reason."""


def field(lines: list[str], prefix: str) -> dict[str, str]:
    """The ``key=value`` fields of the first of ``lines`` that starts with ``prefix``."""
    for line in lines:
        if line.startswith(prefix):
            return guest.marker_fields(line[len(prefix) :])
    raise DemoFailure(f"no {prefix!r} line on the console")


_out = threading.Lock()


def say(text: str = "") -> None:
    with _out:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def cli(*args: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`vdisk`, the command shown first."""
    say("$ vdisk " + shlex.join(os.fspath(a) for a in args))
    return vdisk(*args)


def job_lines(job: dict[str, Any]) -> list[str]:
    copy_set = int(job.get("copy_set_bytes") or 0)
    mirrored = int(job.get("bytes_mirrored") or 0)
    writes = mirrored // records.RECORD_SIZE
    return [
        f"job {job['id']}: {job['state']}, {job['top_before']} -> {job['top_after']}",
        f"  copy set        {human_bytes(copy_set)}",
        f"  bytes copied    {human_bytes(int(job.get('bytes_copied') or 0))} "
        f"in {job.get('passes')} pass(es)",
        f"  bytes mirrored  {human_bytes(mirrored)} "
        f"({writes} guest write{'' if writes == 1 else 's'} of 4 KiB during the job)",
        f"  time to ready   {float(job.get('time_to_ready_s') or 0):.3f} s",
        f"  duration        {float(job.get('duration_s') or 0):.3f} s",
        f"  pivot pause     {float(job.get('pivot_pause_ms') or 0):.1f} ms",
    ]


def check_job(job: dict[str, Any]) -> None:
    if job.get("state") != "done":
        raise DemoFailure(f"job {job.get('id')} is {job.get('state')}: {job.get('error')}")
    if job.get("passes") != 1:
        raise DemoFailure(f"job {job['id']} took {job.get('passes')} passes, not one")
    if int(job["bytes_copied"]) > int(job["copy_set_bytes"]):
        raise DemoFailure(f"job {job['id']} copied {job['bytes_copied']} bytes of a "
                          f"{job['copy_set_bytes']}-byte copy set")  # fmt: skip


def demo_main(name: str, doc: str, run: Callable[[Path, Path | None], Summary],
              argv: list[str] | None, *, workdir_help: str, logs: str,
              quiet_level: int = logging.ERROR) -> int:
    """The command line of a demo: parse, run in a (temporary) work directory,
    print the summary; a failure is one line on stderr and exit code 1."""
    parser = argparse.ArgumentParser(prog=f"python -m vdisk.lab.{name}",
                                     description=doc.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help=workdir_help)
    parser.add_argument("--guest-dir", type=Path,
                        help="where the guest image is built (default: cache)")
    parser.add_argument("--verbose", action="store_true", help="log every command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet_level)
    # SIGTERM ends the demo like Ctrl-C: every process it started is stopped on the way out
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"vdisk-{name}-") as tmp:
        workdir = (args.workdir or Path(tmp)).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            summary = run(workdir, args.guest_dir)
        except (DemoFailure, Error) as e:
            reason = str(e)
        except KeyboardInterrupt:
            reason = "interrupted"
        except Exception as e:  # noqa: BLE001 - libnbd's nbd.Error and anything unexpected
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = ""
        if reason:
            print(f"{name}: FAILED: {reason}".splitlines()[0], file=sys.stderr)
            print("(run with --workdir DIR to keep the logs)" if args.workdir is None
                  else f"logs: {workdir}/{logs}", file=sys.stderr)
            return 1
    width = max(14, *(len(what) + 2 for what, _ in summary))
    print("\n--- summary")
    for what, result in summary:
        print(f"{what:{width}} {result}")
    print(f"{'total':{width}} {time.monotonic() - start:.1f} s", flush=True)
    return 0
