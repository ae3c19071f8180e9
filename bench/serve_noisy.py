"""The workers benchmark's noisy-neighbour section (serve_bench.py).

Disk A takes 64 KiB random writes at QD4 with a flush after every
``--noisy-fsync`` writes while disk B reads 4 KiB at QD1: B alone, then B with
A, on the same fresh servers; B's IOPS and latency percentiles, A's rate and
its server's CPU per write, and how long B's server waited for a CPU.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import clones
import fio
import fleet
import serve_report as rep

log = logging.getLogger(__name__)


def header(args: argparse.Namespace) -> str:
    return (f"noisy neighbour: disk B 4 KiB random reads QD1 for {args.noisy_runtime:g} s "
            f"alone, then with disk A taking 64 KiB random writes QD4, a flush after every "
            f"{args.noisy_fsync} (fsync={args.noisy_fsync}); total latency percentiles; "
            f"median of {args.repeat}")


def measure(ds: clones.Datastore, kind: str, tag: str, args: argparse.Namespace,
                  workdir: Path) -> tuple[dict[str, float], str]:
    tops = ds.pick(2)
    a, b = list(tops)
    ds.reset([a, b])
    ds.warm([a, b])
    wall = args.noisy_runtime + args.ramp
    with fleet.serve(kind, ds.dir, tops, workdir / "servers", args.old_plugin) as srv:
        reader = fio.random_reads("B", srv.uris[b], ds.size, bs=4096, qd=1,
                                  runtime=args.noisy_runtime, ramp=args.ramp, seed=args.seed)
        writer = fio.timed_writes("A", srv.uris[a], ds.size, bs=65536, qd=4,
                                  runtime=args.noisy_runtime, ramp=args.ramp,
                                  seed=args.seed + 1, fsync=args.noisy_fsync)
        sched: dict[str, float] = {}
        alone = fio.run([reader], workdir, f"{tag}-alone", timeout=wall + 60,
                        during=lambda _: sample_noisy(srv, a, b, args, "alone", sched))["B"].read
        both = fio.run([writer, reader], workdir, f"{tag}-with", timeout=wall + 60,
                       during=lambda _: sample_noisy(srv, a, b, args, "with", sched))
    check = ds.check([a])
    with_b, with_a = both["B"].read, both["A"].write
    out = {"alone_iops": alone.iops, "with_iops": with_b.iops,
           "a_iops": with_a.iops, "a_mib_s": with_a.mib_s,
           "a_p99": with_a.lat_us.get("99", 0.0),
           "iops_ratio": with_b.iops / alone.iops if alone.iops else 0.0}
    for p in fio.PERCENTILES:
        out[f"alone_p{p}"] = alone.lat_us.get(p, 0.0)
        out[f"with_p{p}"] = with_b.lat_us.get(p, 0.0)
    out["p99_ratio"] = out["with_p99"] / out["alone_p99"] if out["alone_p99"] else 0.0
    out.update(sched)
    if with_a.ios and "with_a_cpu_s" in sched:
        out["a_server_us"] = sched["with_a_cpu_s"] / (with_a.iops * sched["window_s"]) * 1e6
    return out, check


def sample_noisy(srv: fleet.Served, a: str, b: str, args: argparse.Namespace, phase: str,
                 out: dict[str, float]) -> None:
    """Inside the counted part of a noisy run: how long B's server waited for a CPU
    (threads runnable but not running, on average), and A's server CPU (when A's
    disk has its own process)."""
    time.sleep(args.ramp + 0.25 * args.noisy_runtime)
    window = 0.5 * args.noisy_runtime
    pa, pb = srv.by_disk[a], srv.by_disk[b]
    s0, c0 = fleet.schedstat([pb]), fleet.cpu_seconds([pa])
    time.sleep(window)
    s1, c1 = fleet.schedstat([pb]), fleet.cpu_seconds([pa])
    run, wait = fleet.sched_delta(s0, s1)
    out[f"{phase}_b_server_waiting"] = wait / window
    out[f"{phase}_b_server_running"] = run / window
    if phase == "with" and pa != pb:
        out["with_a_cpu_s"], out["window_s"] = c1 - c0, window


def run(ds: clones.Datastore, args: argparse.Namespace, workdir: Path) -> rep.Figures:
    fig = rep.Figures()
    for r in range(args.repeat):
        for kind in fleet.rotated([s for s in args.servers if s not in fleet.READ_ONLY], r):
            if fig.failed("noisy", kind):
                continue
            try:
                values, check = measure(ds, kind, f"noisy-{kind}-{r}", args,
                                              workdir / "noisy")
            except fleet.RUN_ERRORS as e:
                log.error("noisy / %s: %s", kind, e)
                fig.error("noisy", kind, str(e))
                continue
            fig.add("noisy", kind, values)
            fig.check("noisy", kind, check)
            log.info("noisy %-12s rep %d: B p99 %.0f -> %.0f us, IOPS %.0f -> %.0f; A %.0f "
                     "writes/s; check %s", kind, r + 1, values["alone_p99"],
                     values["with_p99"], values["alone_iops"], values["with_iops"],
                     values["a_iops"], check)
    return fig
