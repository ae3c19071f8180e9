"""Real QEMU guests on vdisk exports: boot, in-guest nbd-client, the writer workload.

Every test boots the test guest (vm-images/) from a chain served by nbdkit
with the vdisk plugin: a copy of the guest image as the base, a fresh qcow2
overlay on top; nbd-client in the guest attaches a second disk, of a
datastore served by ``vdisk serve --ports``. The guest's workload comes from
its fw_cfg configuration; its verdict from its serial console. Afterwards
QEMU's own tools judge the images: ``qemu-img check``, ``qemu-io`` pattern
reads, ``qemu-img compare`` against the same writes made by qemu-io, and the
base's sha256.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from guestharness import (
    BOOT_TIMEOUT,
    EXIT_TIMEOUT,
    GuestChain,
    sha256_file,
)

from vdisk import attach, qemu_img, qemu_io
from vdisk.lab import guest, records
from vdisk.lab.machine import Machine
from vdisk.lab.vdiskrun import doc_server, vdisk
from vdisk.nbdkit import NbdkitServer

pytestmark = pytest.mark.boot

KiB = 1024
MiB = 1024 * KiB
DISK2 = "second"  # the disk nbd-client attaches in the guest


def boot_args(how: str, server: NbdkitServer) -> list[str]:
    """The disk options the user documentation shows (docs/attach.md)."""
    assert server.socket is not None
    if how == "drive":
        return attach.qemu_drive_args(attach.unix_uri(server.socket))
    return attach.qemu_blockdev_args(socket=server.socket)


def verdict(vm: Machine, workload: str) -> dict[str, str]:
    """Wait for the workload's PASS (or FAIL) and the power-off; return the fields
    of every ``VDISK-<WORKLOAD>:`` line seen."""
    match = vm.wait_for_line(guest.marker_pattern(workload, "(PASS|FAIL.*)"), BOOT_TIMEOUT)
    assert match.group(1) == "PASS", f"guest says {match.group(0)}\n{vm.console_tail()}"
    assert vm.wait(EXIT_TIMEOUT) == 0
    fields: dict[str, str] = {}
    prefix = f"VDISK-{workload.upper()}: "
    for line in vm.console_lines:
        if line.startswith(prefix):
            fields.update(guest.marker_fields(line[len(prefix) :]))
    return fields


def data_extents(image: Path) -> list[tuple[int, int]]:
    """(start, length) of the guest ranges whose data the image itself holds (not its
    backing), adjacent ranges merged whatever their order in the file."""
    merged: list[tuple[int, int]] = []
    for e in qemu_img.map(image):
        if e["depth"] != 0 or not e["data"]:
            continue
        if merged and merged[-1][0] + merged[-1][1] == e["start"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e["length"])
        else:
            merged.append((e["start"], e["length"]))
    return merged


def expect_writes(base: Path, name: str, writes: Sequence[str]) -> Path:
    """A qcow2 overlay on ``base`` with the same writes made by qemu-io: QEMU's oracle."""
    expected = base.parent / name
    qemu_img.create(expected, backing=base.name, backing_fmt="qcow2")
    qemu_io.run(expected, *writes, fmt="qcow2")
    return expected


def assert_base_unchanged(chain: GuestChain) -> None:
    qemu_img.check_clean(chain.base, allow_leaks=False)
    assert sha256_file(chain.base) == chain.base_sha256, "the base image was modified"


@pytest.mark.parametrize("how", ["drive", "blockdev"])
def test_guest_boots_from_export_and_writes_into_overlay(
    how: str, guest_chain: GuestChain, guest_image: guest.GuestImage, server_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    rng = random.Random()
    pattern = rng.randrange(0x10, 0xF0)
    offset = guest_image.data_offset + rng.randrange(16) * MiB
    length = 1 * MiB
    config = guest.config_text("selftest", pattern=f"0x{pattern:02x}", offset=offset, length=length)
    with NbdkitServer([f"image={guest_chain.top}"], server_dir) as server:
        with Machine(
            tmp_path, args=boot_args(how, server), fw_cfg={guest.FW_CFG_NAME: config}
        ) as vm:
            fields = verdict(vm, "selftest")
    assert fields["pattern"] == f"0x{pattern:02x}"
    assert (int(fields["offset"]), int(fields["length"])) == (offset, length)
    assert fields["sha256"] == hashlib.sha256(bytes([pattern]) * length).hexdigest()

    qemu_img.check_clean(guest_chain.top, allow_leaks=False)
    qemu_io.run(guest_chain.top, f"read -P 0x{pattern:02x} {offset} {length}", fmt="qcow2")
    # The guest wrote its pattern and nothing else: the overlay holds exactly that
    # range, and reads like qemu-io's own write of the pattern on the same base.
    assert data_extents(guest_chain.top) == [(offset, length)]
    expected = expect_writes(
        guest_chain.base, "expected.qcow2", [f"write -P 0x{pattern:02x} {offset} {length}"]
    )
    qemu_img.compare(guest_chain.top, expected)
    assert_base_unchanged(guest_chain)


def _second_export(images: Path) -> tuple[Path, Path, str]:
    """base2 (64 MiB, two patterns in its first 2 MiB) and an empty overlay top2."""
    base = images / "second-base.qcow2"
    qemu_img.create(base, size=64 * MiB)
    qemu_io.run(base, "write -P 0x11 0 1M", "write -P 0x22 1M 1M", fmt="qcow2")
    top = images / "second-top.qcow2"
    qemu_img.create(top, backing=base.name, backing_fmt="qcow2")
    return base, top, sha256_file(base)


def test_nbd_client_in_guest_reads_and_writes_a_served_disk(
    guest_chain: GuestChain, server_dir: Path, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    """nbd-client in the guest attaches a disk of a datastore served by ``vdisk serve
    --ports``: the disk's own TCP port, the disk's name as the export."""
    base2, top2, _ = _second_export(guest_chain.base.parent)
    datastore = tmp_path_factory.mktemp("nc")
    vdisk("datastore", "init", datastore)
    imported = vdisk("disk", "import", DISK2, top2, "-d", datastore)["chain"]
    top, base = (datastore / image for image in imported)
    base_sha256 = sha256_file(base)
    pattern, offset, length = 0x77, 1536 * KiB, 2 * MiB  # across base data and empty space
    with NbdkitServer([f"image={guest_chain.top}"], server_dir) as server:
        with doc_server(datastore, tmp_path / "serve.log", tcp=True) as second:
            # QEMU user networking: the host's 127.0.0.1 is 10.0.2.2 in the guest
            port = second.endpoint(DISK2)["port"]
            command = attach.nbd_client_args("10.0.2.2", port, export=DISK2)
            config = guest.config_text(
                "nbdclient", nbd_client_arg=command, read_offset=0, read_length=2 * MiB,
                pattern=f"0x{pattern:02x}", offset=offset, length=length,
            )  # fmt: skip
            with Machine(
                tmp_path,
                args=boot_args("drive", server),
                network=True,
                fw_cfg={guest.FW_CFG_NAME: config},
            ) as vm:
                fields = verdict(vm, "nbdclient")
            assert second.stop() == 0

    assert int(fields["size"]) == 64 * MiB
    host_view = b"\x11" * MiB + b"\x22" * MiB
    assert fields["sha256"] == hashlib.sha256(bytes([pattern]) * length).hexdigest()
    read_line = next(line for line in vm.console_lines if "VDISK-NBDCLIENT: read " in line)
    assert guest.marker_fields(read_line)["sha256"] == hashlib.sha256(host_view).hexdigest()

    qemu_img.check_clean(top, allow_leaks=False)
    qemu_io.run(
        top,
        "read -P 0x11 0 1M",
        "read -P 0x22 1M 512k",
        f"read -P 0x{pattern:02x} {offset} {length}",
        f"read -P 0 {offset + length} 1M",
        fmt="qcow2",
    )
    expected = expect_writes(base2, "second-expected.qcow2", [f"write -P 0x77 {offset} {length}"])
    qemu_img.compare(top, expected)
    assert sha256_file(base) == base_sha256
    assert_base_unchanged(guest_chain)


def _run_writer(
    chain: GuestChain, server_dir: Path, workdir: Path, *, stop_after: int | None, **params: int
) -> records.WriterSummary:
    config = guest.config_text("writer", **params)
    with NbdkitServer([f"image={chain.top}"], server_dir) as server:
        with Machine(
            workdir, args=boot_args("drive", server), fw_cfg={guest.FW_CFG_NAME: config}
        ) as vm:
            if stop_after is not None:
                vm.wait_for_line(guest.marker_pattern("writer", f"PROGRESS seq={stop_after}"),
                                 BOOT_TIMEOUT)  # fmt: skip
                vm.console_write("stop\n")
            done = vm.wait_for_line(
                guest.marker_pattern("writer", "(DONE .*|FAIL.*)"), BOOT_TIMEOUT
            )
            assert done.group(1).startswith("DONE"), f"{done.group(0)}\n{vm.console_tail()}"
            assert vm.wait(EXIT_TIMEOUT) == 0
    fields = guest.marker_fields(done.group(1))
    summary = records.WriterSummary.from_fields(fields)
    expected_stop = "stop" if stop_after is not None else "time"
    assert fields["stopped_by"] == expected_stop
    qemu_img.check_clean(chain.top, allow_leaks=False)
    report = records.verify_image(chain.top, summary)
    assert report.records_found == len(summary.expected()) > 0
    assert_base_unchanged(chain)
    return summary


def test_writer_records_verify_after_stop(
    guest_chain: GuestChain, guest_image: guest.GuestImage, server_dir: Path, tmp_path: Path
) -> None:
    """Records spread over the whole data partition; the host stops the writer."""
    summary = _run_writer(
        guest_chain, server_dir, tmp_path, stop_after=40, seconds=100, progress=20
    )
    assert summary.records >= 40
    assert (summary.offset, summary.length) == (guest_image.data_offset, guest_image.data_size)
    # every record sits in its own cluster of the overlay, nothing outside the region
    for start, length in data_extents(guest_chain.top):
        assert summary.offset <= start and start + length <= summary.offset + summary.length


def test_writer_records_verify_after_wraparound(
    guest_chain: GuestChain, guest_image: guest.GuestImage, server_dir: Path, tmp_path: Path
) -> None:
    """A 16-slot region, 40 records or more: later records overwrite earlier
    ones, the last ones win. (Stopped by count, not time: under TCG on a busy
    host a few seconds may hold a single record.)"""
    offset = guest_image.data_offset + 8 * MiB
    summary = _run_writer(
        guest_chain, server_dir, tmp_path, stop_after=40,
        seconds=300, offset=offset, length=16 * 4096, stride=5, progress=20,
    )  # fmt: skip
    assert summary.records > summary.slots, "the writer did not wrap around the region"
    assert data_extents(guest_chain.top) == [(offset, 64 * KiB)]
