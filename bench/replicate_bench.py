"""Replication benchmark: ``vdisk replicate`` of linked clones that share one base,
disk after disk into an empty datastore, side by side with the naive ways
(``qemu-img convert`` flattening each disk; ``cp`` of each full chain) and with
``cp --sparse=always`` of exactly the files vdisk moves, in one run.

    .venv/bin/python bench/replicate_bench.py [--quick] [--runs N] [--json FILE]

Prints bytes moved and the median time per contender, the ratio of each time to
the cp reference, and PASS/MISS against the targets (a report, never an
assertion: the exit code is 0 unless the benchmark itself could not run). See
bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import pstats
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import images
import memstate
from bench_cli import (
    apply_quick_defaults,
    comma_list,
    environment,
    run_main,
    scratch_dir,
    setup_logging,
    write_json,
)
from nbd_bench import PageCache, size_arg
from replicate_contenders import (
    CONTENDERS,
    CONVERT,
    CP_CHAINS,
    CP_REFERENCE,
    DESCRIPTION,
    RUN_ERRORS,
    VDISK,
    VDISK_ONE,
    VDISKS,
    Run,
    Source,
    allocated,
    build_source,
    bytecode_cache,
    measure,
    remove,
    vdisk_command,
)

log = logging.getLogger("replicate_bench")

MiB = images.MiB
GiB = 1 << 30
TIME_TARGET = 1.2               # vdisk time <= 1.2x the cp reference
METADATA_CLUSTERS = 4           # per copied image, see bytes_verdict()
CLUSTER = 64 << 10              # vdisk's default cluster size
NOTES = """
moved: vdisk: the sum of bytes_moved in its JSON (every copied image, metadata included;
  not the empty new top each target disk gets); others: allocated bytes (st_blocks * 512)
  of the files they wrote. target du: allocated bytes of everything in the target after
  the run (vdisk: + its catalog and the new tops).
time: median wall-clock s of the whole contender (one process per disk, or per file for
  cp chains), ending with an fsync of every file and directory in the target (vdisk
  fsyncs its copies itself; cp and qemu-img convert leave dirty pages otherwise).
  before fsync: the same up to that final fsync. x cp-ref: time / the cp reference's.
check: qemu-img compare of the last disk on the target with its source top (run 1).
vdisk runs with Python's bytecode cache (in the scratch directory, filled by an untimed
  warm-up replicate), as an installed vdisk has it."""


def run_all(args: argparse.Namespace, workdir: Path, cache: PageCache) -> tuple[Source,
                                                                               list[Run]]:
    t0 = time.perf_counter()
    source = build_source(workdir, args.disks, args.base_size, args.top_size, args.seed)
    log.info("built the source: base %s, %d disks with %s each, in %.1f s",
             _mib(args.base_size), args.disks, _mib(args.top_size), time.perf_counter() - t0)
    cache.memory = memstate.MemoryState(args.memory, workdir / "ballast",
                                        sum(allocated(f) for f in source.files()))
    runs: list[Run] = []
    order = list(args.contenders)
    for rep in range(args.runs):
        rotated = order[rep % len(order):] + order[:rep % len(order)]
        for contender in rotated:
            target = workdir / "target"
            remove(target)
            cache.prepare(source.files())
            run = measure(contender, source, target, check=rep == 0)
            remove(target)
            runs.append(run)
            log.info("run %d %-16s %7.2f s (%.2f before fsync)  moved %s  %s", rep + 1,
                     contender, run.seconds, run.unsynced_s, _mib(run.bytes_moved),
                     run.error or run.check or "")
    return source, runs


def profile_vdisk(source: Source, workdir: Path, outdir: Path, cache: PageCache) -> str:
    """One more, unmeasured vdisk pass with every ``vdisk replicate`` under cProfile
    (``outdir/vmN.prof``); the summary of the first disk (copies the base) and the
    last (links to it)."""
    outdir.mkdir(parents=True, exist_ok=True)
    target = workdir / "target"
    remove(target)
    cache.prepare(source.files())
    script = vdisk_command()[0]
    lines = []
    try:
        for i, disk in enumerate(source.disks):
            prof = outdir / f"{disk.name}.prof"
            t = time.perf_counter()
            images.run([sys.executable, "-m", "cProfile", "-o", str(prof), script,
                        "replicate", disk.name, "-d", str(source.datastore), "--to",
                        str(target), "--json"])
            wall = time.perf_counter() - t
            if i in (0, len(source.disks) - 1):
                lines.append(f"{disk.name} ({wall:.2f} s under cProfile, {prof}):")
                lines.append(_top_functions(prof))
    except RUN_ERRORS as e:
        lines.append(f"profiling failed: {e}")
    finally:
        remove(target)
    return "\n".join(lines)


def _top_functions(prof: Path, n: int = 14) -> str:
    stats = pstats.Stats(str(prof))
    rows = sorted(stats.stats.items(),             # type: ignore[attr-defined]
                  key=lambda kv: kv[1][3], reverse=True)
    out = [f"  {'cum s':>7} {'own s':>7} {'calls':>7}  function"]
    for (file, line, name), (_cc, calls, own, cum, _callers) in rows[:n]:
        where = "/".join(Path(file).parts[-2:]) if file != "~" else ""
        out.append(f"  {cum:7.3f} {own:7.3f} {calls:7d}  {name} {where}:{line}")
    return "\n".join(out)


# -- report ------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f} MiB"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run], contenders: list[str]) -> dict[str, dict[str, object]]:
    """Per contender: medians over the runs that did not fail, and every sample."""
    out: dict[str, dict[str, object]] = {}
    for c in contenders:
        ok = [r for r in runs if r.contender == c and r.error is None]
        secs = [r.seconds for r in ok]
        med = _median(secs)
        out[c] = {
            "runs": len(ok),
            "errors": [r.error for r in runs if r.contender == c and r.error],
            "seconds": med,
            "spread_pct": (50.0 * (max(secs) - min(secs)) / med) if med and len(secs) > 1
            else None,
            "unsynced_s": _median([r.unsynced_s for r in ok]),
            "samples_s": secs,
            "bytes_moved": max((r.bytes_moved for r in ok), default=None),
            "target_allocated": max((r.target_allocated for r in ok), default=None),
            "check": next((r.check for r in runs if r.contender == c and r.check), None),
        }
    ref = out.get(CP_REFERENCE, {}).get("seconds")
    for s in out.values():
        s["ratio_to_cp_reference"] = (s["seconds"] / ref  # type: ignore[operator]
                                      if ref and s["seconds"] is not None else None)
    return out


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def render_main(summary: dict[str, dict[str, object]]) -> str:
    rows = [["contender", "runs", "moved", "target du", "time s", "before fsync s",
             "x cp-ref", "check"]]
    for c, s in summary.items():
        med, spread = s["seconds"], s["spread_pct"]
        ratio = s["ratio_to_cp_reference"]
        rows.append([
            DESCRIPTION[c], str(s["runs"]),
            "-" if s["bytes_moved"] is None else _mib(s["bytes_moved"]),  # type: ignore[arg-type]
            "-" if s["target_allocated"] is None else _mib(s["target_allocated"]),  # type: ignore[arg-type]
            "ERR" if med is None else f"{med:.2f}" + (f" ±{spread:.0f}%" if spread else ""),
            "-" if s["unsynced_s"] is None else f"{s['unsynced_s']:.2f}",
            "-" if ratio is None else f"{ratio:.2f}x",
            str(s["check"] or "-"),
        ])
    return _table(rows)


def bytes_verdict(moved: int | None, expected: int, copied_images: int) -> tuple[str, int]:
    """vdisk moved the base once and the tops, nothing else: its bytes equal the source
    files' allocated bytes up to metadata. Data clusters move one for one; the header,
    L1 table, refcount table and refcount blocks of a copy are laid out afresh (the source
    may have grown an extra refcount block, or left a hole in its file), so allow
    METADATA_CLUSTERS clusters per copied image either way. Copying the base a second
    time would exceed that by the base's size."""
    tolerance = METADATA_CLUSTERS * CLUSTER * copied_images
    if moved is None:
        return "n/a ", tolerance
    return ("PASS" if abs(moved - expected) <= tolerance else "MISS"), tolerance


def render_targets(summary: dict[str, dict[str, object]], expected: dict[str, int],
                   disks: int) -> tuple[str, dict[str, object]]:
    lines = []
    results: dict[str, object] = {}
    for name in VDISKS:
        vd = summary.get(name)
        if vd is None:
            continue
        what = DESCRIPTION[name]
        want = expected["base"] + expected["tops"]
        moved = vd["bytes_moved"]
        verdict, tol = bytes_verdict(moved, want, disks + 1)  # type: ignore[arg-type]
        diff = "-" if moved is None else f"{moved - want:+,d} B"  # type: ignore[operator]
        lines.append(f"{what}: bytes moved == base once + tops ({_mib(want)} allocated in "
                     f"the source files; tolerance ±{tol // 1024:,d} KiB = "
                     f"{METADATA_CLUSTERS} clusters per copied image): {diff}  {verdict}")
        ratio = vd["ratio_to_cp_reference"]
        tverdict = "n/a " if ratio is None else ("PASS" if ratio <= TIME_TARGET else "MISS")  # type: ignore[operator]
        lines.append(f"{what}: time <= {TIME_TARGET}x cp --sparse=always of the same files: "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'}  {tverdict}")
        result: dict[str, object] = {
            "bytes": {"moved": moved, "expected": want, "tolerance": tol, "result": verdict},
            "time": {"ratio": ratio, "target": TIME_TARGET, "result": tverdict}}
        ref = summary.get(CP_REFERENCE)
        if ref and ref["unsynced_s"] and vd["seconds"] is not None:
            plain = vd["seconds"] / ref["unsynced_s"]  # type: ignore[operator]
            lines.append(f"  (for information: against cp without its final fsync, as a "
                         f"user would type it: {plain:.2f}x)")
            result["time"]["ratio_to_unsynced_cp"] = plain  # type: ignore[index]
        results[name] = result
    if not lines:
        return "vdisk did not run", results
    return "\n".join(lines), results


def render_vdisk_split(runs: list[Run]) -> str:
    """Where vdisk's time goes: the first disk (copies the base) and the others, and
    the share inside replicate() (its duration_s) vs process start, imports, CLI."""
    vd = [r for r in runs if r.contender == VDISK and r.error is None and r.per_disk_s]
    if not vd:
        return ""
    first = _median([r.per_disk_s[0] for r in vd])
    rest = _median([statistics.median(r.per_disk_s[1:]) for r in vd if len(r.per_disk_s) > 1])
    inside = _median([r.detail["inside_replicate_s"] for r in vd])
    total = _median([r.unsynced_s for r in vd])
    first_in = _median([r.detail["disks"][0]["duration_s"] for r in vd])
    text = (f"vdisk split (medians): first disk {first:.2f} s ({first_in:.2f} inside "
            f"replicate()), each later disk {rest if rest is not None else 0:.3f} s; "
            f"inside replicate() {inside:.2f} of {total:.2f} s, the rest is process start, "
            f"imports and the CLI")
    return text


def tool_versions() -> dict[str, str]:
    versions = {}
    for name, cmd in (("vdisk", [*vdisk_command(), "--version"]),
                      ("qemu-img", [os.environ.get("QEMU_IMG", "qemu-img"), "--version"]),
                      ("cp", [os.environ.get("CP", "cp"), "--version"])):
        try:
            versions[name] = images.run(cmd).splitlines()[0]
        except (images.ToolError, OSError, IndexError) as e:
            versions[name] = f"unknown ({e})"
    return versions


def check_space(args: argparse.Namespace, workdir: Path) -> None:
    """Refuse to start when the scratch filesystem cannot hold the source and the
    largest target (a flattened copy or a full chain per disk)."""
    source = args.base_size + args.disks * args.top_size
    largest = {VDISK: source, VDISK_ONE: source, CP_REFERENCE: source,
               CONVERT: args.disks * (args.base_size + args.top_size),
               CP_CHAINS: args.disks * (args.base_size + args.top_size)}
    ballast = source if args.memory == "primed" else 0
    need = int(1.05 * (source + ballast + max(largest[c] for c in args.contenders))) + GiB
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"{workdir}: {free / GiB:.1f} GiB free, the run needs about "
                         f"{need / GiB:.1f} GiB (scale down with --disks/--base-size)")
    log.info("scratch: %s, peak about %.1f GiB of %.1f GiB free", workdir, need / GiB,
             free / GiB)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Sizes take k/M/G suffixes. See bench/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="3 disks, 256M base, 16M tops, 2 runs (explicit flags still win)")
    p.add_argument("--disks", type=int, help="linked clones (default 10, quick 3)")
    p.add_argument("--base-size", type=size_arg,
                   help="the shared base, all of it non-zero data (default 2G, quick 256M)")
    p.add_argument("--top-size", type=size_arg,
                   help="data allocated in each disk's top (default 100M, quick 16M)")
    p.add_argument("--runs", type=int, help="runs per contender (default 3, quick 2)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma list (default: all of %(default)s)")
    p.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto",
                   help="before each run: drop the page cache (cold, needs root) or read "
                        "the source files (warm); auto = cold if possible (default)")
    memstate.add_option(p, "settled")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the measured runs, replicate once more with every vdisk "
                        "process under cProfile (DIR/vmN.prof) and print a summary")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--json", type=Path, help="write every run's figures to this file")
    p.add_argument("--workdir", type=Path, help="parent of the scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    apply_quick_defaults(args, {"disks": (10, 3), "base_size": (2 * GiB, 256 * MiB),
                                "top_size": (100 * MiB, 16 * MiB), "runs": (3, 2)})
    args.contenders = comma_list(p, args.contenders, CONTENDERS, "contender")
    if args.disks < 1 or args.runs < 1:
        p.error("--disks and --runs must be at least 1")
    if args.base_size % CLUSTER or args.top_size > args.base_size:
        p.error("--base-size must be whole 64 KiB clusters and at least --top-size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cache = PageCache(args.cache)
    profile = ""
    with scratch_dir(args.workdir, "vdisk-replicate-", args.keep) as workdir:
        check_space(args, workdir)
        with bytecode_cache(workdir / "pycache") as bytecode_env:
            try:
                source, runs = run_all(args, workdir, cache)
            except RUN_ERRORS as e:
                log.error("the benchmark could not run: %s", e)
                return 1
            expected = source.allocated()
            if args.profile and VDISK in args.contenders:
                profile = profile_vdisk(source, workdir, args.profile, cache)
    elapsed = time.perf_counter() - t0
    summary = summarize(runs, args.contenders)
    print()
    print(f"vdisk replication benchmark: {args.disks} disks, each a top with "
          f"{_mib(args.top_size)} of data on one {_mib(args.base_size)} base (all data), "
          f"replicated one after another into an empty directory; median of {args.runs} "
          f"runs ± half the min-max range; page cache {cache.mode} and memory {args.memory} "
          f"before every run; "
          f"{os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {elapsed:.0f} s total")
    print(f"source files (allocated): base {_mib(expected['base'])}, tops "
          f"{_mib(expected['tops'])} ({_mib(expected['top_min'])}..{_mib(expected['top_max'])} "
          f"each)")
    print(render_main(summary))
    print(NOTES)
    split = render_vdisk_split(runs)
    if split:
        print("\n" + split)
    targets, verdicts = render_targets(summary, expected, args.disks)
    print("\ntargets (reported, not asserted):\n" + targets)
    problems = [f"{r.contender}: {r.error}" for r in runs if r.error]
    problems += [f"{c}: check {s['check']}" for c, s in summary.items()
                 if s["check"] not in (None, "identical")]
    if problems:
        print("\nproblems:\n" + "\n".join(dict.fromkeys(problems)))
    if profile:
        print("\nvdisk under cProfile (cumulative s, top functions):\n" + profile)
    if args.json:
        env = environment(elapsed, load_before, lead={"page_cache": cache.mode,
                                                      "memory": args.memory},
                          middle={"tools": tool_versions(),
                                  "bytecode_cache_env_before": bytecode_env})
        write_json(args.json, args, env, source={**expected, "files": len(source.files())},
                   summary=summary, targets=verdicts, runs=[asdict(r) for r in runs])
    return 0


if __name__ == "__main__":
    run_main(main, "nothing left running")
