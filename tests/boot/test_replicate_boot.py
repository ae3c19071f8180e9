"""A real guest boots from a disk replicated to a second datastore.

The test guest is imported into a datastore as disk ``vm``; ``vdisk
snapshot`` freezes its image and ``vdisk disk create vm-clone --backing
FROZEN`` makes a linked clone of it, into which a pattern is written through
``vdisk serve`` (so the clone has data of its own and a fresh content ID).
``vdisk replicate`` takes ``vm`` to an empty target (every layer copied),
then ``vm-clone`` (its top copied; the frozen image found on the target by
content ID and linked, nothing below it moved). The target, served by ``vdisk
serve``, boots the guest from the export ``vm-clone`` running the
``selftest`` workload. Then: the selftest passed; the clone on the target
holds its pattern and the selftest's, ``vm`` beside it neither and still
reads like the source (``qemu-img compare``); every image of the target is
clean; the built guest image is unchanged.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import nbd
import pytest
from guestharness import BOOT_TIMEOUT, EXIT_TIMEOUT, sha256_file

from vdisk import attach, qemu_img
from vdisk.lab import guest
from vdisk.lab.machine import Machine
from vdisk.lab.vdiskrun import VdiskServer, nbd_reader, vdisk

pytestmark = pytest.mark.boot

MiB = 1024 * 1024
DISK, CLONE = "vm", "vm-clone"


@pytest.fixture
def datastores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A source datastore and the path of a target that does not exist yet (short paths:
    the Unix sockets live in them)."""
    source = tmp_path_factory.mktemp("src")
    vdisk("datastore", "init", source)
    return source, tmp_path_factory.mktemp("dst") / "ds"


def write_through_export(datastore: Path, disk: str, offset: int, data: bytes, log: Path) -> None:
    with VdiskServer(datastore, datastore / "run", log_path=log) as server:
        h = nbd.NBD()
        h.connect_uri(server.uri(disk))
        try:
            h.pwrite(data, offset)
            h.flush()
        finally:
            h.shutdown()
        assert server.stop() == 0


def chain_of(datastore: Path, disk: str) -> list[str]:
    chain: list[str] = vdisk("disk", "info", disk, "-d", datastore)["chain"]
    return chain


def by_source(result: dict[str, Any]) -> dict[Path, dict[str, Any]]:
    return {Path(layer["source"]).resolve(): layer for layer in result["layers"]}


def test_guest_boots_from_replicated_linked_clone(
    guest_image: guest.GuestImage, datastores: tuple[Path, Path], tmp_path: Path
) -> None:
    source, target = datastores
    rng = random.Random()
    mark, pattern = rng.sample(range(0x10, 0xF0), 2)
    length = 1 * MiB
    mark_offset = guest_image.data_offset + rng.randrange(8, 64) * MiB
    selftest_offset = guest_image.data_offset + rng.randrange(64, 128) * MiB

    vdisk("disk", "import", DISK, guest_image.path, "-d", source)
    snap = vdisk("snapshot", DISK, "-d", source)
    frozen = (source / snap["frozen"]).resolve()
    clone = vdisk("disk", "create", CLONE, "-d", source, "--backing", snap["frozen"])
    assert clone["backing"] == snap["frozen"]
    write_through_export(source, CLONE, mark_offset, bytes([mark]) * length,
                         tmp_path / "serve-source.log")  # fmt: skip
    source_vm_chain = chain_of(source, DISK)
    source_clone_chain = chain_of(source, CLONE)
    assert source_clone_chain[1:] == source_vm_chain[1:] == [snap["frozen"]]

    # vm into an empty target: every layer copied
    vm = vdisk("replicate", DISK, "-d", source, "--to", target, "--verify")
    assert (vm["copied"], vm["linked"], vm["verified"]) == (len(source_vm_chain), 0, True)
    assert all(layer["action"] == "copied" and layer["bytes_moved"] > 0
               for layer in vm["layers"])  # fmt: skip
    frozen_copy = by_source(vm)[frozen]

    # the clone: its own top copied, the shared frozen image linked to vm's copy of it
    cl = vdisk("replicate", CLONE, "-d", source, "--to", target, "--verify")
    assert (cl["copied"], cl["linked"], cl["verified"]) == (1, 1, True), cl
    top_layer, linked = cl["layers"]
    assert top_layer["action"] == "copied"
    assert Path(top_layer["source"]).resolve() == (source / source_clone_chain[0]).resolve()
    assert linked["action"] == "linked" and linked["bytes_moved"] == 0
    assert Path(linked["source"]).resolve() == frozen
    assert linked["image"] == frozen_copy["image"]
    assert linked["content_id"] == frozen_copy["content_id"] is not None
    assert cl["bytes_moved"] == top_layer["bytes_moved"] < frozen_copy["bytes_moved"]

    target_vm_chain = chain_of(target, DISK)
    target_clone_chain = chain_of(target, CLONE)
    assert len(target_vm_chain) == len(source_vm_chain) + 1  # a new empty top on the copies
    assert target_clone_chain[1] == top_layer["image"]
    assert target_clone_chain[2:] == target_vm_chain[target_vm_chain.index(linked["image"]) :]
    assert len(list((target / "images").glob("*.qcow2"))) == len(
        set(target_vm_chain) | set(target_clone_chain)
    )

    config = guest.config_text("selftest", pattern=f"0x{pattern:02x}", offset=selftest_offset,
                               length=length)  # fmt: skip
    with VdiskServer(target, target / "run", log_path=tmp_path / "serve.log") as server:
        assert sorted(server.exports) == [DISK, CLONE]
        with Machine(
            tmp_path, args=attach.qemu_drive_args(server.uri(CLONE)),
            fw_cfg={guest.FW_CFG_NAME: config},
        ) as machine:  # fmt: skip
            verdict = machine.wait_for_line(
                guest.marker_pattern("selftest", "(PASS|FAIL.*)"), BOOT_TIMEOUT
            )
            assert verdict.group(1) == "PASS", f"{verdict.group(0)}\n{machine.console_tail()}"
            assert machine.wait(EXIT_TIMEOUT) == 0
        wrote = next(line for line in machine.console_lines
                     if line.startswith("VDISK-SELFTEST: wrote "))  # fmt: skip
        fields = guest.marker_fields(wrote)
        assert (int(fields["offset"]), int(fields["length"])) == (selftest_offset, length)
        assert fields["sha256"] == hashlib.sha256(bytes([pattern]) * length).hexdigest()

        with nbd_reader(server.uri(CLONE)) as read:
            assert read(mark_offset, length) == bytes([mark]) * length
            assert read(selftest_offset, length) == bytes([pattern]) * length
        with nbd_reader(server.uri(DISK)) as read:
            assert read(mark_offset, length) != bytes([mark]) * length
            assert read(selftest_offset, length) != bytes([pattern]) * length
        assert server.stop() == 0

    qemu_img.compare(target / target_vm_chain[0], source / source_vm_chain[0])
    for image in (target / "images").glob("*.qcow2"):
        qemu_img.check_clean(image, allow_leaks=False)
    assert sha256_file(guest_image.path) == guest_image.sha256
