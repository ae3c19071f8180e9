"""The benchmark's workloads: the images each server gets and how one run is measured.

``build_cases`` builds the images (with QEMU's tools) and returns the workloads
in run order; nbd_bench.py runs them against every server.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import images
import workloads
from report import Target
from servers import ALL_SERVERS, NBDKIT_FILE, PY_FLOOR, QEMU_NBD, RAW_SERVERS, VDISK

log = logging.getLogger(__name__)

MiB = images.MiB
WORKLOADS = ("seq", "chain", "rand", "overwrite", "alloc", "sparse")


def human(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / MiB:g} MiB"


@dataclass
class Case:
    """One workload: which image each server gets, and how one repetition is measured."""

    key: str
    title: str
    unit: str
    servers: list[str]
    image: Callable[[str, Path], Path]          # (server, rundir) -> image to serve
    measure: Callable[[str, int], float]        # (uri, repetition) -> MiB/s or IOPS
    readonly: bool = True
    target: Target | None = None
    cache_files: Callable[[str, Path], list[Path]] = lambda s, p: [p]
    verify: Callable[[Path, int], str] | None = None  # (image, repetition) -> "clean" or why not
    repeat_factor: int = 1                      # more repetitions for very short runs
    note: str = ""


def pattern_for(rep: int) -> int:
    """The byte a write workload writes in repetition ``rep`` (non-zero, differs per rep)."""
    return 0x11 * (rep % 15 + 1)


def write_check(length: int) -> Callable[[Path, int], str]:
    """qemu-img check is clean and the written range holds this repetition's pattern."""
    def verify(image: Path, rep: int) -> str:
        problems = check_summary(image)
        if not images.verify_pattern(image, 0, length, pattern_for(rep)):
            problems = ("" if problems == "clean" else problems + ", ") + "data mismatch"
        return problems
    return verify


def check_summary(image: Path) -> str:
    out = images.check(image)
    bad = {k: out.get(k, 0) for k in ("corruptions", "leaks", "check-errors") if out.get(k, 0)}
    return "clean" if not bad else ", ".join(f"{k}={v}" for k, v in bad.items())


def build_cases(args: argparse.Namespace, imgdir: Path) -> list[Case]:
    """Build the images and describe the workloads (in run order)."""
    want = set(args.workloads)
    cs = args.cluster_size
    cases: list[Case] = []

    def timed(what: str, fn: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        fn()
        log.info("built %s in %.1f s", what, time.perf_counter() - t0)

    single_raw = imgdir / "single.raw"
    single = imgdir / "single.qcow2"
    if want & {"seq", "rand", "alloc"}:
        timed("single image", lambda: (images.write_raw(single_raw, args.image_size, args.seed),
                                       images.qcow2_from_raw(single_raw, single, cs)))

    def single_for(server: str, _rundir: Path) -> Path:
        return single_raw if server in RAW_SERVERS else single

    def nbdcopy_mibs(size: int) -> Callable[[str, int], float]:
        return lambda uri, rep: size / MiB / workloads.nbdcopy_read(uri, args.nbdcopy_requests)

    def write_mibs(request: int) -> Callable[[str, int], float]:
        return lambda uri, rep: args.write_size / MiB / workloads.sequential_write(
            uri, 0, args.write_size, request, args.write_qd, pattern_for(rep))

    if "seq" in want:
        cases.append(Case(
            "seq-read", f"seq read {human(args.image_size)} (file: raw)", "MiB/s",
            list(ALL_SERVERS), single_for, nbdcopy_mibs(args.image_size),
            target=Target(NBDKIT_FILE, 0.8),
            note="vdisk and qemu-nbd read the qcow2, nbdkit-file reads the raw equivalent"))

    if "chain" in want:
        for depth in args.chain_depths:
            top = imgdir / f"chain{depth}" / f"layer{depth - 1:02d}.qcow2"
            flat = imgdir / f"chain{depth}" / "flat.raw"
            timed(f"chain depth {depth}", lambda d=depth, t=top, r=flat: (
                images.build_chain(imgdir / f"chain{d}", d, args.chain_size, cs, args.seed),
                images.qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", str(t), str(r))))
            layers = sorted(top.parent.glob("layer*.qcow2"))
            cases.append(Case(
                f"chain-{depth}",
                f"seq read chain depth {depth} ({human(args.chain_size)}, file: raw)", "MiB/s",
                list(ALL_SERVERS), lambda s, r, t=top, f=flat: f if s in RAW_SERVERS else t,
                nbdcopy_mibs(args.chain_size),
                target=Target(QEMU_NBD, 1.3) if depth == 16 else None,
                cache_files=lambda s, p, ls=layers: [p] if s in RAW_SERVERS else ls,
                note="nbdkit-file and py-floor read the chain flattened into one raw "
                     "file: what a server without layers reaches"))

    if "rand" in want:
        for qd in (1, 16):
            def rand(uri: str, rep: int, qd: int = qd) -> float:
                ops, secs = workloads.random_read(uri, args.image_size, qd, args.rand_seconds,
                                                  args.seed)
                return ops / secs
            cases.append(Case(
                f"rand-qd{qd}", f"4k random read QD{qd} (file: raw)", "IOPS", list(ALL_SERVERS),
                single_for, rand, target=Target(QEMU_NBD, 1.0) if qd == 16 else None))

    if "overwrite" in want:
        ow_base = imgdir / "overwrite-base.qcow2"
        timed("overwrite image", lambda: images.build_allocated(ow_base, args.write_size, cs))
        ow_images = {}
        for server in (VDISK, QEMU_NBD):
            ow_images[server] = imgdir / f"overwrite-{server}.qcow2"
            shutil.copyfile(ow_base, ow_images[server])
        ow_base.unlink()
        cases.append(Case(
            "overwrite", f"seq overwrite {human(args.write_size)} "
            f"({args.write_request // 1024}k QD{args.write_qd})", "MiB/s", [VDISK, QEMU_NBD],
            lambda s, r: ow_images[s], write_mibs(args.write_request),
            readonly=False, verify=write_check(args.write_size),
            note="rewrites allocated clusters of a fully allocated image; flush included"))

    if "alloc" in want:
        def overlay(server: str, rundir: Path) -> Path:
            path = rundir / "overlay.qcow2"
            images.create_overlay(path, single, cs)
            return path
        cases.append(Case(
            "alloc-write", f"allocating write {human(args.write_size)} "
            f"({args.alloc_request // 1024}k QD{args.write_qd})", "MiB/s", [VDISK, QEMU_NBD],
            overlay, write_mibs(args.alloc_request),
            readonly=False, target=Target(QEMU_NBD, 1.0), verify=write_check(args.write_size),
            cache_files=lambda s, p: [single, p],
            note="fresh empty overlay on the single image per repetition; flush included"))

    if "sparse" in want:
        sparse = imgdir / "sparse.qcow2"
        sparse_raw = imgdir / "sparse.raw"
        timed("sparse image", lambda: (
            images.build_sparse(sparse, args.sparse_size, args.sparse_allocated),
            images.qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", str(sparse),
                            str(sparse_raw))))
        cases.append(Case(
            "sparse-read", f"sparse read {human(args.sparse_size)}, "
            f"{human(args.sparse_allocated)} data (file: raw)", "MiB/s",
            [s for s in ALL_SERVERS if s != PY_FLOOR],
            lambda s, r: sparse_raw if s == NBDKIT_FILE else sparse,
            nbdcopy_mibs(args.sparse_size), target=Target(QEMU_NBD, 0.8), repeat_factor=3,
            note="MiB/s of virtual size; nbdcopy skips holes found by extents"))
    return cases


