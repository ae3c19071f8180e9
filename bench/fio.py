"""fio as the NBD client: job files, one run, and what it measured.

    fio --output-format=json --output=OUT JOBFILE

Every job uses fio's own NBD engine (``ioengine=nbd``, ``uri=``: libnbd), so the
client is C, the same for every server, and one fio process drives all the
disks of a measurement at once (one forked job per disk). Time-based jobs
(reads, the noisy neighbour) run ``runtime`` seconds after ``ramp_time``
seconds that are not counted; write jobs write a fixed amount, each block once,
with fio's verification headers (``verify=crc32c``), so that ``verify_only``
can read every block back afterwards, untimed, through the same server.

The binary is ``$FIO`` if set, else ``fio`` (Debian's package ``fio``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MiB = 1 << 20
PERCENTILES = ("50", "99", "99.9")


class FioError(Exception):
    """fio failed, or a job reported an error."""

    template = "fio: {reason}"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(self.template.format(reason=reason))


def binary() -> str:
    return os.environ.get("FIO", "fio")


def version() -> str:
    try:
        out = subprocess.run([binary(), "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    return out.stdout.strip() or "missing"


def require() -> None:
    """A one-line error unless fio with the nbd engine is here."""
    try:
        out = subprocess.run([binary(), "--enghelp=nbd"], capture_output=True, text=True,
                             timeout=10, check=False)
    except OSError:
        raise FioError(f"{binary()} not found (Debian: apt-get install fio)") from None
    if out.returncode != 0 or "uri" not in out.stdout:
        raise FioError(f"{binary()} has no nbd engine: {(out.stdout + out.stderr).strip()}")


@dataclass
class Job:
    """One fio job: one disk, one workload. ``options`` are fio's own names."""

    name: str
    uri: str
    options: dict[str, str | int | float]

    def section(self) -> str:
        lines = [f"[{self.name}]", "ioengine=nbd", f"uri={self.uri}"]
        lines += [f"{k}={v}" for k, v in self.options.items()]
        return "\n".join(lines) + "\n"


def random_reads(name: str, uri: str, size: int, *, bs: int, qd: int, runtime: float,
                 ramp: float, seed: int) -> Job:
    """Uniform random reads over the whole disk for ``runtime`` seconds."""
    return Job(name, uri, {
        "rw": "randread", "bs": bs, "iodepth": qd, "size": size, "norandommap": 1,
        "time_based": 1, "runtime": f"{runtime:g}s", "ramp_time": f"{ramp:g}s",
        "randseed": seed, **_latency_options()})


def random_writes(name: str, uri: str, size: int, amount: int, *, bs: int, qd: int,
                  seed: int) -> Job:
    """``amount`` bytes of random writes over the whole disk, each block at most once,
    with verification headers (checked later by :func:`verify`), then a flush."""
    return Job(name, uri, {
        "rw": "randwrite", "bs": bs, "iodepth": qd, "size": size, "io_size": amount,
        "randseed": seed, "verify": "crc32c", "do_verify": 0, "end_fsync": 1,
        **_latency_options()})


def timed_writes(name: str, uri: str, size: int, *, bs: int, qd: int, runtime: float,
                 ramp: float, seed: int, fsync: int) -> Job:
    """Random writes for ``runtime`` seconds, a flush after every ``fsync`` writes.
    A time-based writer cannot be verified by fio (it never reaches its verify
    phase); the caller checks the image with qemu-img instead."""
    return Job(name, uri, {
        "rw": "randwrite", "bs": bs, "iodepth": qd, "size": size, "norandommap": 1,
        "time_based": 1, "runtime": f"{runtime:g}s", "ramp_time": f"{ramp:g}s",
        "randseed": seed, "fsync": fsync, **_latency_options()})


def _latency_options() -> dict[str, str | int]:
    # percentiles of the whole latency (submission to completion), not only clat
    return {"lat_percentiles": 1, "clat_percentiles": 0,
            "percentile_list": ":".join(PERCENTILES)}


def verify(job: Job) -> Job:
    """The same job reading back and checking what it wrote (``verify_only``)."""
    opts = {k: v for k, v in job.options.items() if k not in ("do_verify", "end_fsync")}
    return Job(job.name, job.uri, {**opts, "verify_only": 1, "do_verify": 1})


@dataclass
class Direction:
    """One job's figures for reads or writes."""

    ios: int
    bytes: int
    runtime_s: float
    iops: float
    lat_us: dict[str, float] = field(default_factory=dict)   # percentile -> microseconds
    lat_mean_us: float = 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / MiB / self.runtime_s if self.runtime_s else 0.0


@dataclass
class JobResult:
    name: str
    read: Direction
    write: Direction
    cpu_s: float                # fio's own CPU for this job (user + system)
    raw: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        def d(x: Direction) -> dict[str, Any]:
            return {"ios": x.ios, "bytes": x.bytes, "runtime_s": x.runtime_s, "iops": x.iops,
                    "mib_s": x.mib_s, "lat_us": x.lat_us, "lat_mean_us": x.lat_mean_us}
        return {"name": self.name, "read": d(self.read), "write": d(self.write),
                "fio_cpu_s": self.cpu_s}


def _direction(stats: dict[str, Any]) -> Direction:
    lat = stats.get("lat_ns", {})
    pct = lat.get("percentile", {})
    lat_us = {}
    for p in PERCENTILES:
        key = f"{float(p):.6f}"
        if key in pct:
            lat_us[p] = pct[key] / 1000.0
    return Direction(ios=int(stats["total_ios"]), bytes=int(stats["io_bytes"]),
                     runtime_s=stats["runtime"] / 1000.0, iops=float(stats["iops"]),
                     lat_us=lat_us, lat_mean_us=float(lat.get("mean", 0.0)) / 1000.0)


def run(jobs: list[Job], workdir: Path, tag: str, timeout: float,
        during: Callable[[int], None] | None = None) -> dict[str, JobResult]:
    """Run ``jobs`` together in one fio process; their results by job name.
    ``during(pid)`` is called with fio's pid once it runs (to sample it, or the
    servers, while the jobs run). Raises FioError if fio fails, times out, or
    any job reports an error."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobfile = workdir / f"{tag}.fio"
    out = workdir / f"{tag}.json"
    jobfile.write_text("\n".join(j.section() for j in jobs))
    out.unlink(missing_ok=True)
    cmd = [binary(), "--output-format=json", f"--output={out}", str(jobfile)]
    log.debug("running %s", " ".join(cmd))
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=workdir) as proc:
        try:
            if during is not None:
                during(proc.pid)
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise FioError(f"{tag}: no result after {timeout:.0f} s") from None
        except BaseException:
            proc.kill()
            raise
    text = out.read_text(errors="replace") if out.exists() else ""
    if proc.returncode != 0:
        why = (stderr.strip() or text.strip()).splitlines()
        raise FioError(f"{tag}: exit {proc.returncode}: {why[-1] if why else '(no output)'}")
    try:
        doc = json.loads(text[text.index("{"):])
    except ValueError:
        raise FioError(f"{tag}: no JSON in {out}") from None
    results = {}
    for j in doc["jobs"]:
        if j.get("error"):
            raise FioError(f"{tag}: job {j['jobname']} failed with error {j['error']}")
        cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] / 1000.0
        results[j["jobname"]] = JobResult(j["jobname"], _direction(j["read"]),
                                          _direction(j["write"]), cpu, j)
    missing = {job.name for job in jobs} - set(results)
    if missing:
        raise FioError(f"{tag}: no result for job(s) {', '.join(sorted(missing))}")
    return results
