"""The workers benchmark's cost section: what serving many disks takes.

For ``--cost-disks`` linked clones (default 50) of a small base: the seconds
from starting the server(s) until every disk serves (``vdisk serve``: until its
JSON line; the peers: until every socket accepts a connection, all started at
once), the memory of every process after ``--idle`` seconds of idling
(VmRSS and RssAnon from /proc/PID/status, Pss from /proc/PID/smaps_rollup),
the supervisor's, and the seconds a SIGTERM takes to stop them all.

``vdisk serve`` runs twice per repetition: as installed (Python's bytecode
cache in use) and with the cache off (``PYTHONDONTWRITEBYTECODE`` and an empty
``PYTHONPYCACHEPREFIX``: every worker compiles the engine as it starts), the
state of a shell that sets ``PYTHONDONTWRITEBYTECODE``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import clones
import fleet
import images
import serve_report as rep
from servers import ServerError

log = logging.getLogger(__name__)

NO_PYC = "vdisk-serve, no .pyc"


def header(args: argparse.Namespace) -> str:
    return (f"cost: {args.cost_disks} linked clones of one base; ready = from the start "
            f"until every disk serves (vdisk serve: its JSON line; the others: every "
            f"socket accepts, all started at once); memory per process after {args.idle:g} s "
            f"idle; stop = SIGTERM until all exited; median of {args.repeat} ± half the "
            f"min-max range")


@contextmanager
def no_bytecode_cache(empty: Path) -> Iterator[None]:
    """Every process started inside compiles its modules afresh."""
    saved = {k: os.environ.get(k) for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    empty.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    os.environ["PYTHONPYCACHEPREFIX"] = str(empty)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _idle(pids: list[int], supervisor: int | None, seconds: float) -> dict[str, float]:
    """Sleep ``seconds``; the CPU the servers (and the supervisor) used meanwhile, in
    percent of one core."""
    both = [*pids, *([supervisor] if supervisor else [])]
    cpu0, sup0, t0 = fleet.cpu_seconds(both), fleet.cpu_seconds([supervisor or 0]), \
        time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t0
    out = {"idle_cpu_pct": 100 * (fleet.cpu_seconds(both) - cpu0) / wall}
    if supervisor:
        out["supervisor_idle_cpu_pct"] = 100 * (fleet.cpu_seconds([supervisor]) - sup0) / wall
    return out


def _memory(pids: list[int]) -> dict[str, float]:
    mems = [fleet.memory_kib(pid) for pid in pids]
    rss = [m.get("VmRSS", 0) for m in mems]
    return {"rss_kib": sorted(rss)[len(rss) // 2],
            "rss_min_kib": min(rss), "rss_max_kib": max(rss),
            "anon_kib": sorted(m.get("RssAnon", 0) for m in mems)[len(mems) // 2],
            "pss_kib": sorted(m.get("Pss", 0) for m in mems)[len(mems) // 2],
            "total_rss_kib": sum(rss), "total_pss_kib": sum(m.get("Pss", 0) for m in mems),
            "processes": len(pids)}


def measure(kind: str, ds: clones.Datastore, args: argparse.Namespace,
            workdir: Path) -> dict[str, float]:
    """Start ``kind`` on every disk, time it until all serve, idle, read memory, stop."""
    tops = ds.pick(args.cost_disks)
    if kind in (fleet.VDISK_SERVE, NO_PYC):
        srv = fleet.VdiskServe(ds.dir, workdir / "run", workdir / "serve.log")
        with srv:
            workers = srv.workers()
            bad = [str(w["disk"]) for w in workers if w["state"] != "running"]
            if bad:
                raise ServerError(kind, f"not running: {', '.join(bad)}")
            assert srv.pid is not None
            pids = [int(str(w["pid"])) for w in workers]
            values = _idle(pids, srv.pid, args.idle)
            values.update(_memory(pids))
            values["supervisor_rss_kib"] = fleet.memory_kib(srv.pid)["VmRSS"]
            values["total_pss_kib"] += fleet.memory_kib(srv.pid).get("Pss", 0)
            values["ready_s"] = srv.ready_s
            t0 = time.perf_counter()
        values["stop_s"] = time.perf_counter() - t0
        return values
    stop: list[float] = []
    with fleet.serve(kind, ds.dir, tops, workdir / kind, args.old_plugin) as served:
        values = _idle(served.pids, None, args.idle)
        values.update(_memory(served.pids))
        values["ready_s"] = served.startup_s
        stop.append(time.perf_counter())
    values["stop_s"] = time.perf_counter() - stop[0]
    return values


def run(args: argparse.Namespace, workdir: Path) -> tuple[rep.Figures, list[str]]:
    """Build the datastore, then every kind ``--repeat`` times, in rotated order."""
    t = time.perf_counter()
    ds = clones.build(workdir / "ds", args.cost_disks, 64 * images.MiB, args.seed, fill=False)
    log.info("built %d clones in %.1f s", args.cost_disks, time.perf_counter() - t)
    kinds = [k for k in fleet.SERVERS if k in args.servers and k not in fleet.READ_ONLY]
    if fleet.VDISK_SERVE in kinds:
        kinds.insert(1, NO_PYC)
        # untimed: fill the bytecode cache the measured runs use
        with fleet.VdiskServe(ds.dir, workdir / "run", workdir / "serve.log"):
            pass
    fig = rep.Figures()
    for r in range(args.repeat):
        for kind in fleet.rotated(kinds, r):
            if fig.failed("cost", kind):
                continue
            try:
                if kind == NO_PYC:
                    with no_bytecode_cache(workdir / f"empty-pycache-{r}"):
                        values = measure(kind, ds, args, workdir)
                else:
                    values = measure(kind, ds, args, workdir)
            except fleet.RUN_ERRORS as e:
                log.error("cost / %s: %s", kind, e)
                fig.error("cost", kind, str(e))
                continue
            fig.add("cost", kind, values)
            log.info("cost %-22s rep %d: ready %.2f s, %.1f MiB VmRSS per process, stop %.2f s",
                     kind, r + 1, values["ready_s"], values["rss_kib"] / 1024,
                     values["stop_s"])
    return fig, kinds
