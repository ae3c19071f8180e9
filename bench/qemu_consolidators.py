"""QEMU's ways of collapsing the consolidation benchmark's delta (see consolidators.py).

- ``qemu-commit``: active commit, QEMU's mirror in background copy mode:
  guest writes go to the top and mark a dirty bitmap, the job copies dirty
  regions again until none is left.
- ``qemu-mirror``: ``blockdev-mirror`` with ``copy-mode=write-blocking``
  (QEMU's single pass, the peer of vdisk's job): ``sync=top`` from the top
  into a new image over the same base, added with ``blockdev-add``; a guest
  write is written to the target too before it completes, and waits only
  for a copy in flight that overlaps it. After ``job-complete`` the export
  serves the new image.
- ``qemu-img``: offline ``qemu-img commit -d`` (no load: the idle reference).

Both live methods run in ``qemu-storage-daemon`` with the same chain (qcow2
top over its qcow2 base), an NBD export of the top and QMP on a Unix socket;
the job is waited for with ``BLOCK_JOB_READY``, ``job-complete`` and
``BLOCK_JOB_COMPLETED``, polling ``query-jobs`` meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import guest_writer
import images
from consolidators import (
    CLUSTER,
    DISK,
    POLL_S,
    QEMU_COMMIT,
    QEMU_IMG,
    QEMU_MIRROR,
    JobRun,
    JobTimes,
    Setup,
    check_result,
    copy_base,
    delta_allocated,
    with_load,
)
from monitor import Event, MonitorClient, event_time
from servers import QEMU_NBD, ServerProcess, make_server

JOB = "job0"


def _qsd_argv(base: Path, top: Path, nbd_sock: Path, qmp_sock: Path) -> list[str]:
    return [os.environ.get("QEMU_STORAGE_DAEMON", "qemu-storage-daemon"),
            "--blockdev", f"driver=file,node-name=base-file,filename={base}",
            "--blockdev", "driver=qcow2,node-name=base,file=base-file",
            "--blockdev", f"driver=file,node-name=top-file,filename={top}",
            "--blockdev", "driver=qcow2,node-name=top,file=top-file,backing=base",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--export", f"type=nbd,id=exp0,node-name=top,name={DISK},writable=on",
            "--chardev", f"socket,id=qmp0,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=qmp0"]


def _qmp_name(event: Event) -> str:
    status = (event.get("data") or {}).get("status")
    return f"{event['event']}/{status}" if status else str(event["event"])


def _is(*names: str) -> Callable[[Event], bool]:
    return lambda e: e.get("event") in names


def _chain(setup: Setup) -> tuple[Path, Path]:
    base, top = setup.rundir / "base.qcow2", setup.rundir / "top.qcow2"
    copy_base(setup.base, base)
    images.create_qcow2(top, setup.size, CLUSTER, backing=base.name)
    return base, top


def _qmp_wait(qmp: MonitorClient, run: JobRun, match: Callable[[Event], bool], t0: float,
              deadline: float) -> Event | None:
    """Wait for an event, polling ``query-jobs`` (the job's progress) meanwhile."""
    while time.monotonic() < deadline:
        ev = qmp.wait_event(match, min(deadline, time.monotonic() + POLL_S))
        if ev is not None:
            return ev
        for j in qmp.execute("query-jobs"):
            if j["id"] == JOB:
                run.progress.append((time.time() - t0, j["current-progress"],
                                     j["total-progress"]))
    return None


def _qemu_job(qmp: MonitorClient, setup: Setup, run: JobRun, command: str,
              args: dict[str, Any]) -> JobTimes:
    """The job command, ready, ``job-complete``, completed (or cancelled at the window)."""
    t0 = time.time()
    qmp.execute(command, {"job-id": JOB, **args})
    try:
        deadline = time.monotonic() + setup.window_s
        ready = _qmp_wait(qmp, run, _is("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                                        "BLOCK_JOB_CANCELLED"), t0, deadline)
        end, p0 = ready, 0.0
        if ready is not None and ready["event"] == "BLOCK_JOB_READY":
            run.ready_s = event_time(ready) - t0
            p0 = time.time()
            qmp.execute("job-complete", {"id": JOB})
            run.pause_ms = 1000 * (time.time() - p0)
            end = _qmp_wait(qmp, run, _is("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), t0,
                            deadline)
        if end is None:
            run.note = (f"did not converge in {setup.window_s:g} s"
                        + (" (ready, not completed)" if run.ready_s is not None else ""))
            for j in qmp.execute("query-jobs"):
                if j["id"] == JOB:
                    run.copied, run.job = j["current-progress"], j
                    qmp.execute("job-cancel", {"id": JOB})
                    if _qmp_wait(qmp, run, _is("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"),
                                 t0, time.monotonic() + 30) is None:
                        run.note += "; cancel did not finish in 30 s"
            return t0, time.time(), 0.0, 0.0
        t1 = event_time(end)
        run.job = dict(end["data"])
        run.copied = end["data"].get("offset")
        run.converged = end["event"] == "BLOCK_JOB_COMPLETED" and "error" not in end["data"]
        if not run.converged:
            run.note = f"job ended: {end['event']} {end['data'].get('error', '')}".strip()
        run.total_s = t1 - t0
        return t0, t1, p0, (t1 if p0 else 0.0)
    finally:
        run.events = [(_qmp_name(e), event_time(e) - t0) for e in qmp.events
                      if event_time(e) >= t0]


def _run_qsd(setup: Setup, method: str, job: Callable[[MonitorClient, JobRun], JobTimes],
             result: Callable[[Path, Path], Path],
             prepare: Callable[[MonitorClient, Path], None] | None = None) -> JobRun:
    """Serve the chain from qemu-storage-daemon, fill the delta, ``prepare(qmp, base)``,
    run ``job`` under the load, check ``result(base, top)`` (what the disk serves once
    the job converged)."""
    run = JobRun(method, setup.delta, setup.load.name)
    d = setup.rundir
    base, top = _chain(setup)
    nbd_sock, qmp_sock = d / "nbd.sock", d / "qmp.sock"
    uri = f"nbd+unix:///{DISK}?socket={nbd_sock}"
    with ServerProcess("qemu-storage-daemon", _qsd_argv(base, top, nbd_sock, qmp_sock),
                       nbd_sock, d / "qsd.log", 60), \
            MonitorClient.connect(str(qmp_sock), time.monotonic() + 30, qmp=True) as qmp:
        run.fill_s = guest_writer.fill(uri, setup.delta, setup.qd)
        run.copy_set = delta_allocated(top)
        if prepare is not None:
            prepare(qmp, base)
        record = with_load(setup, uri, run, lambda: job(qmp, run))
    run.check = check_result(result(base, top) if run.converged else top, setup, record)
    return run


def run_qemu_commit(setup: Setup) -> JobRun:
    """Active commit of the top into the base (``block-commit`` of the active layer)."""
    return _run_qsd(setup, QEMU_COMMIT,
                    lambda qmp, run: _qemu_job(qmp, setup, run, "block-commit",
                                               {"device": "top"}),
                    lambda base, _top: base)


def run_qemu_mirror(setup: Setup) -> JobRun:
    """``blockdev-mirror`` in write-blocking mode from the top into a new image over
    the base (created and added before the load starts)."""
    new = setup.rundir / "new.qcow2"

    def prepare(qmp: MonitorClient, base: Path) -> None:
        images.create_qcow2(new, setup.size, CLUSTER, backing=base.name)
        qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "new", "backing": "base",
                                     "file": {"driver": "file", "filename": str(new)}})

    return _run_qsd(setup, QEMU_MIRROR,
                    lambda qmp, run: _qemu_job(qmp, setup, run, "blockdev-mirror",
                                               {"device": "top", "target": "new",
                                                "sync": "top", "copy-mode": "write-blocking"}),
                    lambda _base, _top: new, prepare)


def run_offline_commit(setup: Setup) -> tuple[JobRun, Path]:
    """``qemu-img commit -d`` of a filled chain; returns the run and the committed base."""
    run = JobRun(QEMU_IMG, setup.delta, setup.load.name)
    base, top = _chain(setup)
    with make_server(QEMU_NBD, top, setup.rundir / "fill", readonly=False) as srv:
        run.fill_s = guest_writer.fill(srv.uri, setup.delta, setup.qd)
    run.copy_set = delta_allocated(top)
    t0 = time.perf_counter()
    images.qemu_img("commit", "-q", "-d", "-f", "qcow2", str(top))
    run.total_s = run.ready_s = time.perf_counter() - t0
    run.copied = run.copy_set           # one pass over the allocated clusters, by design
    run.converged = True
    run.check = check_result(base, setup, guest_writer.WriterLog())
    return run, base
