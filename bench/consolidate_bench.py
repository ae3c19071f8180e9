"""Consolidation benchmark: vdisk's online consolidation (mirror job) against QEMU's
write-blocking mirror, QEMU's active commit and offline qemu-img commit, side by
side, in one run, on the same chain under the same write load.

    .venv/bin/python bench/consolidate_bench.py [--quick] [--repeat N] [--json FILE]

Prints a table per delta size and load, the guest's write latencies, and PASS/MISS
against the project's targets (a report, never an assertion: the exit code is 0
unless the benchmark itself could not run). See bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import images
from bench_cli import (
    apply_quick_defaults,
    comma_list,
    environment,
    run_main,
    scratch_dir,
    setup_logging,
    write_json,
)
from consolidate_report import (
    human,
    render_latency,
    render_main,
    render_problems,
    render_targets,
)
from consolidators import (
    QEMU_COMMIT,
    QEMU_MIRROR,
    RUN_ERRORS,
    VDISK,
    JobRun,
    Load,
    Setup,
    run_vdisk,
)
from nbd_bench import size_arg
from qemu_consolidators import run_offline_commit, run_qemu_commit, run_qemu_mirror

log = logging.getLogger("consolidate_bench")

MiB = images.MiB
LOADS = ("idle", "moderate", "fast")
METHODS = (VDISK, QEMU_MIRROR, QEMU_COMMIT)
RUNNERS = {VDISK: run_vdisk, QEMU_MIRROR: run_qemu_mirror, QEMU_COMMIT: run_qemu_commit}
NOTES = """
qemu-mirror: blockdev-mirror sync=top copy-mode=write-blocking into a new image over the
  base (QEMU's single pass); qemu-commit: active commit (QEMU's background-mode mirror).
ready/total: median s from sending the job command to the ready / done event (n/c: did not
  converge in the window; qemu-img: the whole command). copied/set: max over runs of vdisk
  bytes_copied, or QEMU's final job progress (its work: the active commit re-copies what
  the guest dirties; the mirror counts the guest's writes it mirrors too), over the bytes
  allocated in the delta. passes: vdisk's count; QEMU reports none.
guest MiB/s: the load alone before the job (its --baseline s but the first 0.25 s) -> while
  the job ran (medians); job/alone: median of the runs' ratios.
pause: max over runs of vdisk's pivot_pause_ms; for QEMU the job-complete QMP round trip
  (an approximation: QEMU drains and switches after replying). stall: the longest
  interval in which guest writes were outstanding and none completed that overlaps the
  pivot (vdisk: pivoting..done events; QEMU: job-complete..BLOCK_JOB_COMPLETED), max.
Images are in the page cache (just written); each job's flushes write only its own data."""


def build_base(path: Path, size: int, data: int, seed: int) -> None:
    """A qcow2 of ``size`` bytes whose first ``data`` bytes hold non-zero data."""
    raw = path.with_suffix(".raw")
    images.write_raw(raw, data, seed)
    images.qcow2_from_raw(raw, path, 64 << 10)
    raw.unlink()
    if size > data:
        images.qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size))


def one_run(method: str, setup: Setup) -> JobRun:
    """Run one job; a failure of the benchmark machinery becomes a PROBLEM row."""
    setup.rundir.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        run = RUNNERS[method](setup)
    except RUN_ERRORS as e:
        log.error("%s / %s / %s: %s", human(setup.delta), setup.load.name, method, e)
        run = JobRun(method, setup.delta, setup.load.name, check=f"ERROR {e}")
    finally:
        shutil.rmtree(setup.rundir, ignore_errors=True)
    log.info("%-8s %-8s %-11s ready %s total %s copied/set %s pause %s stall %s  %s  (%.0f s)",
             human(setup.delta), setup.load.name, method,
             _f(run.ready_s), _f(run.total_s), _f(run.copy_ratio), _f(run.pause_ms),
             _f(run.stall_ms), run.note or ("PROBLEM" if run.guest_failures else run.check),
             time.perf_counter() - t0)
    return run


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def run_all(args: argparse.Namespace, workdir: Path) -> list[JobRun]:
    base = workdir / "base.qcow2"
    t0 = time.perf_counter()
    build_base(base, args.base_size, args.base_data, args.seed)
    log.info("built the base (%s virtual, %s data) in %.1f s", human(args.base_size),
             human(args.base_data), time.perf_counter() - t0)
    loads = {"idle": Load("idle", False), "moderate": Load("moderate", True, args.rate),
             "fast": Load("fast", True, None)}
    runs: list[JobRun] = []
    n = 0

    def setup(delta: int, load: str, reference: Path | None) -> Setup:
        nonlocal n
        n += 1
        return Setup(base=base, size=args.base_size, delta=delta, load=loads[load],
                     rundir=workdir / f"run{n:03d}", window_s=args.window,
                     baseline_s=args.baseline, qd=args.qd, seed=args.seed + n,
                     reference=reference)

    for delta in args.deltas:
        ref_dir = workdir / f"reference-{delta}"
        reference: Path | None = None
        for rep in range(args.peer_repeat):
            s = setup(delta, "idle", None)
            s.rundir = ref_dir if rep == 0 else s.rundir
            s.rundir.mkdir(parents=True)
            try:
                run, committed = run_offline_commit(s)
                reference = reference or committed
            except RUN_ERRORS as e:
                log.error("%s / qemu-img commit: %s", human(delta), e)
                run = JobRun("qemu-img", delta, "idle", check=f"ERROR {e}")
            if rep:
                shutil.rmtree(s.rundir, ignore_errors=True)
            log.info("%-8s %-8s %-11s total %s  %s", human(delta), "idle", "qemu-img",
                     _f(run.total_s), run.check)
            runs.append(run)
        for load in args.loads:
            for rep in range(max(args.repeat, args.peer_repeat)):
                order = [m for m in args.methods
                         if rep < (args.repeat if m == VDISK else args.peer_repeat)]
                if not order:
                    continue
                order = order[rep % len(order):] + order[:rep % len(order)]
                for method in order:
                    runs.append(one_run(method, setup(delta, load, reference)))
        shutil.rmtree(ref_dir, ignore_errors=True)
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Sizes take k/M/G suffixes. See bench/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="smaller deltas, fewer repeats, shorter window (under 2 minutes)")
    p.add_argument("--deltas", help="comma list of delta sizes (default 64M,1G; quick 64M,256M)")
    p.add_argument("--base-size", type=size_arg, help="virtual size (default 2G, quick 1G)")
    p.add_argument("--base-data", type=size_arg,
                   help="allocated at the start of the base (default: the largest delta)")
    p.add_argument("--loads", default=",".join(LOADS), help="default %(default)s")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="live methods (default %(default)s); qemu-img commit always runs")
    p.add_argument("--repeat", type=int, help="vdisk runs per delta and load (default 8, "
                   "quick 2): the pause target wants the max of several")
    p.add_argument("--peer-repeat", type=int,
                   help="QEMU and qemu-img runs per delta and load (default 3, quick 1)")
    p.add_argument("--window", type=float,
                   help="deadline of one job in s (default 30, quick 10)")
    p.add_argument("--baseline", type=float,
                   help="s of load alone before each job (default 2, quick 1)")
    p.add_argument("--rate", type=float, default=20.0, help="moderate load, MiB/s (default 20)")
    p.add_argument("--qd", type=int, default=8, help="writes in flight (default 8)")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--json", type=Path, help="write every run's figures to this file")
    p.add_argument("--workdir", type=Path, help="parent of the scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    apply_quick_defaults(args, {
        "deltas": ("64M,1G", "64M,256M"), "base_size": (2 << 30, 1 << 30),
        "repeat": (8, 2), "peer_repeat": (3, 1), "window": (30.0, 10.0),
        "baseline": (2.0, 1.0)})
    args.deltas = [size_arg(d) for d in args.deltas.split(",") if d]
    args.loads = comma_list(p, args.loads, LOADS, "load")
    args.methods = comma_list(p, args.methods, METHODS, "method")
    if args.base_data is None:
        args.base_data = max(args.deltas)
    for d in args.deltas:
        if d % (1 << 20) or d > args.base_size:
            p.error(f"delta {d}: must be whole MiB and fit in --base-size")
    if args.base_data > args.base_size:
        p.error("--base-data must not exceed --base-size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with scratch_dir(args.workdir, "vdisk-consolidate-", args.keep) as workdir:
        runs = run_all(args, workdir)
    elapsed = time.perf_counter() - t0
    print()
    print(f"vdisk consolidation benchmark: base {human(args.base_size)} virtual "
          f"({human(args.base_data)} data), delta [0, size) filled then collapsed into the "
          f"base; loads: moderate = {args.rate:g} MiB/s, fast = as fast as it goes, both "
          f"64 KiB random writes at QD{args.qd} over the delta's range; vdisk {args.repeat} "
          f"runs, peers {args.peer_repeat} per cell; window {args.window:g} s; page cache "
          f"warm; {os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {elapsed:.0f} s total")
    print(render_main(runs, args.window))
    print(NOTES)
    latency = render_latency(runs)
    if latency.count("\n") > 1:
        print("\nguest write latency, load alone (before the job) vs during the job: p50 and "
              "p99 (medians of\nthe runs'), max (of all runs); the longest stall during the "
              "job, and overlapping the ready\nevent and the pivot (max of runs). A stall: "
              "writes outstanding and none completing.")
        print(latency)
    print("\ntargets (reported, not asserted):")
    print(render_targets(runs, args.deltas, args.loads, args.window))
    problems = render_problems(runs)
    if problems:
        print("\nproblems and notes:\n" + problems)
    if args.json:
        write_json(args.json, args, environment(elapsed, load_before),
                   runs=[asdict(r) for r in runs])
    return 0


if __name__ == "__main__":
    run_main(main, "processes")
