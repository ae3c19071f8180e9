"""Boot a real QEMU guest from a vdisk export, end to end.

    python -m vdisk.lab.bootdemo [--workdir DIR] [--guest-dir DIR] [--verbose]

1. Builds the test guest with vm-images/build (cached: instant when unchanged).
2. Puts a fresh qcow2 overlay on it and serves the overlay with nbdkit and the
   vdisk plugin on a Unix socket; serves a second, empty-ish disk on
   127.0.0.1 for nbd-client.
3. Boots the guest three times from the export, each with its workload
   chosen through fw_cfg: ``selftest`` (checks its boot files, writes and
   reads back a pattern), ``nbdclient`` (attaches the second disk over TCP
   with nbd-client, reads and writes it), ``writer`` (checksummed records for
   a few seconds). The guest's console lines that matter are shown as they come.
4. Checks with QEMU's tools: ``qemu-img check`` of both overlays, the
   patterns read back with qemu-io, the writer's records verified, and the
   base image byte for byte unchanged.

Exit code 0 on success; otherwise 1 with a one-line reason on stderr.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from pathlib import Path

from .. import attach, qemu_img, qemu_io
from ..nbdkit import NbdkitServer
from . import guest, records
from .demo import file_sha256 as sha256_file
from .demokit import BOOT_TIMEOUT, DemoFailure, demo_main, field
from .machine import Machine, detect_accel

MiB = 1024 * 1024


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def boot(
    workdir: Path, name: str, disk: list[str], config: str, *, network: bool = False
) -> list[str]:
    """Boot the guest, echo its ``VDISK-`` lines, return them; fail unless it passes."""
    print(f"\n--- boot {name}: {config.splitlines()[0]}", flush=True)
    start = time.monotonic()
    lines: list[str] = []
    with Machine(
        workdir, args=disk, fw_cfg={guest.FW_CFG_NAME: config}, network=network, name=name
    ) as vm:
        while True:
            line = vm.wait_for_line(r"^VDISK-", BOOT_TIMEOUT).string
            lines.append(line)
            print(f"[{time.monotonic() - start:6.2f}s] {line}", flush=True)
            if line.startswith("VDISK-DONE:"):
                break
        returncode = vm.wait(30)
    if "status=pass" not in lines[-1] or returncode != 0:
        raise DemoFailure(f"guest {name} failed: {lines[-2] if len(lines) > 1 else lines[-1]}")
    return lines


def run(workdir: Path, guest_dir: Path | None) -> list[tuple[str, str]]:
    summary: list[tuple[str, str]] = []
    t0 = time.monotonic()
    image = guest.build(guest_dir)
    summary.append(("guest image", f"{image.path} ({time.monotonic() - t0:.1f} s to build/check)"))
    accel = detect_accel()
    summary.append(("accelerator", f"{accel.name} ({accel.reason})"))
    base_sha = sha256_file(image.path)

    top = workdir / "top.qcow2"
    qemu_img.create(top, backing=str(image.path), backing_fmt="qcow2")
    second_base = workdir / "second-base.qcow2"
    qemu_img.create(second_base, size=64 * MiB)
    qemu_io.run(second_base, "write -P 0x11 0 1M", fmt="qcow2")
    second = workdir / "second.qcow2"
    qemu_img.create(second, backing=second_base.name, backing_fmt="qcow2")
    print(f"chain: {top} -> {image.path}")

    selftest_pattern = 0x3C
    with (
        NbdkitServer([f"image={top}"], workdir, name="boot") as server,
        NbdkitServer([f"image={second}"], workdir, name="second", tcp_port=free_tcp_port()) as tcp,
    ):
        assert server.socket is not None and tcp.tcp_port is not None
        disk = attach.qemu_drive_args(attach.unix_uri(server.socket))
        print(f"serving {top.name} on {server.socket}, {second.name} on {tcp.address}")
        print("QEMU disk options:", " ".join(disk))

        t = time.monotonic()
        lines = boot(workdir, "selftest", disk, guest.config_text("selftest", pattern="0x3c"))
        summary.append(("selftest boot", f"PASS in {time.monotonic() - t:.1f} s"))
        wrote = field(lines, "VDISK-SELFTEST: wrote ")

        t = time.monotonic()
        command = attach.nbd_client_args("10.0.2.2", tcp.tcp_port)
        config = guest.config_text("nbdclient", nbd_client_arg=command, pattern="0x77")
        boot(workdir, "nbdclient", disk, config, network=True)
        summary.append(("nbd-client boot", f"PASS in {time.monotonic() - t:.1f} s"))

        t = time.monotonic()
        # records go to the second half of the data partition, clear of the selftest pattern
        region = {
            "offset": image.data_offset + image.data_size // 2,
            "length": image.data_size // 2,
        }
        config = guest.config_text("writer", seconds=4, progress=25, **region)
        lines = boot(workdir, "writer", disk, config)
        done = records.WriterSummary.from_fields(field(lines, "VDISK-WRITER: DONE "))
        summary.append(("writer boot", f"{done.records} records in {time.monotonic() - t:.1f} s"))

    for image_path in (top, second):
        qemu_img.check_clean(image_path, allow_leaks=False)
    summary.append(("qemu-img check", "both overlays clean"))
    offset, length = int(wrote["offset"]), int(wrote["length"])
    qemu_io.run(top, f"read -P 0x{selftest_pattern:02x} {offset} {length}", fmt="qcow2")
    qemu_io.run(second, "read -P 0x11 0 1M", "read -P 0x77 1M 1M", fmt="qcow2")
    summary.append(("qemu-io", "the guests' patterns read back from the overlays"))
    report = records.verify_image(top, done)
    summary.append(
        ("writer records", f"{report.records_found} verified in {report.slots_checked} slots")
    )
    if sha256_file(image.path) != base_sha:
        raise DemoFailure(f"the base image {image.path} changed")
    summary.append(("base image", "unchanged (sha256)"))
    return summary


def main(argv: list[str] | None = None) -> int:
    return demo_main("bootdemo", __doc__ or "", run, argv,
                     workdir_help="keep images and logs here (default: temporary)",
                     logs="*.console.log", quiet_level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
