"""How the consolidation benchmark collapses a delta, what it records, and vdisk's way.

Each run starts from a fresh copy of the same base image, makes a delta on
it, fills the delta's range [0, delta) with the same generation-0 blocks
through NBD (bench/guest_writer.py), then collapses it:

- ``vdisk`` (here): ``nbdkit -U SOCK python plugin/vdisk_nbdkit.py
  datastore=DIR disk=NAME control=CTL`` (the worker ``vdisk serve`` runs for
  one disk); the control command ``snapshot`` makes the
  delta, then ``consolidate`` (into the frozen base, pivot true) runs while
  the load writes through NBD. Figures from the job (``query-jobs``) and our
  clock.
- QEMU's active commit and write-blocking mirror, and the offline
  ``qemu-img commit``: qemu_consolidators.py.

Afterwards, with the server stopped: ``qemu-img check`` of what the disk now
serves, every block of [0, delta) read back through ``qemu-nbd`` against the
load's last generations, and for idle runs ``qemu-img compare`` with the
offline commit's result. Every job waits against one deadline (the window);
a job that misses it is cancelled and reported as not converged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import guest_writer
import images
import nbd
from cases import check_summary
from monitor import Event, MonitorClient, MonitorError, event_time
from servers import PLUGIN, QEMU_NBD, REPO, ServerError, ServerProcess, make_server

sys.path.insert(0, str(REPO / "plugin"))
from vdisk_block.catalog import Catalog  # noqa: E402

log = logging.getLogger(__name__)

VDISK, QEMU_COMMIT, QEMU_MIRROR, QEMU_IMG = "vdisk", "qemu-commit", "qemu-mirror", "qemu-img"
DISK = "bench"                      # the vdisk disk and both NBD export names
CLUSTER = 64 << 10
POLL_S = 0.25                       # query-jobs cadence while a job runs (both servers)
LONG_STALL_S = 0.020                # guest stalls listed in --json
# what makes one run fail (reported in its row) rather than the benchmark
RUN_ERRORS = (ServerError, MonitorError, images.ToolError, guest_writer.WriterError, nbd.Error,
              subprocess.TimeoutExpired, OSError)


@dataclass(frozen=True)
class Load:
    name: str
    writer: bool
    rate_mib: float | None = None   # None with a writer: as fast as it goes


@dataclass
class Setup:
    base: Path                      # the prepared base image, copied for every run
    size: int                       # its virtual size
    delta: int                      # bytes of the delta, [0, delta)
    load: Load
    rundir: Path
    window_s: float                 # deadline of a job, from its start
    baseline_s: float               # load alone before the job starts
    qd: int
    seed: int
    reference: Path | None = None   # the offline commit's result, for idle compares


@dataclass
class JobRun:
    """One consolidation: what the job reported and what the guest saw."""

    method: str
    delta: int
    load: str
    converged: bool = False
    copy_set: int = 0               # allocated in the delta (qemu-img map) at job start
    reported_copy_set: int | None = None      # vdisk's copy_set_bytes
    copied: int | None = None       # vdisk bytes_copied; QEMU final progress (offset)
    passes: int | None = None       # vdisk only: QEMU does not report passes
    ready_s: float | None = None
    total_s: float | None = None
    pause_ms: float | None = None   # vdisk pivot_pause_ms; QEMU job-complete round trip
    stall_ms: float | None = None         # longest guest stall overlapping the pivot
    ready_stall_ms: float | None = None   # ... overlapping the ready event
    guest_before: dict[str, float] = field(default_factory=dict)
    guest_during: dict[str, float] = field(default_factory=dict)
    progress: list[tuple[float, int, int]] = field(default_factory=list)  # (s, done, total)
    events: list[tuple[str, float]] = field(default_factory=list)   # job events, s from start
    # the guest's MiB/s from each event (the command: "start") to the next
    guest_phases: list[tuple[str, float, float]] = field(default_factory=list)
    longest_write: tuple[float, float] = (0.0, 0.0)  # during the job, s from start
    long_stalls: list[tuple[float, float]] = field(default_factory=list)  # ditto, >= 20 ms
    fill_s: float = 0.0
    check: str = ""
    guest_failures: str = ""        # writes the guest saw fail (should never happen)
    note: str = ""
    job: dict[str, Any] = field(default_factory=dict)

    @property
    def copy_ratio(self) -> float | None:
        return None if self.copied is None or not self.copy_set else self.copied / self.copy_set


# --- the load ----------------------------------------------------------------------

# A job function starts the job and waits for its end against the window; it
# returns (start, end, pivot start, pivot end) on the time.time() scale, the
# pivot times 0 when there was no pivot.
JobTimes = tuple[float, float, float, float]


def with_load(setup: Setup, uri: str, run: JobRun,
               job: Callable[[], JobTimes]) -> guest_writer.WriterLog:
    """Run ``job`` alone (idle) or under the load after ``baseline_s`` of load alone;
    fill in what the guest saw."""
    if not setup.load.writer:
        job()
        return guest_writer.WriterLog()
    with guest_writer.WriterProcess(
            uri, setup.delta, setup.rundir / "writer.json", qd=setup.qd, seed=setup.seed,
            rate_mib=setup.load.rate_mib,
            max_seconds=setup.window_s + setup.baseline_s + 60) as writer:
        time.sleep(setup.baseline_s)
        t0, t1, p0, p1 = job()
        record = writer.stop()
    if record.failures:
        first_t, first = record.failures[0]
        run.guest_failures = (f"{len(record.failures)} guest writes failed, the first "
                              f"{first_t - t0:+.3f} s from the job start"
                              + (f" ({first_t - p0:+.3f} s from the pivot)" if p1 else "")
                              + f": {first}")
    b0 = t0 - setup.baseline_s + 0.25
    run.guest_before = record.window(b0, t0) | {"stall_ms": record.stall_ms(b0, t0)}
    run.guest_during = record.window(t0, t1) | {"stall_ms": record.stall_ms(t0, t1)}
    edges = [("start", 0.0), *[(n, t) for n, t in run.events if t0 + t <= t1]]
    run.guest_phases = [(name, round(a, 4), round(record.window(t0 + a, t0 + b)["mib_s"], 1))
                        for (name, a), (_next, b) in zip(edges, edges[1:], strict=False)]
    s, c = record.longest(t0, t1)
    run.longest_write = (s - t0, c - t0) if c else (0.0, 0.0)
    run.long_stalls = [(b - t0, e - t0) for b, e in record.stalls()
                       if e - b >= LONG_STALL_S and b <= t1 and e >= t0]
    if p1 > 0:
        run.stall_ms = record.stall_ms(p0, p1)
    ready = [t for name, t in run.events if name in ("ready", "BLOCK_JOB_READY")]
    if ready:
        run.ready_stall_ms = record.stall_ms(t0 + ready[0], t0 + ready[0])
    return record


# --- checks ------------------------------------------------------------------------


def delta_allocated(image: Path) -> int:
    """Bytes allocated (data or zero) in ``image`` itself, not in its backing chain."""
    entries = json.loads(images.qemu_img("map", "--output=json", "-U", "-f", "qcow2",
                                         str(image)))
    return sum(e["length"] for e in entries if e.get("depth") == 0 and e.get("present", True))


def check_result(image: Path, setup: Setup, record: guest_writer.WriterLog) -> str:
    """qemu-img check, every block of the delta's range, and (idle) compare with the
    offline result; "clean" or the problems."""
    problems = [] if (c := check_summary(image)) == "clean" else [c]
    with make_server(QEMU_NBD, image, setup.rundir / "verify", readonly=True) as srv:
        problems += guest_writer.verify(srv.uri, setup.delta, record.final)
    if not setup.load.writer and setup.reference is not None and setup.reference != image:
        res = subprocess.run([os.environ.get("QEMU_IMG", "qemu-img"), "compare", "-q",
                              "-f", "qcow2", "-F", "qcow2", str(setup.reference), str(image)],
                             capture_output=True, text=True, check=False, timeout=600)
        if res.returncode != 0:
            problems.append(f"differs from the qemu-img commit result: "
                            f"{(res.stdout + res.stderr).strip() or res.returncode}")
    return "clean" if not problems else "; ".join(problems)


def copy_base(src: Path, dst: Path) -> None:
    """Copy the base and make the copy durable, so that no job's flush pays for it."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- vdisk -------------------------------------------------------------------------


def _vdisk_state(event: Event, job_id: int) -> str | None:
    data = event.get("data") or {}
    if event.get("event") == "JOB_STATUS_CHANGE" and data.get("id") == job_id:
        return str(data.get("state"))
    return None


def _vdisk_job(ctl: MonitorClient, setup: Setup, run: JobRun) -> JobTimes:
    """``consolidate`` (pivot true) and wait for done, polling ``query-jobs``."""
    t0 = time.time()
    job_id = ctl.execute("consolidate", {"disk": DISK})["job"]["id"]
    run.job = {"id": job_id}

    def state(e: Event) -> str | None:
        return _vdisk_state(e, job_id)

    try:
        deadline = time.monotonic() + setup.window_s
        end = None
        while end is None and time.monotonic() < deadline:
            end = ctl.wait_event(lambda e: state(e) in ("done", "failed", "cancelled"),
                                 min(deadline, time.monotonic() + POLL_S))
            j = ctl.execute("query-jobs", {"id": job_id})["jobs"][0]
            run.progress.append((time.time() - t0, j["bytes_copied"], j["copy_set_bytes"]))
        if end is None:
            run.note = f"did not converge in {setup.window_s:g} s"
            try:
                ctl.execute("job-cancel", {"id": job_id})
            except MonitorError as e:
                run.note += f"; job-cancel: {e.reason}"
            return t0, time.time(), 0.0, 0.0
        t1 = event_time(end)
        run.total_s = t1 - t0
        run.converged = state(end) == "done"
        ready = ctl.wait_event(lambda e: state(e) == "ready", 0)
        if ready is not None:
            run.ready_s = event_time(ready) - t0
        pivot = ctl.wait_event(lambda e: state(e) == "pivoting", 0)
        p0, p1 = (event_time(pivot), t1) if pivot else (0.0, 0.0)
        return t0, t1, p0, p1
    finally:
        run.events = [(str(state(e)), event_time(e) - t0) for e in ctl.events if state(e)]


def run_vdisk(setup: Setup) -> JobRun:
    run = JobRun(VDISK, setup.delta, setup.load.name)
    d = setup.rundir
    ds = d / "ds"
    catalog = Catalog.init(str(ds))
    try:
        copy_base(setup.base, ds / "images" / "base.qcow2")
        catalog.add_disk(DISK, "images/base.qcow2")
    finally:
        catalog.close()
    nbd_sock, ctl_sock = d / "nbd.sock", d / "control.sock"
    argv = [os.environ.get("NBDKIT", "nbdkit"), "-f", "--exit-with-parent", "-U", str(nbd_sock),
            "python", str(PLUGIN), f"datastore={ds}", f"disk={DISK}", f"control={ctl_sock}"]
    uri = f"nbd+unix:///{DISK}?socket={nbd_sock}"
    with ServerProcess(VDISK, argv, nbd_sock, d / "nbdkit.log", 60), \
            MonitorClient.connect(str(ctl_sock), time.monotonic() + 30, qmp=False) as ctl:
        delta = ds / ctl.execute("snapshot", {"disk": DISK})["top"]
        run.fill_s = guest_writer.fill(uri, setup.delta, setup.qd)
        run.copy_set = delta_allocated(delta)
        record = with_load(setup, uri, run, lambda: _vdisk_job(ctl, setup, run))
        info = ctl.execute("query-jobs", {"id": run.job["id"]})["jobs"][0]
        chain = ctl.execute("query-disk", {"disk": DISK})["chain"]
    run.job = info
    run.reported_copy_set = info["copy_set_bytes"]
    run.copied = info["bytes_copied"]
    run.passes = info["passes"]
    run.pause_ms = info["pivot_pause_ms"] if run.converged else None
    if info["state"] == "failed":
        run.note = f"job failed: {info['error']}"
    problems = []
    if run.converged and (chain != ["images/base.qcow2"] or delta.exists()):
        problems.append(f"after the pivot the chain is {chain}, delta "
                        f"{'still there' if delta.exists() else 'removed'}")
    check = check_result(ds / chain[0], setup, record)
    run.check = "; ".join(problems + ([] if check == "clean" else [check])) or "clean"
    return run
