"""Replicate a disk and a linked clone of it to a second datastore; boot the clone there.

    python -m vdisk.lab.replicatedemo [--workdir DIR] [--guest-dir DIR] [--verbose]

On a datastore holding the guest's disk ``vm`` (run alone: the test guest
imported into a fresh datastore; in ci/demo, as the last step of
:mod:`vdisk.lab.lifedemo`: the disk that has just lived through the writer, the
backup and the consolidations):

1. ``vdisk snapshot vm`` freezes the disk's image; ``vdisk disk create
   vm-clone --backing FROZEN`` makes a linked clone of it; 1 MiB of a pattern
   written into the clone through ``vdisk serve`` gives it data of its own.
2. ``vdisk replicate vm --to DST --verify`` into a fresh target copies every
   layer. ``vdisk replicate vm-clone --to DST --verify`` copies only the
   clone's own top: its parent, the frozen image, is found on DST by content ID
   (vm's copy of it) and linked, and nothing below it moves. Each run's
   per-layer table is shown; ``--verify`` has ``qemu-img compare`` check every
   target image against its source.
3. Serves DST with ``vdisk serve`` and boots the guest from the export
   ``vm-clone`` (the ``selftest`` workload, chosen through fw_cfg).
4. Checks: the selftest passed; through DST's exports the clone holds its own
   pattern and the selftest's, vm neither; given the writer's run (lifedemo),
   both disks on DST hold every record (the clone through the linked layer);
   ``qemu-img check`` finds every image of DST clean.

Exit code 0 on success; otherwise 1 with a one-line reason on stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .. import attach, qemu_img
from ..progress import human_bytes
from . import guest, records
from .demokit import BOOT_TIMEOUT, DISK, EXIT_TIMEOUT, DemoFailure, cli, demo_main, say
from .machine import Machine, detect_accel
from .vdiskrun import VdiskServer, nbd_reader, vdisk
from .writer import ConsoleEcho

MiB = 1024 * 1024
CLONE = "vm-clone"
TARGET = "ds2"  # the second datastore, beside the first in the work directory
MARK = 0xC1  # the clone's own data: 1 MiB of it at the end of the data partition
SELFTEST_PATTERN = 0x3C
LENGTH = 1 * MiB


def selftest_offset(image: guest.GuestImage) -> int:
    """Where the selftest writes: the middle of the data partition, clear of the writer's
    region (its first 64 MiB) and of the clone's mark (its last MiB)."""
    return image.data_offset + image.data_size // 2


def layer_table(result: dict[str, Any]) -> list[str]:
    """The per-layer lines of a ``vdisk replicate`` result, top first."""
    rows = [("source layer", "action", "bytes moved", "on the target", "content ID")]
    for layer in result["layers"]:
        moved = human_bytes(layer["bytes_moved"]) if layer["action"] == "copied" else "-"
        rows.append((Path(layer["source"]).name, layer["action"], moved, layer["image"],
                     (layer["content_id"] or layer["identity"])[:8]))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:>{widths[2]}}  "
            f"{r[3]:{widths[3]}}  {r[4]}" for r in rows]  # fmt: skip


def replicate(disk: str, source: Path, target: Path) -> dict[str, Any]:
    """``vdisk replicate DISK -d SOURCE --to TARGET --verify``, its table shown."""
    result = cli("replicate", disk, "-d", source, "--to", target, "--verify")
    if result["verified"] is not True:
        raise DemoFailure(f"vdisk replicate {disk} did not verify its copies")
    say(f"  {result['copied']} copied, {result['linked']} linked, "
        f"{human_bytes(result['bytes_moved'])} moved in {result['duration_s']:.2f} s; "
        "every target image compared equal to its source")  # fmt: skip
    for line in layer_table(result):
        say("    " + line)
    return result


def write_mark(ds: Path, workdir: Path, offset: int) -> None:
    """Write the clone's own data through ``vdisk serve`` (the content ID follows)."""
    rundir = ds / "run"
    say(f"$ vdisk serve -d {ds} --unix-dir {rundir}")
    import nbd  # Debian's python3-libnbd, in the system site-packages

    with VdiskServer(ds, rundir, log_path=workdir / "serve-clone.log") as server:
        h = nbd.NBD()
        h.connect_uri(server.uri(CLONE))
        try:
            h.pwrite(bytes([MARK]) * LENGTH, offset)
            h.flush()
        finally:
            h.shutdown()
        rc = server.stop()
    if rc != 0:
        raise DemoFailure(f"vdisk serve -d {ds} exited with code {rc}")
    say(f"  wrote {human_bytes(LENGTH)} of 0x{MARK:02x} at {offset // MiB} MiB into {CLONE} "
        "through its export: data only the clone has; vdisk serve stopped")  # fmt: skip


def check_linked(vm: dict[str, Any], clone: dict[str, Any], frozen: Path) -> str:
    """The clone's run copied its top only and linked the frozen image to vm's copy of it;
    return that copy (an image of the target)."""
    if vm["linked"] or vm["copied"] != len(vm["layers"]):
        raise DemoFailure(f"vdisk replicate {DISK} into a fresh target linked something: "
                          f"{vm['copied']} copied, {vm['linked']} linked")  # fmt: skip
    copies = {Path(layer["source"]).resolve(): layer for layer in vm["layers"]}
    shared = copies.get(frozen.resolve())
    if shared is None:
        raise DemoFailure(f"vdisk replicate {DISK} did not copy the frozen image {frozen}")
    layers = clone["layers"]
    if (clone["copied"], clone["linked"]) != (1, 1) or layers[-1]["action"] != "linked":
        raise DemoFailure(f"vdisk replicate {CLONE} did not link the shared layers: "
                          f"{clone['copied']} copied, {clone['linked']} linked")  # fmt: skip
    if layers[-1]["image"] != shared["image"] or layers[-1]["content_id"] != shared["content_id"]:
        raise DemoFailure(f"vdisk replicate {CLONE} linked {layers[-1]['image']}, not vm's "
                          f"copy {shared['image']} of the frozen image")  # fmt: skip
    if clone["bytes_moved"] >= vm["bytes_moved"]:
        raise DemoFailure(f"vdisk replicate {CLONE} moved {clone['bytes_moved']} bytes, "
                          f"no fewer than vm's {vm['bytes_moved']}")  # fmt: skip
    return str(shared["image"])


def show_target_chains(target: Path, shared: str) -> None:
    """Both disks' chains on the target; fail unless they share the linked image and all below."""
    vm_chain = vdisk("disk", "info", DISK, "-d", target)["chain"]
    clone_chain = vdisk("disk", "info", CLONE, "-d", target)["chain"]
    if shared not in vm_chain or shared not in clone_chain:
        raise DemoFailure(f"{shared} is not in both chains on {target}")
    below = vm_chain[vm_chain.index(shared) :]
    if clone_chain[clone_chain.index(shared) :] != below:
        raise DemoFailure(f"on {target}, {CLONE}'s chain {clone_chain} does not end with "
                          f"vm's {below}")  # fmt: skip
    say(f"  the disks on {TARGET}, top first:")
    width = max(len(i) for i in vm_chain + clone_chain)
    for name, chain in ((DISK, vm_chain), (CLONE, clone_chain)):
        copied = len(chain) - 1 - len(below)
        marks = ["new empty top", *["copied"] * copied, *["shared"] * len(below)]
        for i, (path, mark) in enumerate(zip(chain, marks, strict=True)):
            say(f"    {name if i == 0 else '':8}  {path:{width}}  {mark}")


def boot_clone(server: VdiskServer, workdir: Path, image: guest.GuestImage) -> float:
    """Boot the guest from the target's ``vm-clone`` export, running the selftest."""
    uri = server.uri(CLONE)
    config = guest.config_text(
        "selftest",
        pattern=f"0x{SELFTEST_PATTERN:02x}",
        offset=selftest_offset(image),
        length=LENGTH,
    )
    say(f"\n--- boot the guest from {uri}, running the selftest")
    t0 = time.monotonic()
    with (
        Machine(workdir, args=attach.qemu_drive_args(uri), fw_cfg={guest.FW_CFG_NAME: config},
                name="replica") as vm,
        ConsoleEcho(vm, t0),
    ):  # fmt: skip
        verdict = vm.wait_for_line(guest.marker_pattern("selftest", "(PASS|FAIL.*)"),
                                   BOOT_TIMEOUT)  # fmt: skip
        if verdict.group(1) != "PASS":
            raise DemoFailure(f"the guest booted from {TARGET} failed: {verdict.group(0)}")
        vm.wait_for_line(r"^VDISK-DONE: .*status=pass", EXIT_TIMEOUT)
        rc = vm.wait(EXIT_TIMEOUT)
        if rc != 0:
            raise DemoFailure(f"QEMU exited with code {rc}")
    return time.monotonic() - t0


def check_exports(server: VdiskServer, image: guest.GuestImage, mark_offset: int) -> None:
    """The clone holds its pattern and the selftest's; vm, served beside it, neither."""
    wanted = {mark_offset: bytes([MARK]) * LENGTH,
              selftest_offset(image): bytes([SELFTEST_PATTERN]) * LENGTH}  # fmt: skip
    for disk, should_hold in ((CLONE, True), (DISK, False)):
        with nbd_reader(server.uri(disk)) as read:
            for offset, data in wanted.items():
                if (read(offset, LENGTH) == data) != should_hold:
                    raise DemoFailure(f"{disk} on {TARGET} {'lacks' if should_hold else 'holds'}"
                                      f" 0x{data[0]:02x} at {offset // MiB} MiB")  # fmt: skip
    say(f"  through the exports of {TARGET}: {CLONE} holds its 0x{MARK:02x} and the selftest's "
        f"0x{SELFTEST_PATTERN:02x}; {DISK} neither")  # fmt: skip


def run_replication(
    ds: Path, workdir: Path, image: guest.GuestImage, writer: records.WriterSummary | None = None
) -> list[tuple[str, str]]:
    """Steps 1-4 on the datastore ``ds`` (not served) holding the disk ``vm``."""
    summary: list[tuple[str, str]] = []
    t0 = time.monotonic()
    target = workdir / TARGET
    say("\n--- freeze the disk, make a linked clone of the frozen image")
    snap = cli("snapshot", DISK, "-d", ds)
    say(f"  froze {snap['frozen']}; {DISK} goes on in {snap['top']}")
    clone = cli("disk", "create", CLONE, "-d", ds, "--backing", snap["frozen"])
    say(f"  {CLONE}: top {clone['top']}, a linked clone of {clone['backing']}")
    mark_offset = image.data_offset + image.data_size - LENGTH
    write_mark(ds, workdir, mark_offset)

    say(f"\n--- replicate both disks to a second datastore, {target}")
    vm_result = replicate(DISK, ds, target)
    clone_result = replicate(CLONE, ds, target)
    shared = check_linked(vm_result, clone_result, ds / snap["frozen"])
    show_target_chains(target, shared)
    summary.append(("replication", f"{DISK}: {vm_result['copied']} copied, "
                    f"{human_bytes(vm_result['bytes_moved'])}; {CLONE}: "
                    f"{clone_result['copied']} copied, {clone_result['linked']} linked, "
                    f"{human_bytes(clone_result['bytes_moved'])}; all verified"))  # fmt: skip

    rundir = target / "run"
    say(f"\n$ vdisk serve -d {target} --unix-dir {rundir}")
    with VdiskServer(target, rundir, log_path=workdir / "serve-target.log") as server:
        say(f"  serving {', '.join(server.exports)}, one worker per disk")
        seconds = boot_clone(server, workdir, image)
        summary.append(("replica boot", f"{CLONE} from {TARGET}: selftest PASS in {seconds:.1f} s"))
        say("\n--- checks")
        check_exports(server, image, mark_offset)
        rc = server.stop()
        if rc != 0:
            raise DemoFailure(f"vdisk serve -d {target} exited with code {rc}")
    if writer is not None:
        found = [records.verify_image(target / vdisk("disk", "info", disk, "-d", target)["top"],
                                      writer).records_found for disk in (DISK, CLONE)]  # fmt: skip
        say(f"  on {TARGET}, {DISK} and {CLONE} (through the linked layer) each hold all "
            f"{found[0]} records of the writer's run")  # fmt: skip
    images = sorted((target / "images").glob("*.qcow2"))
    for path in images:
        qemu_img.check_clean(path, allow_leaks=False)
    say(f"  qemu-img check: the {len(images)} images of {TARGET} are clean")
    summary.append((TARGET, f"{len(images)} images, clean; "
                    f"{time.monotonic() - t0:.1f} s from the snapshot to here"))  # fmt: skip
    return summary


def run(workdir: Path, guest_dir: Path | None) -> list[tuple[str, str]]:
    """The replication part on its own: a fresh datastore with the guest's disk."""
    image = guest.build(guest_dir)
    summary = [("accelerator", detect_accel().name)]
    ds = workdir / "ds"
    say("--- a datastore with the guest's disk in it")
    cli("datastore", "init", ds)
    cli("disk", "import", DISK, image.path, "-d", ds)
    return summary + run_replication(ds, workdir, image)


def main(argv: list[str] | None = None) -> int:
    return demo_main("replicatedemo", __doc__ or "", run, argv,
                     workdir_help="keep the datastores and logs here (default: temporary)",
                     logs="*.log")


if __name__ == "__main__":
    sys.exit(main())
