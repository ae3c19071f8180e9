"""Tables and targets of the workers benchmark (serve_bench.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fleet import QEMU_NBD, SERVERS, VDISK_SERVE
from report import Cell

SHORT = {VDISK_SERVE: "serve", QEMU_NBD: "qemu", "nbdkit": "nbdkit", "py-floor": "floor",
         "shared": "shared"}


@dataclass
class Figures:
    """Every figure of one section: cells keyed by (row key, server, metric)."""

    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)
    checks: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, row: str, server: str, values: dict[str, float]) -> None:
        for metric, v in values.items():
            self.cells.setdefault((row, server, metric), Cell()).samples.append(v)

    def error(self, row: str, server: str, why: str) -> None:
        self.cells.setdefault((row, server, "error"), Cell()).errors.append(why)

    def check(self, row: str, server: str, result: str) -> None:
        self.checks.setdefault((row, server), []).append(result)

    def median(self, row: str, server: str, metric: str) -> float | None:
        c = self.cells.get((row, server, metric))
        return c.median if c else None

    def cell(self, row: str, server: str, metric: str) -> Cell | None:
        return self.cells.get((row, server, metric))

    def failed(self, row: str, server: str) -> bool:
        return (row, server, "error") in self.cells

    def problems(self) -> list[str]:
        return [f"{row} / {server}: {c.errors[0]}"
                for (row, server, metric), c in self.cells.items() if metric == "error"]

    def to_json(self) -> dict[str, object]:
        out: dict[str, dict[str, dict[str, object]]] = {}
        for (row, server, metric), c in self.cells.items():
            out.setdefault(row, {}).setdefault(server, {})[metric] = {
                "median": c.median, "samples": c.samples, "errors": c.errors}
        for (row, server), results in self.checks.items():
            out.setdefault(row, {}).setdefault(server, {})["checks"] = results  # type: ignore[assignment]
        return out


def fmt(value: float | None, digits: int | None = None) -> str:
    """``digits`` decimals; None: none from 100 up, one below."""
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if value >= 100 else 1
    return f"{value:,.{digits}f}"


def fmt_cell(c: Cell | None, digits: int | None = None, scale: float = 1.0) -> str:
    if c is None or c.median is None:
        return "ERR" if c is not None and c.errors else "-"
    text = fmt(c.median * scale, digits)
    spread = c.spread_pct()
    return text + (f" ±{spread:.0f}%" if spread is not None and spread >= 0.5 else "")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(head: Sequence[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned."""
    allrows = [list(head), *rows]
    widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(allrows):
        cells = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def order(servers: list[str]) -> list[str]:
    return [s for s in SERVERS if s in servers]


# -- multi-disk ---------------------------------------------------------------------------

MULTI_ROWS = (("4k rand read QD{rqd}", "IOPS", "read_iops"),
              ("4k rand read QD{rqd}", "MiB/s", "read_mib_s"),
              ("64k rand write QD{wqd}", "IOPS", "write_iops"),
              ("64k rand write QD{wqd}", "MiB/s", "write_mib_s"))


def render_multi(fig: Figures, ns: list[int], servers: list[str], rqd: int, wqd: int) -> str:
    cols = order(servers)
    peers = [s for s in cols if s != QEMU_NBD]
    floor = "py-floor" in cols and VDISK_SERVE in cols
    head = ["N", "workload", "unit", *cols,
            *(f"{SHORT[s]}/qemu" for s in peers if QEMU_NBD in cols),
            *(["serve/floor"] if floor else [])]
    rows = []
    for n in ns:
        for title, unit, metric in MULTI_ROWS:
            row = [str(n), title.format(rqd=rqd, wqd=wqd), unit]
            row += [fmt_cell(fig.cell(str(n), s, metric)) for s in cols]
            if QEMU_NBD in cols:
                q = fig.median(str(n), QEMU_NBD, metric)
                row += [fmt_ratio(ratio(fig.median(str(n), s, metric), q)) for s in peers]
            if floor:
                row.append(fmt_ratio(ratio(fig.median(str(n), VDISK_SERVE, metric),
                                           fig.median(str(n), "py-floor", metric))))
            rows.append(row)
    return table(head, rows, left=3)


def render_multi_cpu(fig: Figures, ns: list[int], servers: list[str]) -> str:
    """Where the CPU went during the reads: cores busy in the servers and in fio,
    and the servers' CPU per read."""
    cols = order(servers)
    head = ["N", "during the reads", *cols]
    rows = []
    for n in ns:
        for label, metric, digits in (("server cores busy", "read_server_cores", 2),
                                      ("server threads waiting for a CPU",
                                       "read_server_waiting", 2),
                                      ("fio cores busy", "read_fio_cores", 2),
                                      ("fio threads waiting for a CPU", "read_fio_waiting", 2),
                                      ("server CPU us per read", "read_server_us", 1),
                                      ("host: cores idle", "read_host_idle", 2),
                                      ("host: cores to other processes",
                                       "read_host_others", 2),
                                      ("host: cores stolen by the hypervisor",
                                       "read_host_steal", 2),
                                      ("startup s (not timed)", "startup_s", 2)):
            rows.append([str(n), label, *(fmt_cell(fig.cell(str(n), s, metric), digits)
                                          for s in cols)])
    return table(head, rows, left=2)


def multi_target(fig: Figures, n: int = 4, want: float = 0.9) -> tuple[str, str]:
    r = ratio(fig.median(str(n), VDISK_SERVE, "read_iops"),
              fig.median(str(n), QEMU_NBD, "read_iops"))
    verdict = "n/a" if r is None else ("PASS" if r >= want else "MISS")
    return verdict, (f"vdisk serve >= {want:g}x {n} qemu-nbd, 4k random reads at N = {n}: "
                     f"{fmt_ratio(r)}")


# -- noisy neighbour ----------------------------------------------------------------------

def render_noisy(fig: Figures, servers: list[str]) -> str:
    cols = [s for s in order(servers) if s != "py-floor"]
    head = ["server", "B alone IOPS", "p50 us", "p99 us", "p99.9 us", "B with A IOPS",
            "p50 us", "p99 us", "p99.9 us", "p99 with/alone", "IOPS with/alone",
            "A writes/s", "A MiB/s", "A p99 ms", "A server CPU us/write",
            "B server waiting alone/with"]
    rows = []
    for s in cols:
        def c(metric: str, digits: int | None = None, scale: float = 1.0, s: str = s) -> str:
            return fmt_cell(fig.cell("noisy", s, metric), digits, scale)
        rows.append([s, c("alone_iops"), c("alone_p50"), c("alone_p99"), c("alone_p99.9"),
                     c("with_iops"), c("with_p50"), c("with_p99"), c("with_p99.9"),
                     fmt_ratio(fig.median("noisy", s, "p99_ratio")),
                     fmt_ratio(fig.median("noisy", s, "iops_ratio")),
                     c("a_iops"), c("a_mib_s"), c("a_p99", 1, 1e-3), c("a_server_us"),
                     f"{c('alone_b_server_waiting', 2)} / {c('with_b_server_waiting', 2)}"])
    return table(head, rows)


def noisy_target(fig: Figures, want: float = 3.0) -> tuple[str, str]:
    r = fig.median("noisy", VDISK_SERVE, "p99_ratio")
    verdict = "n/a" if r is None else ("PASS" if r <= want else "MISS")
    return verdict, (f"vdisk serve: B's QD1 read p99 with A's fsync writer within {want:g}x "
                     f"of B alone: {fmt_ratio(r)} (median of the runs' ratios)")


# -- cost -----------------------------------------------------------------------------------

def render_cost(fig: Figures, kinds: list[str], disks: int) -> str:
    head = [f"server, {disks} disks", "ready s", "stop s", "VmRSS MiB/proc", "RssAnon MiB/proc",
            "Pss MiB/proc", "supervisor VmRSS MiB", f"total Pss MiB ({disks})", "processes",
            "idle CPU %", "supervisor idle CPU %"]
    rows = []
    mib = 1 / 1024
    for k in kinds:
        def c(metric: str, digits: int | None = 1, scale: float = 1.0, k: str = k) -> str:
            return fmt_cell(fig.cell("cost", k, metric), digits, scale)
        rows.append([k, c("ready_s", 2), c("stop_s", 2), c("rss_kib", 1, mib),
                     c("anon_kib", 1, mib), c("pss_kib", 1, mib), c("supervisor_rss_kib", 1, mib),
                     c("total_pss_kib", 0, mib), c("processes", 0), c("idle_cpu_pct", 1),
                     c("supervisor_idle_cpu_pct", 1)])
    return table(head, rows)


def cost_target(fig: Figures, disks: int, want: float = 10.0) -> tuple[str, str]:
    t = fig.median("cost", VDISK_SERVE, "ready_s")
    c = fig.cell("cost", VDISK_SERVE, "ready_s")
    worst = max(c.samples) if c and c.samples else None
    verdict = "n/a" if t is None else ("PASS" if t <= want else "MISS")
    return verdict, (f"{disks} disks ready within {want:g} s (vdisk serve, JSON line): median "
                     f"{fmt(t, 2)} s, worst {fmt(worst, 2)} s")


def render_targets(lines: list[tuple[str, str]]) -> str:
    return "\n".join(f"{v:4}  {text}" for v, text in lines)
