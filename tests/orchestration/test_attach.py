"""vdisk.attach and docs/attach.md: the documented commands are the ones that work.

The page's snippets must equal what :func:`attach.doc_snippets` renders (the
boot tests build their QEMU options and nbd-client command with the same
functions), and every QEMU form must attach a live vdisk export: QEMU starts
paused with the options, and a QMP ``drive-backup`` copies the disk out
through QEMU's NBD client for ``qemu-img compare`` against the served image.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from vdisk import attach, qemu_img, qemu_io
from vdisk.machine import Machine, binary
from vdisk.nbdkit import NbdkitServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "attach.md"
MiB = 1024 * 1024
_SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```\w*\n(.*?)\n```", re.S)


def doc_snippets() -> dict[str, str]:
    return dict(_SNIPPET.findall(DOC.read_text()))


def test_doc_shows_exactly_the_rendered_snippets() -> None:
    assert doc_snippets() == attach.doc_snippets()


def test_doc_shell_snippets_parse() -> None:
    for name, text in attach.doc_snippets().items():
        if not name.startswith("libvirt"):
            args = shlex.split(text.replace("\\\n", " "))
            assert args[0] in ("qemu-system-x86_64", "nbd-client"), name


@pytest.mark.parametrize("name", ["libvirt-unix", "libvirt-tcp"])
def test_libvirt_snippets_are_network_nbd_disks(name: str) -> None:
    disk = ET.fromstring(attach.doc_snippets()[name])
    assert (disk.tag, disk.get("type"), disk.get("device")) == ("disk", "network", "disk")
    driver, source = disk.find("driver"), disk.find("source")
    assert driver is not None and driver.get("type") == "raw"
    assert source is not None and source.get("protocol") == "nbd"
    host = source.find("host")
    assert host is not None
    if name == "libvirt-unix":
        assert host.attrib == {"transport": "unix", "socket": attach.EXAMPLE_SOCKET}
    else:
        assert host.attrib == {"name": attach.EXAMPLE_HOST, "port": str(attach.NBD_PORT)}
        assert source.get("name") == attach.EXAMPLE_EXPORT


def test_option_values_escape_commas() -> None:
    assert attach.qemu_drive_args("nbd+unix:///?socket=/a,b.sock") == [
        "-drive",
        "file=nbd+unix:///?socket=/a,,b.sock,format=raw,if=virtio",
    ]
    args = attach.qemu_blockdev_args(socket="/a,b.sock", bootindex=None)
    assert args[1] == "driver=nbd,node-name=vdisk0,server.type=unix,server.path=/a,,b.sock"
    assert args[3] == "virtio-blk-pci,drive=vdisk0"


def test_uris() -> None:
    assert attach.unix_uri("/run/x.sock") == "nbd+unix:///?socket=/run/x.sock"
    assert attach.unix_uri("/run/x.sock", "my disk") == "nbd+unix:///my%20disk?socket=/run/x.sock"
    assert attach.tcp_uri("127.0.0.1", 10810, "d") == "nbd://127.0.0.1:10810/d"


def test_blockdev_needs_one_server() -> None:
    with pytest.raises(ValueError):
        attach.qemu_blockdev_args()
    with pytest.raises(ValueError):
        attach.qemu_blockdev_args(socket="/s", host="127.0.0.1")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Form = Callable[[NbdkitServer], list[str]]
FORMS: dict[str, Form] = {
    "drive-unix": lambda s: attach.qemu_drive_args(attach.unix_uri(str(s.socket))),
    "drive-tcp": lambda s: attach.qemu_drive_args(attach.tcp_uri("127.0.0.1", s.tcp_port or 0)),
    "drive-export": lambda s: attach.qemu_drive_args(
        attach.unix_uri(str(s.socket), attach.EXAMPLE_EXPORT)
    ),
    "blockdev-unix": lambda s: attach.qemu_blockdev_args(socket=str(s.socket)),
    "blockdev-tcp": lambda s: attach.qemu_blockdev_args(
        host="127.0.0.1", port=s.tcp_port or 0, export=attach.EXAMPLE_EXPORT
    ),
}


@pytest.mark.skipif(shutil.which(binary()) is None, reason=f"{binary()} is not installed")
@pytest.mark.parametrize("form", FORMS)
def test_qemu_form_attaches_a_live_export(
    form: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img.create(image, size=16 * MiB)
    qemu_io.run(image, "write -P 0x5a 0 1M", "write -P 0xa5 9M 64k", fmt="qcow2")
    tcp_port = free_tcp_port() if form.endswith("tcp") else None
    server = NbdkitServer([f"image={image}"], tmp_path_factory.mktemp("srv"), tcp_port=tcp_port)
    with server, Machine(tmp_path, args=FORMS[form](server), paused=True, accel="tcg") as vm:
        blocks = [b for b in vm.qmp.execute("query-block") if "inserted" in b]
        assert len(blocks) == 1
        inserted = blocks[0]["inserted"]
        assert inserted["image"]["virtual-size"] == 16 * MiB
        assert not inserted["ro"]
        copy = tmp_path / "copy.raw"
        vm.qmp.execute(
            "drive-backup",
            {
                "job-id": "copy",
                "device": blocks[0]["device"] or inserted["node-name"],
                "target": str(copy),
                "format": "raw",
                "sync": "full",
            },
        )
        event = vm.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in event["data"], event
        qemu_img.compare(copy, image, fmt_a="raw", force_share=True)
