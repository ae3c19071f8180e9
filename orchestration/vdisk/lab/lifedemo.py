"""The life of a running disk: snapshot, live backup, online consolidation, pivot, replica.

    python -m vdisk.lab.lifedemo [--workdir DIR] [--guest-dir DIR] [--verbose]

1. Builds the test guest with vm-images/build (cached) and imports it into a
   fresh datastore as disk ``vm`` (``vdisk datastore init``, ``vdisk disk import``).
2. Serves the datastore with ``vdisk serve`` on a Unix socket and boots the
   guest from the export ``vm``, running the ``writer`` workload: numbered,
   checksummed 4 KiB records, each written with O_DIRECT and fsync. The
   guest's console lines that matter are shown as they come.
3. While the writer runs: ``vdisk backup`` (snapshot, copy of the frozen
   layers, consolidation back and pivot), then ``vdisk snapshot`` and, once
   the writer has filled the new delta for a while, ``vdisk consolidate
   --no-pivot``: one copy pass, then the job stays ready, mirroring every
   guest write into the target, until ``vdisk job complete`` pivots. The
   jobs' figures are shown.
4. Stops the writer from the console; the guest powers off. Checks: every
   record verifies, through the export and in the image after the server
   stopped; the backup holds exactly the records 1..k of the run, each
   intact (the disk at the snapshot); the disk is one image again, with no
   leftover delta; ``qemu-img check`` finds the backup and the disk clean.
5. Replicates the disk and a linked clone of it to a second datastore and
   boots the guest from there (:mod:`vdisk.lab.replicatedemo`): ``vdisk
   snapshot``, ``vdisk disk create vm-clone --backing FROZEN``, ``vdisk
   replicate`` of both (the clone's run copies its own top and links the
   frozen image to vm's copy), ``vdisk serve`` of the target and the
   ``selftest`` booted from its export ``vm-clone``; the writer's records
   verify in both disks there.

Exit code 0 on success; otherwise 1 with a one-line reason on stderr.

The pieces it is built of, shared with replicatedemo and the boot tests, are
in :mod:`vdisk.lab.vdiskrun` (the ``vdisk`` command line, ``vdisk serve``),
:mod:`vdisk.lab.writer` (the writer's console, the record checks) and
:mod:`vdisk.lab.demokit`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import attach, qemu_img
from ..progress import human_bytes
from . import guest, records
from .demokit import DISK, EXIT_TIMEOUT, DemoFailure, check_job, cli, demo_main, job_lines, say
from .machine import Machine, detect_accel
from .replicatedemo import run_replication
from .vdiskrun import VdiskServer, disk_chain, image_reader, leftover_images, nbd_reader
from .writer import ConsoleEcho, WriterConsole, verify_prefix

MiB = 1024 * 1024
REGION = 64 * MiB  # the writer's region: the start of the guest's data partition


def run(workdir: Path, guest_dir: Path | None) -> list[tuple[str, str]]:
    summary: list[tuple[str, str]] = []
    t = time.monotonic()
    image = guest.build(guest_dir)
    summary.append(("guest image", f"{image.path} ({time.monotonic() - t:.1f} s to build/check)"))
    accel = detect_accel()
    summary.append(("accelerator", f"{accel.name} ({accel.reason})"))

    ds = workdir / "ds"
    say("\n--- a datastore with the guest's disk in it")
    cli("datastore", "init", ds)
    imported = cli("disk", "import", DISK, image.path, "-d", ds)
    chain_before = imported["chain"]
    say(f"  disk {DISK}: {human_bytes(imported['size'])}, chain {chain_before}")

    rundir = ds / "run"
    say(f"$ vdisk serve -d {ds} --unix-dir {rundir}")
    with VdiskServer(ds, rundir, log_path=workdir / "serve.log") as server:
        say(f"  serving {', '.join(server.exports)}: one worker per disk ({DISK}: pid "
            f"{server.worker_pid(DISK)}), control {server.control}")  # fmt: skip
        uri = server.uri(DISK)
        config = guest.config_text(
            "writer", seconds=0, progress=25, offset=image.data_offset, length=REGION
        )
        say(f"\n--- boot the guest from {uri}, running the writer")
        t0 = time.monotonic()
        with (
            Machine(workdir, args=attach.qemu_drive_args(uri),
                    fw_cfg={guest.FW_CFG_NAME: config}, name="writer") as vm,
            ConsoleEcho(vm, t0),
        ):  # fmt: skip
            writer = WriterConsole(vm)
            layout = writer.started()
            writer.wait_records(50)

            say("\n--- live backup, the writer running")
            backup_path = workdir / "backup.qcow2"
            seq_at_backup = writer.seq()
            backup = cli("backup", DISK, "--to", backup_path, "-d", ds)
            snap, job = backup["snapshot"], backup["consolidate"]
            say(f"  snapshot: froze {snap['frozen']}, new top {snap['top']}")
            say(f"  backup: {backup_path} ({human_bytes(backup['bytes'])}), "
                f"{backup['duration_s']:.2f} s in all; consolidated back:")  # fmt: skip
            for line in job_lines(job):
                say("    " + line)
            check_job(job)
            writer.wait_records(25)

            say("\n--- snapshot; the writer fills the new delta")
            snap = cli("snapshot", DISK, "-d", ds)
            say(f"  new top {snap['top']} on {snap['frozen']}")
            seq = writer.seq()
            writer.wait_records(150)
            say(f"  the writer's records after {seq} (its last report before the snapshot) "
                f"up to {writer.seq()} and on went to the new delta")

            say("\n--- online consolidation, the writer running: copy, then mirror until the pivot")
            ready = cli("consolidate", DISK, "--no-pivot", "-d", ds)
            if ready["state"] != "ready":
                raise DemoFailure(f"job {ready['id']} is {ready['state']}, not ready")
            say(f"  job {ready['id']}: ready after one pass: copied "
                f"{human_bytes(ready['bytes_copied'])} of a {human_bytes(ready['copy_set_bytes'])} "
                f"copy set in {ready['time_to_ready_s']:.3f} s; {ready['target']} now follows "
                "every guest write")  # fmt: skip
            writer.wait_records(50)
            job = cli("job", "complete", str(ready["id"]), "-d", ds)
            for line in job_lines(job):
                say("  " + line)
            check_job(job)
            figures = job
            if job["top_after"] != snap["frozen"]:
                raise DemoFailure(f"the disk's top is {job['top_after']}, not {snap['frozen']}")
            if not job["bytes_mirrored"]:
                raise DemoFailure(f"job {job['id']} mirrored nothing while the guest wrote")
            writer.wait_records(25)

            say("\n--- stop the writer")
            say('  (typing "stop" on the guest\'s console)')
            done = writer.stop()
            rc = vm.wait(EXIT_TIMEOUT)
            if rc != 0:
                raise DemoFailure(f"QEMU exited with code {rc}")
        summary.append(("writer", f"{done.records} records in "
                                  f"{time.monotonic() - t0:.1f} s of guest life"))  # fmt: skip

        say("\n--- checks")
        with nbd_reader(uri) as read:
            report = records.verify(read, done)
        say(f"  every record verifies through the export: {report.records_found} records "
            f"in {report.slots_checked} slots")  # fmt: skip
        chain = disk_chain(server.control, DISK)
        rc = server.stop()
        if rc != 0:
            raise DemoFailure(f"vdisk serve exited with code {rc}")
    say("  vdisk serve stopped (exit code 0)")

    info = cli("disk", "info", DISK, "-d", ds)
    top = ds / info["top"]
    if len(info["chain"]) != len(chain_before) or info["chain"] != chain:
        raise DemoFailure(f"the disk's chain is {info['chain']}, not one image")
    leftovers = leftover_images(ds, info["chain"])
    if leftovers:
        raise DemoFailure(f"leftover images in {ds / 'images'}: {', '.join(leftovers)}")
    qemu_img.check_clean(top, allow_leaks=False)
    say(f"  the disk is one image again: {info['top']}; no other file in images/; "
        "qemu-img check clean")  # fmt: skip
    summary.append(("disk", f"one image again ({info['top']}), no leftover delta, clean"))

    report = records.verify_image(top, done)
    say(f"  and in the image, read by qemu-img: {report.records_found} records verify")
    summary.append(("records", f"all {report.records_found} verify (export and image)"))

    qemu_img.check_clean(backup_path, allow_leaks=False)
    with image_reader(backup_path) as read:
        at_snapshot, report = verify_prefix(read, layout)
    if at_snapshot.records == 0:
        raise DemoFailure("the backup holds no record of the run")
    say(f"  the backup holds records 1..{at_snapshot.records} of run {layout.run}, every one "
        f"intact, and none later: the disk at the snapshot (the writer had reported record "
        f"{seq_at_backup} when vdisk backup started); qemu-img check clean")  # fmt: skip
    summary.append(("backup", f"records 1..{at_snapshot.records}, intact, standalone, clean"))
    summary.append((
        "consolidation",
        f"{human_bytes(figures['copy_set_bytes'])} copy set, "
        f"{human_bytes(figures['bytes_copied'])} copied in {figures['passes']} pass, "
        f"{human_bytes(figures['bytes_mirrored'])} mirrored, "
        f"{figures['duration_s']:.2f} s, pivot pause {figures['pivot_pause_ms']:.1f} ms",
    ))  # fmt: skip

    summary += run_replication(ds, workdir, image, done)
    return summary


def main(argv: list[str] | None = None) -> int:
    return demo_main("lifedemo", __doc__ or "", run, argv,
                     workdir_help="keep the datastore, backup and logs here (default: "
                                  "temporary)", logs="*.log")


if __name__ == "__main__":
    sys.exit(main())
