"""Block-driver benchmark: the vdisk nbdkit plugin against qemu-nbd and nbdkit's
file plugin, side by side, in one run, on the same images.

    .venv/bin/python bench/nbd_bench.py [--quick] [--repeat N] [--json FILE]

Prints the median of N repetitions per server, the ratio vdisk/peer and
PASS/MISS against the project's targets (a report, never an assertion: the
exit code is 0 unless the benchmark itself could not run). See bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time
from pathlib import Path

import images
import memstate
import profiling
import workloads
from bench_cli import (
    apply_quick_defaults,
    comma_list,
    environment,
    run_main,
    scratch_dir,
    setup_logging,
    write_json,
)
from cases import WORKLOADS, Case, build_cases
from report import CaseResult, Cell, render_costs, render_problems, render_table
from servers import (
    ALL_SERVERS,
    VDISK,
    ServerError,
    make_server,
    process_cpu_seconds,
    project_server_available,
)

log = logging.getLogger("nbd_bench")

MiB = images.MiB
UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size_arg(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in UNITS:
        return int(float(t[:-1]) * UNITS[t[-1]])
    return int(t)


class PageCache:
    """Puts the page cache in the same state before every measurement.

    ``cold``: sync and drop caches (needs root). ``warm``: sync and read every
    file the server will touch. ``auto``: cold if dropping works, else warm.
    Then ``memory`` (if given) puts free memory in its stated state.
    """

    def __init__(self, mode: str, memory: memstate.MemoryState | None = None) -> None:
        self.mode = mode
        self.memory = memory
        if mode in ("auto", "cold"):
            try:
                self._drop()
                self.mode = "cold"
            except OSError as e:
                if mode == "cold":
                    raise SystemExit(f"cannot drop the page cache: {e}") from e
                log.warning("cannot drop the page cache (%s); warming it for every server", e)
                self.mode = "warm"

    @staticmethod
    def _drop() -> None:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")

    def prepare(self, files: list[Path]) -> None:
        if self.mode == "cold":
            self._drop()
        else:
            os.sync()
            for path in files:
                with open(path, "rb") as f:
                    while f.read(8 * MiB):
                        pass
        if self.memory is not None:
            self.memory.prepare()


def measure_once(case: Case, server: str, rep: int, sdir: Path, args: argparse.Namespace,
                 cache: PageCache, profile: Path | None = None) -> tuple[float, float, float]:
    """Start a fresh server, run the workload once; return (value, startup s, server CPU s)."""
    sdir.mkdir(parents=True, exist_ok=True)
    image = case.image(server, sdir)
    cache.prepare(case.cache_files(server, image))
    with make_server(server, image, sdir, readonly=case.readonly,
                     project_owner=not args.own_vdisk_owner) as srv:
        log.debug("%s serving %s as pid %d", server, image, srv.pid)
        cpu0 = process_cpu_seconds(srv.pid)
        if profile is None:
            value = case.measure(srv.uri, rep)
        else:
            binary = profiling.find_py_spy()
            if binary is None:
                raise ServerError(server, "py-spy not found (pip install py-spy)")
            with profiling.PySpy(binary, srv.pid, profile):
                value = case.measure(srv.uri, rep)
        cpu = process_cpu_seconds(srv.pid) - cpu0
    if case.verify is not None:
        check = case.verify(image, rep)
        if check != "clean":
            raise images.ToolError(["verify", str(image)], 1, check)
    return value, srv.startup_s, cpu


def run_case(case: Case, servers: list[str], args: argparse.Namespace, cache: PageCache,
             rundir: Path) -> CaseResult:
    res = CaseResult(case.key, case.title, case.unit, case.target, note=case.note)
    order = [s for s in ALL_SERVERS if s in servers and s in case.servers]
    for s in order:
        res.cells[s] = Cell()
    reps = args.repeat * case.repeat_factor
    for rep in range(reps):
        rotated = order[rep % len(order):] + order[:rep % len(order)]  # spread order effects
        for server in rotated:
            cell = res.cells[server]
            if cell.errors:
                continue  # one failure is enough; do not wait out more timeouts
            try:
                value, startup, cpu = measure_once(case, server, rep,
                                                   rundir / f"{case.key}-{server}", args, cache)
            except (ServerError, workloads.ClientError, images.ToolError,
                    subprocess.TimeoutExpired) as e:
                log.error("%s / %s: %s", case.title, server, e)
                cell.errors.append(str(e))
                continue
            cell.samples.append(value)
            cell.startup_s.append(startup)
            cell.cpu_s.append(cpu)
            if case.verify is not None:
                cell.checks.append("clean")  # a failed check raises above
            log.info("%-28s %-11s rep %d: %.1f %s", case.title, server, rep + 1, value,
                     case.unit)
    if args.check_reads and case.readonly and VDISK in res.cells and not res.cells[VDISK].errors:
        res.read_check = check_vdisk_reads(case, rundir / f"{case.key}-{VDISK}", args)
        if res.read_check != "identical":
            res.cells[VDISK].errors.append(f"qemu-img compare against the image: "
                                           f"{res.read_check}")
    if args.profile and VDISK in res.cells and not res.cells[VDISK].errors:
        # One extra, unmeasured run under the profiler so it cannot skew the samples.
        raw = args.profile / f"{case.key}.vdisk.txt"
        try:
            value, _, _ = measure_once(case, VDISK, reps, rundir / f"{case.key}-{VDISK}",
                                       args, cache, profile=raw)
            res.profile = {"file": str(raw), "value": value,
                           "summary": profiling.summarize(raw) if raw.exists() else ""}
            log.info("profiled %s on vdisk: %.1f %s -> %s", case.title, value, case.unit, raw)
        except (ServerError, workloads.ClientError, images.ToolError,
                subprocess.TimeoutExpired) as e:
            log.error("profiling %s: %s", case.title, e)
    return res


def check_vdisk_reads(case: Case, sdir: Path, args: argparse.Namespace) -> str:
    """Serve the image once more and let QEMU compare the export with the image."""
    image = case.image(VDISK, sdir)
    try:
        with make_server(VDISK, image, sdir, readonly=True,
                         project_owner=not args.own_vdisk_owner) as srv:
            return images.compare_export(srv.uri, image)
    except (ServerError, subprocess.TimeoutExpired) as e:
        return str(e)


def tool_versions() -> dict[str, str]:
    versions = {}
    for tool, flag in (("nbdkit", "--version"), ("qemu-nbd", "--version"),
                       ("nbdcopy", "--version")):
        try:
            out = subprocess.run([tool, flag], capture_output=True, text=True,
                                 timeout=10, check=False)
            versions[tool] = out.stdout.splitlines()[0] if out.stdout else ""
        except (OSError, subprocess.TimeoutExpired):
            versions[tool] = "missing"
    return versions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Sizes take k/M/G suffixes. See bench/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, about a minute (explicit size flags still win)")
    p.add_argument("--repeat", type=int,
                   help="repetitions per server and workload (default 5, quick 3)")
    p.add_argument("--json", type=Path, help="write every sample and median to this file")
    p.add_argument("--workdir", type=Path,
                   help="parent of the scratch directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto",
                   help="page cache before each measurement: dropped (cold), or pre-read (warm); "
                        "auto = cold if possible (default)")
    memstate.add_option(p, "as-is")
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help="comma list (default: all of %(default)s)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma list (default: all of %(default)s)")
    p.add_argument("--own-vdisk-owner", action="store_true",
                   help="start vdisk with bench/servers.py even if vdisk.nbdkit is installed")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the measured runs, run vdisk once more per workload under "
                        "py-spy; write raw stacks to DIR and print a summary")
    p.add_argument("--no-check-reads", dest="check_reads", action="store_false",
                   help="skip the qemu-img compare of each vdisk read export (not timed)")
    p.add_argument("--seed", type=int, default=20240601,
                   help="for data, chain layouts and random offsets")
    p.add_argument("--cluster-size", type=size_arg, default=64 << 10, help="default 64k")
    p.add_argument("--image-size", type=size_arg, help="single image (default 1G, quick 256M)")
    p.add_argument("--chain-size", type=size_arg, help="chain images (default 512M, quick 128M)")
    p.add_argument("--chain-depths", default="1,4,16", help="default %(default)s")
    p.add_argument("--rand-seconds", type=float, help="per random run (default 4, quick 1.5)")
    p.add_argument("--write-size", type=size_arg, help="per write run (default 256M, quick 64M)")
    p.add_argument("--write-request", type=size_arg, default=1 << 20,
                   help="overwrite request (default 1M)")
    p.add_argument("--alloc-request", type=size_arg, default=64 << 10,
                   help="allocating-write request (default 64k)")
    p.add_argument("--write-qd", type=int, default=16, help="writes in flight (default 16)")
    p.add_argument("--sparse-size", type=size_arg, default=4 << 30, help="default 4G")
    p.add_argument("--sparse-allocated", type=size_arg, default=64 << 20, help="default 64M")
    p.add_argument("--nbdcopy-requests", type=int, default=16, help="default 16")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    apply_quick_defaults(args, {
        "image_size": (1 << 30, 256 * MiB), "chain_size": (512 * MiB, 128 * MiB),
        "rand_seconds": (4.0, 1.5), "write_size": (256 * MiB, 64 * MiB),
        "repeat": (5, 3)})
    args.servers = comma_list(p, args.servers, ALL_SERVERS, "server")
    args.workloads = comma_list(p, args.workloads, WORKLOADS, "workload")
    args.chain_depths = [int(d) for d in args.chain_depths.split(",") if d]
    if "alloc" in args.workloads and args.write_size > args.image_size:
        p.error("--write-size must not exceed --image-size (the overlay's virtual size)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with scratch_dir(args.workdir, "vdisk-bench-", args.keep) as workdir:
        imgdir = workdir / "images"
        imgdir.mkdir(exist_ok=True)
        cases = build_cases(args, imgdir)
        memory = memstate.MemoryState(args.memory, workdir / "ballast", args.write_size)
        cache = PageCache(args.cache, memory)
        log.info("page cache: %s, memory %s; vdisk started by %s", cache.mode, args.memory,
                 "vdisk.nbdkit.NbdkitServer" if project_server_available()
                 and not args.own_vdisk_owner else "bench/servers.py")
        results = [run_case(c, args.servers, args, cache, workdir / "runs") for c in cases]
    elapsed = time.perf_counter() - t0
    print()
    print(f"vdisk block-driver benchmark: median of {args.repeat} runs (sparse read: "
          f"{3 * args.repeat}) ± half the min-max range; page cache {cache.mode} and memory "
          f"{args.memory} before every run; {os.cpu_count()} CPUs; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; {elapsed:.0f} s total")
    print(render_table(results, args.servers))
    print()
    print(render_costs(results, args.servers))
    problems = render_problems(results)
    if problems:
        print("\nproblems:\n" + problems)
    for res in results:
        if res.profile:
            print(f"\nvdisk profile, {res.title} ({res.profile['value']:.1f} {res.unit}, "
                  f"{res.profile['file']}):\n{res.profile['summary']}")
    if args.json:
        env = environment(elapsed, load_before, lead={"page_cache": cache.mode,
                                                      "memory": args.memory},
                          middle={"tools": tool_versions()})
        write_json(args.json, args, env, results=[r.to_json() for r in results])
    return 0


if __name__ == "__main__":
    run_main(main, "servers")
