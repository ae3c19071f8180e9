"""Workers benchmark: `vdisk serve` (one nbdkit worker per disk) against one
qemu-nbd per disk, one plain nbdkit per disk and one nbdkit for all the disks
(the plugin before workers), side by side in one run, with fio's NBD engine.

    .venv/bin/python bench/serve_bench.py [--quick] [--sections multi,noisy,cost]

1. multi: N = 1, 2, 4, 8 linked clones of one base, every disk at once: 4 KiB
   random reads QD16, then 64 KiB random writes (verified afterwards);
2. noisy: disk A takes 64 KiB writes with a flush after each (QD4) while disk B
   reads 4 KiB at QD1: B alone and with A;
3. cost: 50 disks: seconds until all serve, memory per idle process.

Prints tables, the ratios against qemu-nbd and PASS/MISS against the targets
(a report, never an assertion: exit code 0 unless the benchmark itself could
not run). See bench/README.md, "Workers benchmark".
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time
from pathlib import Path

import clones
import fio
import fleet
import images
import serve_cost
import serve_noisy
import serve_report as rep
from bench_cli import (
    apply_quick_defaults,
    comma_list,
    environment,
    run_main,
    scratch_dir,
    setup_logging,
    write_json,
)
from nbd_bench import size_arg, tool_versions
from replicate_contenders import bytecode_cache

log = logging.getLogger("serve_bench")

MiB = images.MiB
SECTIONS = ("multi", "noisy", "cost")
SHARED_COMMIT = "22b9d0b"     # the last commit whose plugin serves a whole datastore


# -- 1. multi-disk ---------------------------------------------------------------------------


def measure_multi(ds: clones.Datastore, kind: str, n: int, tag: str, args: argparse.Namespace,
                  workdir: Path) -> tuple[dict[str, float], str]:
    """One run of N disks on one kind of server: (figures, post-write check)."""
    tops = ds.pick(n)
    ds.reset(list(tops))
    ds.warm(list(tops))
    wall = args.runtime + args.ramp
    with fleet.serve(kind, ds.dir, tops, workdir / "servers", args.old_plugin,
                     ds.raw) as srv:
        reads = [fio.random_reads(d, srv.uris[d], ds.size, bs=4096, qd=args.read_qd,
                                  runtime=args.runtime, ramp=args.ramp, seed=args.seed + k)
                 for k, d in enumerate(tops)]
        cpu0, t0 = fleet.cpu_seconds(srv.pids), time.perf_counter()
        sched: dict[str, float] = {}
        got = fio.run(reads, workdir, f"{tag}-read", timeout=wall + 60 + 5 * n,
                      during=lambda pid: sample_window(srv.pids, pid, args, sched))
        read_cpu, read_wall = fleet.cpu_seconds(srv.pids) - cpu0, time.perf_counter() - t0
        startup = srv.startup_s
        read_iops = sum(r.read.iops for r in got.values())
        values = {
            "read_iops": read_iops,
            "read_mib_s": sum(r.read.mib_s for r in got.values()),
            "read_min_disk_iops": min(r.read.iops for r in got.values()),
            "read_max_disk_iops": max(r.read.iops for r in got.values()),
            "read_server_cores": read_cpu / read_wall,
            "read_fio_cores": sum(r.cpu_s for r in got.values()) / args.runtime,
            "read_server_us": read_cpu / (read_iops * wall) * 1e6 if read_iops else 0.0,
            "startup_s": startup,
            **sched,
        }
        if kind in fleet.READ_ONLY:
            return values, "-"
        writes = [fio.random_writes(d, srv.uris[d], ds.size, args.write_size, bs=65536,
                                    qd=args.write_qd, seed=args.seed + 100 + k)
                  for k, d in enumerate(tops)]
        cpu0 = fleet.cpu_seconds(srv.pids)
        wrote = fio.run(writes, workdir, f"{tag}-write", timeout=600)
        write_cpu = fleet.cpu_seconds(srv.pids) - cpu0
        fio.run([fio.verify(j) for j in writes], workdir, f"{tag}-verify", timeout=600)
    check = ds.check(list(tops))
    write_s = max(r.write.runtime_s for r in wrote.values())
    values.update({
        "write_iops": sum(r.write.ios for r in wrote.values()) / write_s,
        "write_mib_s": sum(r.write.bytes for r in wrote.values()) / MiB / write_s,
        "write_server_cpu_s": write_cpu,
    })
    return values, check


def sample_window(servers: list[int], fio_pid: int, args: argparse.Namespace,
                  out: dict[str, float]) -> None:
    """Inside the counted part of a read run, how the servers' and fio's threads
    shared the CPUs: cores running, and threads runnable but waiting for a CPU."""
    time.sleep(args.ramp + 0.25 * args.runtime)
    window = 0.5 * args.runtime
    fio_pids = fleet.descendants(fio_pid)
    s0, f0, h0 = fleet.schedstat(servers), fleet.schedstat(fio_pids), fleet.host_cpu()
    time.sleep(window)
    s1, f1, h1 = fleet.schedstat(servers), fleet.schedstat(fio_pids), fleet.host_cpu()
    ours = 0.0
    for who, before, after in (("server", s0, s1), ("fio", f0, f1)):
        run, wait = fleet.sched_delta(before, after)
        out[f"read_{who}_running"] = run / window
        out[f"read_{who}_waiting"] = wait / window
        ours += run
    for k in ("idle", "steal"):
        out[f"read_host_{k}"] = (h1[k] - h0[k]) / window
    out["read_host_others"] = max(0.0, (h1["busy"] - h0["busy"] - ours) / window)


def run_multi(ds: clones.Datastore, args: argparse.Namespace, workdir: Path) -> rep.Figures:
    fig = rep.Figures()
    for n in args.disks:
        for r in range(args.repeat):
            for kind in fleet.rotated(args.servers, r + n):
                if fig.failed(str(n), kind):
                    continue
                try:
                    values, check = measure_multi(ds, kind, n, f"n{n}-{kind}-{r}", args,
                                                  workdir / "multi")
                except fleet.RUN_ERRORS as e:
                    log.error("multi N=%d / %s: %s", n, kind, e)
                    fig.error(str(n), kind, str(e))
                    continue
                fig.add(str(n), kind, values)
                fig.check(str(n), kind, check)
                log.info("N=%d %-12s rep %d: read %8.0f IOPS, write %6.0f MiB/s, check %s",
                         n, kind, r + 1, values["read_iops"], values.get("write_mib_s", 0.0),
                         check)
    return fig




# -- the run ----------------------------------------------------------------------------------


def wait_quiet(threshold: float, patience: float) -> tuple[float, float]:
    """Wait (up to ``patience`` s) until the 1-minute load average is at most
    ``threshold``; returns (load average then, seconds waited)."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > threshold and time.monotonic() - t0 < patience:
        log.info("load average %.2f > %.2f: waiting (%.0f s of %.0f)", os.getloadavg()[0],
                 threshold, time.monotonic() - t0, patience)
        time.sleep(min(15.0, max(1.0, patience - (time.monotonic() - t0))))
    return os.getloadavg()[0], time.monotonic() - t0


def old_plugin(commit: str, workdir: Path) -> Path | None:
    """``git archive`` of the commit's plugin/ into the scratch directory."""
    repo = Path(__file__).resolve().parent.parent
    dest = workdir / f"plugin-{commit}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "plugin"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        log.warning("no plugin of commit %s (%s): server 'shared' skipped", commit,
                    archive.stderr.decode(errors="replace").strip())
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "plugin" / "vdisk_nbdkit.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Sizes take k/M/G suffixes. See bench/README.md.")
    p.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    p.add_argument("--sections", default=",".join(SECTIONS), help="default %(default)s")
    p.add_argument("--servers", default=",".join(fleet.SERVERS),
                   help="comma list (default %(default)s)")
    p.add_argument("--disks", help="N values of the multi-disk section (default 1,2,4,8; "
                   "quick 1,2)")
    p.add_argument("--repeat", type=int, help="runs per cell (default 3, quick 1)")
    p.add_argument("--base-size", type=size_arg, help="virtual size, all data (default 1G, "
                   "quick 128M)")
    p.add_argument("--runtime", type=float, help="seconds per read run (default 5, quick 1)")
    p.add_argument("--noisy-runtime", type=float,
                   help="seconds per noisy-neighbour run (default 8, quick 2)")
    p.add_argument("--noisy-fsync", type=int, default=1, metavar="N",
                   help="the noisy neighbour flushes after every N writes (0: never; "
                        "default %(default)s)")
    p.add_argument("--ramp", type=float, help="uncounted seconds before each timed run "
                   "(default 1, quick 0.5)")
    p.add_argument("--write-size", type=size_arg,
                   help="bytes written per disk (default 128M, quick 16M)")
    p.add_argument("--read-qd", type=int, default=16, help="default %(default)s")
    p.add_argument("--write-qd", type=int, default=16, help="default %(default)s")
    p.add_argument("--cost-disks", type=int, help="disks of the cost section (default 50, "
                   "quick 8)")
    p.add_argument("--idle", type=float, default=2.0,
                   help="seconds the cost section lets the servers idle before reading "
                        "their memory (default %(default)s)")
    p.add_argument("--shared-commit", default=SHARED_COMMIT,
                   help="commit whose plugin serves a whole datastore, for server 'shared' "
                        "(default %(default)s)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                   help="first wait until the 1-minute load average is at most LOAD")
    p.add_argument("--patience", type=float, default=1800.0,
                   help="the most seconds --wait-quiet waits (default %(default)s)")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--json", type=Path, help="write every sample and median to this file")
    p.add_argument("--workdir", type=Path, help="parent of the scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    apply_quick_defaults(args, {
        "disks": ("1,2,4,8", "1,2"), "repeat": (3, 1), "base_size": (1 << 30, 128 * MiB),
        "runtime": (5.0, 1.0), "noisy_runtime": (8.0, 2.0), "ramp": (1.0, 0.5),
        "write_size": (128 * MiB, 16 * MiB), "cost_disks": (50, 8)})
    args.sections = comma_list(p, args.sections, SECTIONS, "section")
    args.servers = comma_list(p, args.servers, fleet.SERVERS, "server")
    args.disks = [int(x) for x in args.disks.split(",") if x]
    if args.write_size > args.base_size:
        p.error("--write-size must not exceed --base-size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    fio.require()
    quiet = wait_quiet(args.wait_quiet, args.patience) if args.wait_quiet is not None else None
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    figs: dict[str, rep.Figures] = {}
    targets: list[tuple[str, str]] = []
    texts: list[str] = []
    with scratch_dir(args.workdir, "vdisk-serve-bench-", args.keep) as workdir, \
            bytecode_cache(workdir / "pycache") as pyenv:
        args.old_plugin = old_plugin(args.shared_commit, workdir) \
            if fleet.SHARED in args.servers else None
        if args.old_plugin is None and fleet.SHARED in args.servers:
            args.servers.remove(fleet.SHARED)
        if {"multi", "noisy"} & set(args.sections):
            t = time.perf_counter()
            ds = clones.build(workdir / "ds", max([*args.disks, 2]), args.base_size, args.seed)
            if fleet.PY_FLOOR in args.servers and "multi" in args.sections:
                ds.make_raw()
            log.info("built %d clones of a %d MiB base in %.1f s", len(ds.tops),
                     args.base_size // MiB, time.perf_counter() - t)
        for section in args.sections:
            load = os.getloadavg()[0]
            t = time.perf_counter()
            if section == "multi":
                fig = run_multi(ds, args, workdir)
                texts.append(multi_header(args) + "\n"
                             + rep.render_multi(fig, args.disks, args.servers, args.read_qd,
                                                args.write_qd)
                             + "\n\n" + rep.render_multi_cpu(fig, args.disks, args.servers))
                if 4 in args.disks:
                    targets.append(rep.multi_target(fig))
            elif section == "noisy":
                fig = serve_noisy.run(ds, args, workdir)
                texts.append(serve_noisy.header(args) + "\n"
                             + rep.render_noisy(fig, args.servers))
                targets.append(rep.noisy_target(fig))
            else:
                fig, kinds = serve_cost.run(args, workdir / "cost")
                texts.append(serve_cost.header(args) + "\n"
                             + rep.render_cost(fig, kinds, args.cost_disks))
                targets.append(rep.cost_target(fig, args.cost_disks))
            texts[-1] += f"\n({section}: {time.perf_counter() - t:.0f} s, load average " \
                         f"{load:.2f} before, {os.getloadavg()[0]:.2f} after)"
            figs[section] = fig
    elapsed = time.perf_counter() - t0
    versions = {**tool_versions(), "fio": fio.version()}
    print()
    print(f"vdisk workers benchmark: {os.cpu_count()} CPUs; load average {load_before[0]:.2f} "
          f"before, {os.getloadavg()[0]:.2f} after"
          + (f" (waited {quiet[1]:.0f} s for <= {args.wait_quiet:g})" if quiet else "")
          + f"; {elapsed:.0f} s total; " + ", ".join(versions.values()))
    for text in texts:
        print("\n" + text)
    print("\ntargets (reported, not asserted):\n" + rep.render_targets(targets))
    problems = [f"{section}: {line}" for section, fig in figs.items() for line in fig.problems()]
    if problems:
        print("\nproblems:\n" + "\n".join(problems))
    if args.json:
        env = environment(elapsed, load_before, middle={"tools": versions, "pyenv": pyenv})
        args.old_plugin = str(args.old_plugin)
        write_json(args.json, args, env, targets=targets,
                   **{section: fig.to_json() for section, fig in figs.items()})
    return 0


def multi_header(args: argparse.Namespace) -> str:
    return (f"multi-disk: N linked clones of one {args.base_size // MiB} MiB base (all data), "
            f"every disk at once, one fio job per disk (ioengine=nbd); 4 KiB random reads "
            f"QD{args.read_qd} for {args.runtime:g} s after {args.ramp:g} s; 64 KiB random "
            f"writes QD{args.write_qd}, {args.write_size // MiB} MiB per disk into its empty "
            f"top (each block once, flush at the end; verified with crc32c afterwards); page "
            f"cache warm; median of {args.repeat} ± half the min-max range")




if __name__ == "__main__":
    run_main(main, "servers")
