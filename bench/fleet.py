"""The servers of the workers benchmark: N disks served at once, four ways.

- ``vdisk-serve``: ``vdisk serve -d DIR --unix-dir RUN --json``, the supervisor of
  one nbdkit worker per disk (docs/serve.md); the URIs and worker pids come from
  its JSON line. It serves every disk of the datastore, used or not.
- ``qemu-nbd``: one ``qemu-nbd -f qcow2 -k SOCK -t --shared=16 TOP`` per disk, on
  the disk's top (its chain: the clone's top over the shared frozen base).
- ``nbdkit``: one ``nbdkit -f -U SOCK python plugin/vdisk_nbdkit.py image=TOP``
  per disk: the plugin alone, without the supervisor.
- ``py-floor``: one ``nbdkit -r -U SOCK python bench/floor_plugin.py file=RAW`` per
  disk on the raw equivalent of a clone (the base's contents): one ``os.preadv``
  per read, the most any nbdkit Python plugin reads here (reads only);
- ``shared``: one ``nbdkit -U SOCK python OLD/plugin/vdisk_nbdkit.py datastore=DIR``
  serving every disk, the plugin of a commit before the workers (``git archive``
  of that commit's plugin/): one process and one interpreter for all disks.

Servers of one kind take turns with the others on the same image files, so
QEMU's image locks never collide. Every process has an owner that stops it
(SIGTERM, a bounded wait, SIGKILL) whatever happens; nbdkit also runs with
``--exit-with-parent``. Binaries: ``$VDISK``, ``$NBDKIT``, ``$QEMU_NBD``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import fio
import images
from replicate_contenders import vdisk_command
from servers import FLOOR_PLUGIN, PLUGIN, ServerError, wait_for_socket

from vdisk import process
from vdisk.process import ProcessOwner

log = logging.getLogger(__name__)

VDISK_SERVE = "vdisk-serve"
QEMU_NBD = "qemu-nbd"
NBDKIT = "nbdkit"
PY_FLOOR = "py-floor"
SHARED = "shared"
SERVERS = (VDISK_SERVE, QEMU_NBD, NBDKIT, PY_FLOOR, SHARED)
READ_ONLY = (PY_FLOOR,)
DESCRIPTION = {
    VDISK_SERVE: "vdisk serve (a worker per disk)",
    QEMU_NBD: "qemu-nbd (a process per disk)",
    NBDKIT: "nbdkit image= (a process per disk)",
    PY_FLOOR: "nbdkit python os.preadv of the raw base (a process per disk)",
    SHARED: "one nbdkit for all disks (before workers)",
}
STOP_TIMEOUT_S = 30.0
# what one measurement may fail with (the cell shows ERR; the others go on)
RUN_ERRORS = (ServerError, fio.FioError, images.ToolError, subprocess.TimeoutExpired, OSError)


def rotated(kinds: list[str], rep: int) -> list[str]:
    """The servers in the order of repetition ``rep``: each takes every turn in time."""
    k = rep % len(kinds) if kinds else 0
    return kinds[k:] + kinds[:k]


def uri(disk: str, sock: Path, export: bool) -> str:
    name = disk if export else ""
    return f"nbd+unix:///{name}?socket={quote(str(sock), safe='/')}"


@dataclass
class Served:
    """What a running fleet offers: a URI per disk, and the server processes."""

    uris: dict[str, str]
    pids: list[int]                 # every server process (vdisk-serve: supervisor first)
    startup_s: float                # from the first exec to every disk served
    by_disk: dict[str, int]         # the process serving each disk
    supervisor_pid: int | None = None


class Proc(ProcessOwner):
    """One server process on a Unix socket: spawned, then waited for (so many
    start in parallel), always stopped."""

    def __init__(self, name: str, argv: list[str], sock: Path, log_path: Path) -> None:
        super().__init__(log_path)
        self.name, self.argv, self.sock, self.log_path = name, argv, sock, log_path

    def start(self) -> None:
        self.spawn()
        self.wait_ready(60.0)

    def spawn(self) -> None:
        self._require_not_started()
        self.sock.unlink(missing_ok=True)
        log.debug("starting %s: %s", self.name, " ".join(self.argv))
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        wait_for_socket(self.sock, self._require_proc(), timeout, self.name, self.log_path)

    def _stop_on_exit(self) -> None:
        if self._proc is not None:
            process.stop(self._proc, STOP_TIMEOUT_S, log=log, name=self.name)
            self.sock.unlink(missing_ok=True)


@contextmanager
def processes(procs: list[Proc], timeout: float = 120.0) -> Iterator[float]:
    """Spawn every process, then wait until each accepts connections; yields the
    seconds from the first spawn to the last ready. Stops them all on exit."""
    with ExitStack() as stack:
        t0 = time.perf_counter()
        for p in procs:
            stack.callback(p._stop_on_exit)
            p.spawn()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait_ready(max(0.1, deadline - time.monotonic()))
        yield time.perf_counter() - t0


class VdiskServe(ProcessOwner):
    """``vdisk serve --json`` in the foreground: started, read until its JSON line
    (every worker serves or said why not), stopped by SIGTERM."""

    def __init__(self, datastore: Path, rundir: Path, log_path: Path,
                 timeout: float = 120.0) -> None:
        super().__init__(log_path)
        self.datastore, self.rundir, self.timeout = datastore, rundir, timeout
        self.status: dict[str, object] = {}
        self.ready_s = 0.0

    def start(self) -> None:
        self._require_not_started()
        cmd = [*vdisk_command(), "serve", "-d", str(self.datastore), "--unix-dir",
               str(self.rundir), "--json", "--timeout", str(self.timeout)]
        log.debug("starting %s", " ".join(cmd))
        t0 = time.perf_counter()
        with open(self._output_path, "ab") as logf:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=logf)
        try:
            line = self._read_line(t0)
            self.ready_s = time.perf_counter() - t0
            self.status = json.loads(line)
        except BaseException:
            self._stop_on_exit()
            raise

    def _read_line(self, t0: float) -> bytes:
        proc = self._require_proc()
        assert proc.stdout is not None
        deadline = t0 + self.timeout + 10.0
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                line = proc.stdout.readline()
                if line.strip():
                    return line
            if proc.poll() is not None:
                raise ServerError(VDISK_SERVE, f"exited with {proc.returncode}: "
                                  f"{self.stderr_text().strip()[-300:]}")
            if time.perf_counter() > deadline:
                raise ServerError(VDISK_SERVE, f"no JSON line after {self.timeout:.0f} s")

    def workers(self) -> list[dict[str, object]]:
        disks = self.status.get("disks", [])
        assert isinstance(disks, list)
        return disks

    def _stop_on_exit(self) -> None:
        if self._proc is not None:
            process.stop(self._proc, STOP_TIMEOUT_S, log=log, name=VDISK_SERVE)
            if self._proc.stdout is not None:
                self._proc.stdout.close()


@contextmanager
def serve(kind: str, datastore: Path, tops: dict[str, Path], workdir: Path,
          old_plugin: Path | None = None, raw: Path | None = None) -> Iterator[Served]:
    """Serve the disks ``tops`` (name -> top image) of ``datastore`` the ``kind`` way
    (``py-floor``: every disk the raw file ``raw``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    nbdkit = os.environ.get("NBDKIT", "nbdkit")
    if kind == VDISK_SERVE:
        with VdiskServe(datastore, workdir / "run", workdir / "serve.log") as srv:
            workers = {str(w["disk"]): w for w in srv.workers()}
            bad = [f"{d}: {workers[d]['state']} {workers[d]['error']}" for d in tops
                   if d not in workers or workers[d]["state"] != "running"]
            if bad:
                raise ServerError(kind, "; ".join(bad))
            pids = [int(str(w["pid"])) for w in workers.values() if w["pid"]]
            assert srv.pid is not None
            yield Served({d: str(workers[d]["uri"]) for d in tops}, [srv.pid, *pids],
                         srv.ready_s, {d: int(str(workers[d]["pid"])) for d in tops},
                         supervisor_pid=srv.pid)
        return
    if kind == SHARED:
        if old_plugin is None:
            raise ServerError(kind, "no plugin of a commit before the workers (--shared-commit)")
        sock = workdir / "shared.sock"
        procs = [Proc(kind, [nbdkit, "-f", "--exit-with-parent", "-U", str(sock), "python",
                             str(old_plugin), f"datastore={datastore}"], sock,
                      workdir / "shared.log")]
        with processes(procs) as startup:
            pid = procs[0].pid or 0
            yield Served({d: uri(d, sock, True) for d in tops}, [pid], startup,
                         dict.fromkeys(tops, pid))
        return
    procs = []
    for disk, top in tops.items():
        sock = workdir / f"{disk}.sock"
        if kind == QEMU_NBD:
            argv = [os.environ.get("QEMU_NBD", "qemu-nbd"), "-f", "qcow2", "-k", str(sock),
                    "-t", "--shared=16", str(top)]
        elif kind == NBDKIT:
            argv = [nbdkit, "-f", "--exit-with-parent", "-U", str(sock), "python", str(PLUGIN),
                    f"image={top}"]
        elif kind == PY_FLOOR:
            if raw is None:
                raise ServerError(kind, "no raw equivalent of the disks")
            argv = [nbdkit, "-f", "--exit-with-parent", "-U", str(sock), "-r", "python",
                    str(FLOOR_PLUGIN), f"file={raw}"]
        else:
            raise ValueError(f"unknown server {kind!r}")
        procs.append(Proc(f"{kind} {disk}", argv, sock, workdir / f"{disk}.log"))
    with processes(procs) as startup:
        yield Served({d: uri(d, p.sock, False) for d, p in zip(tops, procs, strict=True)},
                     [p.pid or 0 for p in procs], startup,
                     {d: p.pid or 0 for d, p in zip(tops, procs, strict=True)})


# -- what a process costs -------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes (all their threads)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (/proc/PID/status) and Pss (/proc/PID/smaps_rollup), in KiB:
    RSS counts the shared libraries and interpreter pages in every process, Pss
    shares them out, RssAnon is the process's own."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
    except FileNotFoundError:
        pass
    return out


Sched = dict[tuple[int, int], tuple[int, int]]


def schedstat(pids: list[int]) -> Sched:
    """Per thread of these processes: (ns on a CPU, ns runnable but waiting for one),
    from /proc/PID/task/TID/schedstat."""
    out: Sched = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run, wait, _ = f.read().split()
            except (FileNotFoundError, ValueError):
                continue
            out[(pid, int(tid))] = (int(run), int(wait))
    return out


def sched_delta(before: Sched, after: Sched) -> tuple[float, float]:
    """Seconds on a CPU and seconds waiting for one, summed over the threads seen in
    ``after`` (a thread born meanwhile counts from its start)."""
    run = wait = 0
    for key, (r, w) in after.items():
        r0, w0 = before.get(key, (0, 0))
        run += r - r0
        wait += w - w0
    return run / 1e9, wait / 1e9


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (fio forks a process per job)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ValueError, IndexError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier]
        found += frontier
    return found


def host_cpu() -> dict[str, float]:
    """Seconds of all CPUs so far from /proc/stat: busy (user, nice, system, irq,
    softirq), idle (idle, iowait) and steal (taken by the hypervisor)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return {"busy": (user + nice + system + irq + softirq) / tick,
            "idle": (idle + iowait) / tick, "steal": steal / tick}
