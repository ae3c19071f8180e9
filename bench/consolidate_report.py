"""Tables and targets of the consolidation benchmark (a report: nothing is asserted)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from consolidators import QEMU_COMMIT, QEMU_IMG, VDISK, JobRun

PAUSE_TARGET_MS = 50.0
IDLE_RATIO_TARGET = 2.0
STRESS_RATIO = 2.0


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


def render_main(runs: list[JobRun], window: float) -> str:
    head = ["delta", "load", "method", "runs", "ready s", "total s", "copied/set",
            "passes", "guest MiB/s alone->job", "pause ms", "pivot stall ms", "check"]
    rows = [head]
    for (delta, load, method), cell in group(runs).items():
        before = _median(r.guest_before.get("mib_s") for r in cell)
        during = _median(r.guest_during.get("mib_s") for r in cell)
        passes = sorted({r.passes for r in cell if r.passes is not None})
        checks = sorted({r.check for r in cell})
        rows.append([
            human(delta), load, method, str(len(cell)),
            _time(cell, "ready_s", window), _time(cell, "total_s", window),
            _num(_max(r.copy_ratio for r in cell), "{:.2f}x"),
            ",".join(map(str, passes)) or "-",
            "-" if before is None else f"{before:.0f} -> {during:.0f}",
            _num(_max(r.pause_ms for r in cell), "{:.1f}"),
            _num(_max(r.stall_ms for r in cell), "{:.1f}"),
            "clean" if checks == ["clean"] and not any(r.guest_failures for r in cell)
            else "PROBLEM",
        ])
    return _table(rows, 3)


def _p99_max(cell: list[JobRun], attr: str) -> str:
    p99 = _median(getattr(r, attr).get("p99_ms") for r in cell)
    mx = _max(getattr(r, attr).get("max_ms") for r in cell)
    stall = _max(getattr(r, attr).get("stall_ms") for r in cell)
    return f"{_num(p99, '{:.1f}')} / {_num(mx, '{:.1f}')} / {_num(stall, '{:.1f}')}"


def render_latency(runs: list[JobRun]) -> str:
    head = ["delta", "load", "method", "alone p99/max/stall ms", "job p99/max/stall ms",
            "ready ms", "pivot ms"]
    rows = [head]
    for (delta, load, method), cell in group(runs).items():
        if not any(r.guest_before for r in cell):
            continue
        rows.append([human(delta), load, method, _p99_max(cell, "guest_before"),
                     _p99_max(cell, "guest_during"),
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
