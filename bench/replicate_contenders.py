"""The replication benchmark's source datastore and the four ways of moving its disks.

The source: one datastore, a base disk filled with non-zero data and frozen by a
snapshot, and N linked clones of it, each with its own data in its top. Every
byte is written through the block engine (``vdisk_block.chain.open_disk``), so
every image keeps a valid content identity (a qemu-io write would make it
unknown, and ``vdisk replicate`` could not link to the base).

The contenders, each into an empty target directory, disk after disk:

- ``vdisk``: ``vdisk replicate vmN -d SRC --to DST --json``;
- ``qemu-img convert``: ``qemu-img convert -f qcow2 -O qcow2 TOP DST/vmN.qcow2``
  (each disk flattened: the base is rewritten into every file);
- ``cp chains``: ``cp --sparse=always`` of base and top for every disk, then
  ``qemu-img rebase -u`` so each top names its own copy of the base;
- ``cp reference``: ``cp --sparse=always`` of exactly the files vdisk moves (the
  base once with the first disk, then each top); the tops name the base by a
  relative file name, so the copies form usable chains as they are.

Every run ends with an fsync of every file and directory in the target (part of
the timing), so every contender ends with its data on disk as vdisk does by
design; the time before that fsync is kept too. Binaries are overridable by
``$VDISK``, ``$QEMU_IMG`` and ``$CP``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import images

from vdisk import blockpath  # noqa: F401  (makes vdisk_block importable)
from vdisk_block.chain import open_disk

log = logging.getLogger(__name__)

MiB = images.MiB
FILL_CHUNK = 8 * MiB

VDISK = "vdisk"
VDISK_ONE = "vdisk-one"
CONVERT = "qemu-img-convert"
CP_CHAINS = "cp-chains"
CP_REFERENCE = "cp-reference"
CONTENDERS = (VDISK, VDISK_ONE, CONVERT, CP_CHAINS, CP_REFERENCE)
VDISKS = (VDISK, VDISK_ONE)
DESCRIPTION = {
    VDISK: "vdisk replicate (a command per disk)",
    VDISK_ONE: "vdisk replicate (one command)",
    CONVERT: "qemu-img convert (flatten)",
    CP_CHAINS: "cp --sparse=always full chains",
    CP_REFERENCE: "cp --sparse=always base once + tops",
}


def vdisk_command() -> list[str]:
    """``$VDISK``, else the ``vdisk`` script beside this Python (the venv's), else PATH."""
    if os.environ.get("VDISK"):
        return [os.environ["VDISK"]]
    beside = Path(sys.executable).parent / "vdisk"
    return [str(beside)] if beside.exists() else ["vdisk"]


def vdisk_json(*args: str) -> dict[str, Any]:
    """Run ``vdisk ARGS --json``; its parsed output (a ToolError unless JSON came back)."""
    cmd = [*vdisk_command(), *args, "--json"]
    out = images.run(cmd)
    try:
        doc: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise images.ToolError(cmd, 0, f"no JSON on stdout: {out[:200]!r}") from None
    return doc


def cp(*args: str) -> None:
    images.run([os.environ.get("CP", "cp"), "--sparse=always", *args])


def allocated(path: Path) -> int:
    """Bytes the file occupies on disk (``du``: st_blocks * 512)."""
    return os.stat(path).st_blocks * 512


def tree_allocated(directory: Path) -> int:
    return sum(allocated(Path(d) / f) for d, _, files in os.walk(directory) for f in files)


def fsync_tree(directory: Path) -> None:
    """fsync every regular file, then every directory, under ``directory``."""
    dirs = []
    for d, _, files in os.walk(directory):
        dirs.append(d)
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- the source ---------------------------------------------------------------------------


@dataclass
class Disk:
    name: str
    top: Path                   # absolute path of the disk's top image


@dataclass
class Source:
    datastore: Path
    base: Path                  # the frozen base image every disk's top continues
    disks: list[Disk]

    def files(self) -> list[Path]:
        """The files a content-aware copy moves: the base once and every top."""
        return [self.base, *(d.top for d in self.disks)]

    def allocated(self) -> dict[str, int]:
        tops = [allocated(d.top) for d in self.disks]
        return {"base": allocated(self.base), "tops": sum(tops), "top_min": min(tops),
                "top_max": max(tops)}


def fill_base(path: Path, seed: int) -> None:
    """Non-zero pseudo-random data in every byte of the image, in big writes."""
    rng = random.Random(seed)
    block = bytearray(rng.randbytes(FILL_CHUNK))
    disk = open_disk(str(path))
    try:
        for off in range(0, disk.size, FILL_CHUNK):
            block[0:8] = off.to_bytes(8, "little")          # every chunk differs
            disk.write(memoryview(block)[:min(FILL_CHUNK, disk.size - off)], off)
    finally:
        disk.close()


def fill_top(path: Path, data: int, seed: int) -> int:
    """Write until ``data`` bytes (whole clusters) are allocated in the top: writes of
    1-16 clusters (64 KiB..1 MiB with 64 KiB clusters) at random cluster-aligned
    offsets over the whole disk; a write never allocates more than what is still
    missing, so overlaps only cost another round. Returns the number of writes."""
    rng = random.Random(seed)
    block = bytearray(rng.randbytes(MiB))
    disk = open_disk(str(path))
    try:
        cs = disk.cluster_size
        nclusters = disk.size // cs
        want = min(-(-data // cs), nclusters)
        have: set[int] = set()
        writes = 0
        while len(have) < want:
            n = min(rng.randint(1, max(1, MiB // cs)), want - len(have))
            c = rng.randrange(nclusters - n + 1)
            block[0:8] = c.to_bytes(8, "little")
            disk.write(memoryview(block)[:n * cs], c * cs)
            have.update(range(c, c + n))
            writes += 1
    finally:
        disk.close()
    return writes


@contextmanager
def bytecode_cache(directory: Path) -> Iterator[dict[str, str | None]]:
    """Inside the block, every process started reads and writes Python's bytecode
    cache under ``directory``, as an installed or once-run vdisk has it; without it
    (``PYTHONDONTWRITEBYTECODE`` set, as in some shells) each ``vdisk replicate``
    compiles the ~30 modules it imports again, ~0.05 s. The repository stays clean.
    Yields the previous settings (for the record) and restores them afterwards."""
    names = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    before = {k: os.environ.get(k) for k in names}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(directory)
    try:
        yield before
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_source(directory: Path, disks: int, base_size: int, top_data: int,
                 seed: int) -> Source:
    """A datastore with a filled, frozen base and ``disks`` linked clones vm1..vmN;
    then one untimed ``vdisk replicate`` into a throwaway target, so the bytecode
    cache holds every module the measured runs import."""
    ds = directory / "source"
    vdisk_json("datastore", "init", str(ds))
    base = vdisk_json("disk", "create", "base", "-d", str(ds), "--size", str(base_size))
    fill_base(ds / base["top"], seed)
    frozen = vdisk_json("snapshot", "base", "-d", str(ds))["frozen"]
    out = []
    for n in range(1, disks + 1):
        created = vdisk_json("disk", "create", f"vm{n}", "-d", str(ds), "--backing", frozen)
        top = ds / created["top"]
        fill_top(top, top_data, seed + n)
        out.append(Disk(f"vm{n}", top))
    warmup = directory / "warmup"
    vdisk_json("replicate", out[0].name, "-d", str(ds), "--to", str(warmup))
    remove(warmup)
    return Source(ds, ds / frozen, out)


# -- one run of one contender -----------------------------------------------------------------


@dataclass
class Run:
    contender: str
    seconds: float = 0.0            # end to end, the final fsync of the target included
    unsynced_s: float = 0.0         # the same, up to the final fsync
    bytes_moved: int = 0            # vdisk: its JSON totals; others: allocated bytes written
    target_allocated: int = 0       # every file in the target afterwards (du)
    per_disk_s: list[float] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    check: str | None = None        # qemu-img compare of one disk, target vs source
    error: str | None = None


Step = Callable[[Disk, int], None]


def _timed(run: Run, source: Source, target: Path, step: Step) -> None:
    """Run ``step`` for every disk in order, then fsync the target; fill in the times."""
    t0 = time.perf_counter()
    for i, disk in enumerate(source.disks):
        t = time.perf_counter()
        step(disk, i)
        run.per_disk_s.append(time.perf_counter() - t)
    run.unsynced_s = time.perf_counter() - t0
    fsync_tree(target)
    run.seconds = time.perf_counter() - t0


def run_vdisk(source: Source, target: Path) -> tuple[Run, Path]:
    run = Run(VDISK)
    results: list[dict[str, Any]] = []

    def step(disk: Disk, _i: int) -> None:
        results.append(vdisk_json("replicate", disk.name, "-d", str(source.datastore),
                                  "--to", str(target)))

    _timed(run, source, target, step)
    return _vdisk_results(run, results, target)


def run_vdisk_one(source: Source, target: Path) -> tuple[Run, Path]:
    """One ``vdisk replicate vm1 ... vmN`` (the disks one after another, one process)."""
    run = Run(VDISK_ONE)
    results: list[dict[str, Any]] = []

    def step(_disk: Disk, i: int) -> None:
        if i == 0:
            results.extend(vdisk_json("replicate", *(d.name for d in source.disks), "-d",
                                      str(source.datastore), "--to", str(target))["results"])

    _timed(run, source, target, step)
    run.per_disk_s = [r["duration_s"] for r in results]
    return _vdisk_results(run, results, target)


def _vdisk_results(run: Run, results: list[dict[str, Any]], target: Path) -> tuple[Run, Path]:
    run.bytes_moved = sum(r["bytes_moved"] for r in results)
    run.detail = {
        "inside_replicate_s": sum(r["duration_s"] for r in results),
        "disks": [{"disk": r["disk"], "copied": r["copied"], "linked": r["linked"],
                   "bytes_moved": r["bytes_moved"], "duration_s": r["duration_s"]}
                  for r in results],
    }
    plan = [(r["copied"], r["linked"]) for r in results]
    if plan != [(2, 0)] + [(1, 1)] * (len(plan) - 1):
        run.error = f"expected the base copied once and linked after: (copied, linked) {plan}"
    return run, target / results[-1]["top"]


def run_convert(source: Source, target: Path) -> tuple[Run, Path]:
    run = Run(CONVERT)
    target.mkdir()

    def step(disk: Disk, _i: int) -> None:
        images.qemu_img("convert", "-f", "qcow2", "-O", "qcow2", str(disk.top),
                        str(target / f"{disk.name}.qcow2"))

    _timed(run, source, target, step)
    return run, target / f"{source.disks[-1].name}.qcow2"


def run_cp_chains(source: Source, target: Path) -> tuple[Run, Path]:
    run = Run(CP_CHAINS)
    target.mkdir()

    def step(disk: Disk, _i: int) -> None:
        base, top = f"{disk.name}-base.qcow2", f"{disk.name}.qcow2"
        cp(str(source.base), str(target / base))
        cp(str(disk.top), str(target / top))
        images.qemu_img("rebase", "-u", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        str(target / top))

    _timed(run, source, target, step)
    return run, target / f"{source.disks[-1].name}.qcow2"


def run_cp_reference(source: Source, target: Path) -> tuple[Run, Path]:
    run = Run(CP_REFERENCE)
    target.mkdir()

    def step(disk: Disk, i: int) -> None:
        files = [source.base, disk.top] if i == 0 else [disk.top]
        cp(*map(str, files), str(target) + "/")

    _timed(run, source, target, step)
    return run, target / source.disks[-1].top.name


RUNNERS: dict[str, Callable[[Source, Path], tuple[Run, Path]]] = {
    VDISK: run_vdisk, VDISK_ONE: run_vdisk_one, CONVERT: run_convert, CP_CHAINS: run_cp_chains,
    CP_REFERENCE: run_cp_reference,
}
RUN_ERRORS = (images.ToolError, OSError, KeyError, subprocess.SubprocessError)


def measure(contender: str, source: Source, target: Path, check: bool) -> Run:
    """One run into ``target`` (must not exist; removed by the caller). With ``check``,
    ``qemu-img compare`` the last disk's target image with its source top (not timed)."""
    try:
        run, image = RUNNERS[contender](source, target)
    except RUN_ERRORS as e:
        log.error("%s: %s", contender, e)
        return Run(contender, error=str(e))
    run.target_allocated = tree_allocated(target)
    if contender not in VDISKS:
        run.bytes_moved = run.target_allocated
    if check:
        run.check = compare(source.disks[-1].top, image)
    return run


def compare(source_top: Path, target_image: Path) -> str:
    """"identical", or QEMU's words for how the two guest views differ."""
    binary = os.environ.get("QEMU_IMG", "qemu-img")
    cmd = [binary, "compare", "-f", "qcow2", "-F", "qcow2", str(source_top), str(target_image)]
    log.debug("running %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if res.returncode == 0:
        return "identical"
    return f"exit {res.returncode}: {(res.stdout + res.stderr).strip()}"


def remove(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
