"""Tables and targets of the consolidation benchmark (a report: nothing is asserted)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from consolidators import QEMU_COMMIT, QEMU_IMG, QEMU_MIRROR, VDISK, JobRun

PAUSE_TARGET_MS = 50.0
IDLE_RATIO_TARGET = 2.0
STRESS_RATIO = 2.0
MODERATE_P99_MS = 3.0          # guest writes during a vdisk job at the moderate load
MODERATE_MAX_MS = 10.0
FAST_THROUGHPUT = 0.7          # guest throughput during a vdisk job / alone, fast load


def human(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / (1 << 20):g} MiB"


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _max(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _time(runs: list[JobRun], attr: str, window: float) -> str:
    """Median over converged runs; '>N' when none converged, a count when some did not."""
    done = [r for r in runs if r.converged]
    missed = len(runs) - len(done)
    if not done:
        return f">{window:g} (n/c)"
    text = _num(_median(getattr(r, attr) for r in done))
    return text + (f" ({missed} n/c)" if missed else "")


def group(runs: list[JobRun]) -> dict[tuple[int, str, str], list[JobRun]]:
    cells: dict[tuple[int, str, str], list[JobRun]] = {}
    for r in runs:
        cells.setdefault((r.delta, r.load, r.method), []).append(r)
    return cells


def _table(rows: list[list[str]], left: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < left or i == len(row) - 1 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def throughput_ratio(r: JobRun) -> float | None:
    """The guest's MiB/s during the job over its MiB/s with the load alone."""
    alone, during = r.guest_before.get("mib_s"), r.guest_during.get("mib_s")
    return None if not alone or during is None else during / alone


def render_main(runs: list[JobRun], window: float) -> str:
    head = ["delta", "load", "method", "runs", "ready s", "total s", "copied/set",
            "passes", "guest MiB/s alone->job", "job/alone", "pause ms", "pivot stall ms",
            "check"]
    rows = [head]
    for (delta, load, method), cell in group(runs).items():
        before = _median(r.guest_before.get("mib_s") for r in cell)
        during = _median(r.guest_during.get("mib_s") for r in cell)
        ratio = _median(throughput_ratio(r) for r in cell)
        passes = sorted({r.passes for r in cell if r.passes is not None})
        checks = sorted({r.check for r in cell})
        rows.append([
            human(delta), load, method, str(len(cell)),
            _time(cell, "ready_s", window), _time(cell, "total_s", window),
            _num(_max(r.copy_ratio for r in cell), "{:.2f}x"),
            ",".join(map(str, passes)) or "-",
            "-" if before is None else f"{before:.0f} -> {during:.0f}",
            _num(ratio, "{:.2f}x"),
            _num(_max(r.pause_ms for r in cell), "{:.1f}"),
            _num(_max(r.stall_ms for r in cell), "{:.1f}"),
            "clean" if checks == ["clean"] and not any(r.guest_failures for r in cell)
            else "PROBLEM",
        ])
    return _table(rows, 3)


def latency(cell: list[JobRun], attr: str) -> tuple[float | None, float | None,
                                                   float | None]:
    """p50 and p99 (medians of the runs') and max (of all runs) of the guest's
    writes, with the load alone (attr guest_before) or during the job."""
    return (_median(getattr(r, attr).get("p50_ms") for r in cell),
            _median(getattr(r, attr).get("p99_ms") for r in cell),
            _max(getattr(r, attr).get("max_ms") for r in cell))


def _latency_text(cell: list[JobRun], attr: str) -> str:
    return " / ".join(_num(v, "{:.1f}") for v in latency(cell, attr))


def render_latency(runs: list[JobRun]) -> str:
    head = ["delta", "load", "method", "alone p50/p99/max ms", "job p50/p99/max ms",
            "job stall ms", "ready ms", "pivot ms"]
    rows = [head]
    for (delta, load, method), cell in group(runs).items():
        if not any(r.guest_before for r in cell):
            continue
        rows.append([human(delta), load, method, _latency_text(cell, "guest_before"),
                     _latency_text(cell, "guest_during"),
                     _num(_max(r.guest_during.get("stall_ms") for r in cell), "{:.1f}"),
                     _num(_max(r.ready_stall_ms for r in cell), "{:.1f}"),
                     _num(_max(r.stall_ms for r in cell), "{:.1f}")])
    return _table(rows, 3)


def _verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def render_targets(runs: list[JobRun], deltas: list[int], loads: list[str],
                   window: float) -> str:
    lines = []
    vd = [r for r in runs if r.method == VDISK]
    for load in loads:
        cell = [r for r in vd if r.load == load]
        if not cell:
            continue
        passes = sorted({r.passes for r in cell if r.passes is not None})
        worst = _max(r.copied / r.reported_copy_set if r.reported_copy_set else None
                     for r in cell if r.copied is not None)
        ok = all(r.passes == 1 and r.copied is not None and r.reported_copy_set is not None
                 and r.copied <= r.reported_copy_set for r in cell)
        lines.append(f"{_verdict(ok)}  vdisk passes == 1 and bytes_copied <= copy_set_bytes, "
                     f"{load} load: {len(cell)} runs, passes {passes}, max bytes_copied/"
                     f"copy_set_bytes {_num(worst, '{:.3f}')}")
    for delta in deltas:
        cell = [r for r in vd if r.delta == delta]
        if not cell:
            continue
        worst = _max(r.pause_ms for r in cell)
        missing = sum(r.pause_ms is None for r in cell)
        ok = None if worst is None else worst < PAUSE_TARGET_MS and not missing
        stall = _max(r.stall_ms for r in cell)
        lines.append(f"{_verdict(ok)}  vdisk pivot pause < {PAUSE_TARGET_MS:g} ms at p99, delta "
                     f"{human(delta)}: max {_num(worst, '{:.1f}')} ms of {len(cell)} runs"
                     + (f" ({missing} without a pivot)" if missing else "")
                     + f"; longest guest stall overlapping a pivot {_num(stall, '{:.1f}')} ms")
    for delta in deltas:
        mine = _median(r.total_s for r in vd if r.delta == delta and r.load == "idle"
                       and r.converged)
        ref = _median(r.total_s for r in runs if r.method == QEMU_IMG and r.delta == delta)
        ratio = None if mine is None or not ref else mine / ref
        lines.append(f"{_verdict(None if ratio is None else ratio <= IDLE_RATIO_TARGET)}  "
                     f"idle vdisk consolidation within {IDLE_RATIO_TARGET:g}x of offline "
                     f"qemu-img commit, delta {human(delta)}: {_num(mine)} s vs "
                     f"{_num(ref)} s = {_num(ratio, '{:.2f}x')}")
    lines += _guest_targets(runs, deltas, loads)
    for delta in deltas:
        qemu = [r for r in runs if r.method == QEMU_COMMIT and r.delta == delta]
        idle = _median(r.total_s for r in qemu if r.load == "idle" and r.converged)
        fast = [r for r in qemu if r.load == "fast"]
        if not fast:
            continue
        missed = [r for r in fast if not r.converged]
        slow = _median(r.total_s for r in fast if r.converged)
        if missed:
            ok, what = True, f"{len(missed)} of {len(fast)} runs did not converge in {window:g} s"
        elif slow is not None and idle:
            ok, what = slow >= STRESS_RATIO * idle, f"{slow:.2f} s vs {idle:.2f} s idle = " \
                f"{slow / idle:.1f}x"
        else:
            ok, what = None, "no idle reference"
        lines.append(f"{_verdict(ok)}  the fast load stresses QEMU's background active commit "
                     f"(>= {STRESS_RATIO:g}x its idle time or no convergence), delta "
                     f"{human(delta)}: {what}")
    return "\n".join(lines)


def _guest_targets(runs: list[JobRun], deltas: list[int], loads: list[str]) -> list[str]:
    """What the guest feels of a vdisk job: latency at the moderate load, throughput
    at the fast one, and p99 against QEMU's write-blocking mirror at every load."""
    lines = []
    cells = group(runs)
    for delta in deltas:
        cell = cells.get((delta, "moderate", VDISK))
        if cell:
            _p50, p99, mx = latency(cell, "guest_during")
            ok = None if p99 is None or mx is None else \
                p99 <= MODERATE_P99_MS and mx <= MODERATE_MAX_MS
            lines.append(f"{_verdict(ok)}  vdisk guest writes during the job at the moderate "
                         f"load: p99 <= {MODERATE_P99_MS:g} ms and max <= {MODERATE_MAX_MS:g} "
                         f"ms, delta {human(delta)}: p99 {_num(p99, '{:.1f}')} ms (median of "
                         f"{len(cell)} runs), max {_num(mx, '{:.1f}')} ms (of all)")
        cell = cells.get((delta, "fast", VDISK))
        if cell:
            ratios = [throughput_ratio(r) for r in cell]
            ratio = _median(ratios)
            ok = None if ratio is None else ratio >= FAST_THROUGHPUT
            lines.append(f"{_verdict(ok)}  vdisk guest throughput during the job at the fast "
                         f"load >= {FAST_THROUGHPUT:g}x alone, delta {human(delta)}: "
                         f"{_num(ratio, '{:.2f}x')} (median; runs "
                         + ", ".join(_num(x, "{:.2f}") for x in ratios) + ")")
        for load in loads:
            mine, peer = cells.get((delta, load, VDISK)), cells.get((delta, load, QEMU_MIRROR))
            if not mine or not peer or load == "idle":
                continue
            a, b = latency(mine, "guest_during")[1], latency(peer, "guest_during")[1]
            ok = None if a is None or b is None else a < b
            lines.append(f"{_verdict(ok)}  vdisk guest write p99 during the job below QEMU's "
                         f"write-blocking mirror's, delta {human(delta)}, {load} load: "
                         f"{_num(a, '{:.1f}')} vs {_num(b, '{:.1f}')} ms")
    return lines


def render_problems(runs: list[JobRun]) -> str:
    lines = []
    for r in runs:
        if r.check != "clean":
            lines.append(f"{human(r.delta)} / {r.load} / {r.method}: {r.check}")
        if r.guest_failures:
            lines.append(f"{human(r.delta)} / {r.load} / {r.method}: {r.guest_failures}")
        if r.note:
            lines.append(f"{human(r.delta)} / {r.load} / {r.method}: note: {r.note}")
        if r.reported_copy_set is not None and r.reported_copy_set != r.copy_set:
            lines.append(f"{human(r.delta)} / {r.load} / {r.method}: copy_set_bytes "
                         f"{r.reported_copy_set} but qemu-img map finds {r.copy_set} "
                         "allocated in the delta")
    return "\n".join(dict.fromkeys(lines))
