"""Results of a benchmark run: medians, ratios against the peers, targets, table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from servers import ALL_SERVERS, NBDKIT_FILE, PY_FLOOR, QEMU_NBD, VDISK

SHORT = {VDISK: "vdisk", QEMU_NBD: "qemu-nbd", NBDKIT_FILE: "file(raw)", PY_FLOOR: "py-floor"}


@dataclass
class Target:
    """vdisk must reach ``ratio`` times ``peer`` on this workload."""

    peer: str
    ratio: float

    def describe(self) -> str:
        return f">={self.ratio:.1f}x {SHORT[self.peer]}"


@dataclass
class Cell:
    """All repetitions of one workload on one server."""

    samples: list[float] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # one "clean" per verified write run

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def spread_pct(self) -> float | None:
        """Half the min-max range, in percent of the median."""
        med = self.median
        if not med or len(self.samples) < 2:
            return None
        return 50.0 * (max(self.samples) - min(self.samples)) / med


@dataclass
class CaseResult:
    key: str
    title: str
    unit: str
    target: Target | None
    cells: dict[str, Cell] = field(default_factory=dict)
    note: str = ""
    profile: dict[str, object] | None = None
    read_check: str | None = None  # qemu-img compare of the vdisk export, read workloads

    def ratio(self, peer: str) -> float | None:
        return self.ratio_of(VDISK, peer)

    def ratio_of(self, server: str, peer: str) -> float | None:
        mine = self.cells.get(server)
        theirs = self.cells.get(peer)
        if not mine or not theirs or mine.median is None or not theirs.median:
            return None
        return mine.median / theirs.median

    def verdict(self) -> str:
        if self.target is None:
            return ""
        r = self.ratio(self.target.peer)
        if r is None:
            return "n/a"
        return "PASS" if r >= self.target.ratio else "MISS"

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "note": self.note,
            "profile": self.profile,
            "vdisk_read_check": self.read_check,
            "target": None if self.target is None else {
                "peer": self.target.peer, "ratio": self.target.ratio,
                "measured": self.ratio(self.target.peer), "result": self.verdict()},
            "ratios": {p: self.ratio(p) for p in (QEMU_NBD, NBDKIT_FILE, PY_FLOOR)
                       if p in self.cells},
            "floor_vs_qemu": self.ratio_of(PY_FLOOR, QEMU_NBD),
            "servers": {
                name: {"median": c.median, "samples": c.samples, "startup_s": c.startup_s,
                       "server_cpu_s": c.cpu_s,
                       "errors": c.errors, "checks": c.checks}
                for name, c in self.cells.items()
            },
        }


def _fmt_value(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.median is None:
        return "ERR" if cell.errors else "-"
    med = cell.median
    text = f"{med:,.0f}" if med >= 100 else f"{med:.1f}"
    spread = cell.spread_pct()
    return text + (f" ±{spread:.0f}%" if spread is not None else "")


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render_table(results: list[CaseResult], servers: list[str]) -> str:
    """The main table: median (± half range) per server, vdisk ratios, targets."""
    cols = [s for s in ALL_SERVERS if s in servers]
    floor = PY_FLOOR in cols
    head = ["workload", "unit", *(SHORT[s] for s in cols), "vdisk/qemu", "vdisk/file",
            *(["vdisk/floor", "floor/qemu"] if floor else []), "target", ""]
    rows = [head]
    for res in results:
        rows.append([
            res.title, res.unit, *(_fmt_value(res.cells.get(s)) for s in cols),
            _fmt_ratio(res.ratio(QEMU_NBD)), _fmt_ratio(res.ratio(NBDKIT_FILE)),
            *([_fmt_ratio(res.ratio(PY_FLOOR)), _fmt_ratio(res.ratio_of(PY_FLOOR, QEMU_NBD))]
              if floor else []),
            res.target.describe() if res.target else "", res.verdict(),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:-2], widths[2:-2], strict=True)]
        cells += [row[-2].ljust(widths[-2]), row[-1]]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def render_costs(results: list[CaseResult], servers: list[str]) -> str:
    """Median server CPU seconds (user + system, all threads) spent in one measured
    run, and median startup seconds (exec to accepting connections, not timed)."""
    cols = [s for s in ALL_SERVERS if s in servers]
    rows = [["server CPU s per run (startup s)", *(SHORT[s] for s in cols)]]
    for res in results:
        vals = []
        for s in cols:
            c = res.cells.get(s)
            if c and c.cpu_s:
                vals.append(f"{statistics.median(c.cpu_s):.2f} "
                            f"({statistics.median(c.startup_s):.2f})")
            else:
                vals.append("-")
        rows.append([res.title, *vals])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def render_problems(results: list[CaseResult]) -> str:
    """Errors (including failed post-write checks), one line each (empty when none)."""
    lines = []
    for res in results:
        for name, cell in res.cells.items():
            for err in dict.fromkeys(cell.errors):
                lines.append(f"{res.title} / {name}: ERROR {err}")
    return "\n".join(lines)
