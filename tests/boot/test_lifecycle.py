"""A real guest through snapshot, backup, online consolidation and pivot.

The test guest (vm-images/) is imported into a fresh datastore with ``vdisk
disk import``, served with ``vdisk serve`` and booted from the export, running
the ``writer`` workload: numbered, checksummed 4 KiB records, each written
with O_DIRECT and fsync. While it writes:

1. **Backup.** QMP ``stop`` freezes the guest (QEMU drains its in-flight
   requests first); a raw copy of the export is the reference. ``vdisk backup``
   starts; once its snapshot is in the chain the guest runs again, writing
   during the backup's copy and its consolidation. The backup must equal the
   reference (``qemu-img compare``), be a standalone qcow2 that ``qemu-img
   check`` finds clean, and hold exactly records 1..k of the run with k at
   least the last record the guest reported before the stop.
2. **Online consolidation.** ``vdisk snapshot``; the writer fills the new delta;
   ``vdisk consolidate`` with the writer running: one pass, no more bytes
   copied than the copy set, and no more bytes mirrored than the guest
   could have written while the command ran.
3. **Mirroring, then pivot on demand.** ``vdisk snapshot``, ``vdisk consolidate
   --no-pivot`` stops at ready; the guest writes a known number of records
   while the job is ready (all mirrored) before ``vdisk job complete`` pivots.

Then the writer is stopped from the console and the guest powers off. Every
record verifies, through the export and, after ``vdisk serve`` stopped, in the
image as QEMU reads it; the disk is one image again with nothing else left in
the datastore's ``images/``; ``qemu-img check`` is clean; the built guest
image the disk was imported from is unchanged.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest
from guestharness import BOOT_TIMEOUT, EXIT_TIMEOUT, sha256_file

from vdisk import attach, qemu_img
from vdisk.control import ControlClient
from vdisk.lab import guest, records
from vdisk.lab.machine import Machine
from vdisk.lab.vdiskrun import (
    VdiskServer,
    disk_chain,
    image_reader,
    leftover_images,
    nbd_reader,
    vdisk,
)
from vdisk.lab.writer import WriterConsole, verify_prefix

pytestmark = pytest.mark.boot

MiB = 1024 * 1024
DISK = "vm"
PROGRESS = 10  # the writer reports every PROGRESS records
RECORD = records.RECORD_SIZE


@pytest.fixture
def datastore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lc")  # short: the Unix sockets live in here
    vdisk("datastore", "init", path)
    return path


def check_job(job: dict[str, Any]) -> None:
    assert job["state"] == "done", job
    assert job["passes"] == 1, job
    assert job["bytes_copied"] <= job["copy_set_bytes"], job
    assert job["error"] is None, job


def backup_at_a_frozen_instant(
    vm: Machine, writer: WriterConsole, server: VdiskServer, datastore: Path, tmp_path: Path
) -> tuple[Path, Path, int, dict[str, Any]]:
    """Stop the guest, copy the export, start ``vdisk backup``, resume the guest as soon as
    the backup's snapshot is in the chain. Returns (backup, reference, the last record
    reported before the stop, the backup's JSON)."""
    vm.qmp.execute("stop")  # returns once QEMU drained its in-flight requests
    seq_at_stop = writer.seq()
    reference = tmp_path / "reference.raw"
    qemu_img.convert(server.uri(DISK), reference, "raw", src_fmt="raw")
    chain_before = disk_chain(server.control, DISK)
    backup = tmp_path / "backup.qcow2"
    resumed_during_backup = False
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        ControlClient.connect(server.control) as control,
    ):
        running = pool.submit(vdisk, "backup", DISK, "--to", backup, "-d", datastore)
        deadline = time.monotonic() + 60
        while not running.done() and time.monotonic() < deadline:
            chain = control.execute("query-disks", {"disk": DISK})["disks"][0]["chain"]
            if chain != chain_before:
                resumed_during_backup = True
                break
            time.sleep(0.01)
        vm.qmp.execute("cont")
        result = running.result(timeout=120)
    # the copy of the frozen image takes far longer than one poll
    assert resumed_during_backup, "never saw the backup's snapshot in the chain"
    return backup, reference, seq_at_stop, result


def test_writer_guest_through_backup_consolidate_and_pivot(
    guest_image: guest.GuestImage, datastore: Path, tmp_path: Path
) -> None:
    imported = vdisk("disk", "import", DISK, guest_image.path, "-d", datastore)
    chain_before = imported["chain"]
    assert len(chain_before) == 1
    config = guest.config_text(
        "writer", seconds=0, progress=PROGRESS, offset=guest_image.data_offset, length=64 * MiB
    )
    with VdiskServer(datastore, datastore / "run", log_path=tmp_path / "serve.log") as server:
        uri = server.uri(DISK)
        with Machine(
            tmp_path, args=attach.qemu_drive_args(uri), fw_cfg={guest.FW_CFG_NAME: config}
        ) as vm:
            writer = WriterConsole(vm)
            layout = writer.started(BOOT_TIMEOUT)
            writer.wait_records(3 * PROGRESS)

            # 1. the backup equals the disk at the snapshot
            backup, reference, seq_at_stop, result = backup_at_a_frozen_instant(
                vm, writer, server, datastore, tmp_path
            )
            assert result["snapshot"]["frozen"] == chain_before[0]
            job = result["consolidate"]
            check_job(job)
            assert job["top_before"] == result["snapshot"]["top"]
            assert job["top_after"] == job["target"] == chain_before[0]
            qemu_img.compare(backup, reference, fmt_a="qcow2", fmt_b="raw")
            qemu_img.check_clean(backup, allow_leaks=False)
            info = qemu_img.info(backup)
            assert info["format"] == "qcow2" and "backing-filename" not in info
            assert info["virtual-size"] == guest_image.virtual_size
            with image_reader(backup) as read:
                at_snapshot, _ = verify_prefix(read, layout)
            assert at_snapshot.records >= seq_at_stop > 0
            assert disk_chain(server.control, DISK) == chain_before

            # 2. snapshot; online consolidation and pivot while the writer runs
            snap = vdisk("snapshot", DISK, "-d", datastore)
            assert snap["frozen"] == chain_before[0]
            writer.wait_records(4 * PROGRESS)
            seq_before = writer.seq()
            job = vdisk("consolidate", DISK, "-d", datastore)
            # the record in flight when the command returned is at most the first one
            # reported after that (a report a record late, allowing for console latency)
            seq_after = writer.first_seq_since(len(vm.console_lines)) + PROGRESS
            check_job(job)
            assert job["top_before"] == snap["top"] and job["top_after"] == snap["frozen"]
            assert job["copy_set_bytes"] >= 3 * PROGRESS * 64 * 1024  # a cluster per record
            assert job["bytes_mirrored"] % RECORD == 0
            assert job["bytes_mirrored"] <= RECORD * (seq_after - seq_before), (
                f"mirrored {job['bytes_mirrored']} bytes; the guest wrote at most records "
                f"{seq_before + 1}..{seq_after} while the command ran"
            )

            # 3. consolidate up to ready; guest writes while ready are mirrored; then pivot
            snap = vdisk("snapshot", DISK, "-d", datastore)
            writer.wait_records(2 * PROGRESS)
            ready = vdisk("consolidate", DISK, "--no-pivot", "-d", datastore)
            assert ready["state"] == "ready", ready
            assert ready["passes"] == 1 and ready["bytes_copied"] <= ready["copy_set_bytes"]
            assert len(disk_chain(server.control, DISK)) == 2
            # records up to the next report (and one more, allowing for console latency)
            # may have been written before ready; the 2 * PROGRESS - 1 after them while the
            # job is ready
            writer.wait_records(3 * PROGRESS)
            job = vdisk("job", "complete", str(ready["id"]), "-d", datastore)
            check_job(job)
            assert job["id"] == ready["id"]
            assert job["top_before"] == snap["top"] and job["top_after"] == snap["frozen"]
            assert job["bytes_mirrored"] >= PROGRESS * RECORD, job

            writer.wait_records(PROGRESS)
            done = writer.stop()
            assert vm.wait(EXIT_TIMEOUT) == 0
        assert (done.run, done.offset, done.length) == (layout.run, layout.offset, layout.length)

        with nbd_reader(uri) as read:
            report = records.verify(read, done)
        assert report.records_found == len(done.expected()) == done.records
        jobs = vdisk("job", "list", "-d", datastore)["jobs"]
        # newest first: two consolidations, then the backup's merge back and the backup
        assert [(j["kind"], j["state"]) for j in jobs] == \
            [("consolidate", "done")] * 3 + [("backup", "done")]
        served_chain = disk_chain(server.control, DISK)
        assert server.stop() == 0

    disk = vdisk("disk", "info", DISK, "-d", datastore)
    assert not disk["served"] and disk["job"] is None
    assert disk["chain"] == served_chain
    assert len(disk["chain"]) == len(chain_before)
    assert leftover_images(datastore, disk["chain"]) == []
    top = datastore / disk["top"]
    qemu_img.check_clean(top, allow_leaks=False)
    records.verify_image(top, done)
    assert sha256_file(guest_image.path) == guest_image.sha256
