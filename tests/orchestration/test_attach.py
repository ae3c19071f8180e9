"""vdisk.attach and docs/attach.md: the documented commands are the ones that work.

The page's snippets must equal what :func:`attach.doc_snippets` renders (the
boot tests build their QEMU options and nbd-client commands with the same
functions). Every QEMU form must attach a live export: a datastore served by
``vdisk serve`` as the page shows it (a Unix socket per disk, or a TCP port
per disk with ``--ports``), or one chain in nbdkit's ``image=`` mode. QEMU
starts paused with the options, and a QMP ``drive-backup`` copies the disk
out through QEMU's NBD client for ``qemu-img compare`` against the image the
disk was imported from.
"""

from __future__ import annotations

import grp
import os
import re
import shlex
import shutil
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdisk import attach, qemu_img, qemu_io
from vdisk.lab.machine import Machine, binary
from vdisk.lab.vdiskrun import doc_server, vdisk
from vdisk.nbdkit import NbdkitServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "attach.md"
MiB = 1024 * 1024
DISK = attach.EXAMPLE_DISK
_SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```\w*\n(.*?)\n```", re.S)


def doc_snippets() -> dict[str, str]:
    return dict(_SNIPPET.findall(DOC.read_text()))


def test_doc_shows_exactly_the_rendered_snippets() -> None:
    assert doc_snippets() == attach.doc_snippets()


def test_doc_shell_snippets_parse() -> None:
    for name, text in attach.doc_snippets().items():
        if not name.startswith("libvirt"):
            args = shlex.split(text.replace("\\\n", " "))
            assert args[0] in ("qemu-system-x86_64", "nbd-client", "vdisk"), name


@pytest.mark.parametrize("name", ["libvirt-unix", "libvirt-tcp", "libvirt-reconnect"])
def test_libvirt_snippets_are_network_nbd_disks(name: str) -> None:
    disk = ET.fromstring(attach.doc_snippets()[name])
    assert (disk.tag, disk.get("type"), disk.get("device")) == ("disk", "network", "disk")
    driver, source = disk.find("driver"), disk.find("source")
    assert driver is not None and driver.get("type") == "raw"
    assert source is not None and source.get("protocol") == "nbd"
    assert source.get("name") == DISK
    host = source.find("host")
    assert host is not None
    if name == "libvirt-tcp":
        assert host.attrib == {"name": attach.EXAMPLE_HOST, "port": str(attach.EXAMPLE_PORTS[0])}
    else:
        assert host.attrib == {"transport": "unix", "socket": attach.EXAMPLE_SOCKET}
    reconnect = source.find("reconnect")
    if name == "libvirt-reconnect":
        assert reconnect is not None
        assert reconnect.attrib == {"delay": str(attach.EXAMPLE_RECONNECT_DELAY)}
    else:
        assert reconnect is None


def test_option_values_escape_commas() -> None:
    assert attach.qemu_drive_args("nbd+unix:///?socket=/a,b.sock") == [
        "-drive",
        "file=nbd+unix:///?socket=/a,,b.sock,format=raw,if=virtio",
    ]
    args = attach.qemu_blockdev_args(socket="/a,b.sock", bootindex=None)
    assert args[1] == "driver=nbd,node-name=vdisk0,server.type=unix,server.path=/a,,b.sock"
    assert args[3] == "virtio-blk-pci,drive=vdisk0"


def test_nbd_node_options() -> None:
    assert attach.nbd_node(host="::1", port=10810, export="d", reconnect_delay=5) == (
        "driver=nbd,server.type=inet,server.host=::1,server.port=10810,export=d,reconnect-delay=5"
    )
    assert attach.qemu_blockdev_args(socket="/s", export="d", reconnect_delay=0)[1] == (
        "driver=nbd,node-name=vdisk0,server.type=unix,server.path=/s,export=d,reconnect-delay=0"
    )


def test_uris_and_endpoints() -> None:
    assert attach.unix_uri("/run/x.sock") == "nbd+unix:///?socket=/run/x.sock"
    assert attach.unix_uri("/run/x.sock", "my disk") == "nbd+unix:///my%20disk?socket=/run/x.sock"
    assert attach.tcp_uri("127.0.0.1", 10810, "d") == "nbd://127.0.0.1:10810/d"
    assert attach.disk_socket("/srv/ds/run", "vm1") == Path("/srv/ds/run/vm1.sock")


def test_serve_args() -> None:
    assert attach.serve_args("/ds") == ["vdisk", "serve", "-d", "/ds"]
    assert attach.serve_args("/ds", ports=(7, 9), socket_mode="0660", socket_group="g") == [
        "vdisk", "serve", "-d", "/ds", "--ports", "7-9", "--socket-mode", "0660",
        "--socket-group", "g",
    ]  # fmt: skip


def test_blockdev_needs_one_server() -> None:
    with pytest.raises(ValueError):
        attach.qemu_blockdev_args()
    with pytest.raises(ValueError):
        attach.qemu_blockdev_args(socket="/s", host="127.0.0.1")


# --- against live exports ---------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    socket: Path | None
    port: int | None


@pytest.fixture
def datastore(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> tuple[Path, Path]:
    """A datastore (short path: its sockets live in it) with disk0 imported from an
    image with two patterns; (datastore, the image)."""
    path = tmp_path_factory.mktemp("ds")
    image = patterned_image(tmp_path / "source.qcow2")
    vdisk("datastore", "init", path)
    vdisk("disk", "import", DISK, image, "-d", path)
    return path, image


def patterned_image(image: Path) -> Path:
    qemu_img.create(image, size=16 * MiB)
    qemu_io.run(image, "write -P 0x5a 0 1M", "write -P 0xa5 9M 64k", fmt="qcow2")
    return image


Form = Callable[[Served], list[str]]
FORMS: dict[str, Form] = {
    "drive-unix": lambda s: attach.qemu_drive_args(attach.unix_uri(s.socket or "", DISK)),
    "drive-tcp": lambda s: attach.qemu_drive_args(attach.tcp_uri("127.0.0.1", s.port or 0, DISK)),
    "blockdev-unix": lambda s: attach.qemu_blockdev_args(
        socket=s.socket, export=DISK, reconnect_delay=attach.EXAMPLE_RECONNECT_DELAY
    ),
    "blockdev-tcp": lambda s: attach.qemu_blockdev_args(
        host="127.0.0.1",
        port=s.port or 0,
        export=DISK,
        reconnect_delay=attach.EXAMPLE_RECONNECT_DELAY,
    ),  # fmt: skip
}


def copy_out_through_qemu(args: list[str], workdir: Path, image: Path) -> None:
    """QEMU attaches the export with ``args``; its drive-backup reads like ``image``."""
    with Machine(workdir, args=args, paused=True, accel="tcg") as vm:
        blocks = [b for b in vm.qmp.execute("query-block") if "inserted" in b]
        assert len(blocks) == 1
        inserted = blocks[0]["inserted"]
        assert inserted["image"]["virtual-size"] == 16 * MiB
        assert not inserted["ro"]
        copy = workdir / "copy.raw"
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
    qemu_img.compare(copy, image, fmt_a="raw", force_share=True)  # nbdkit image= holds it


needs_qemu = pytest.mark.skipif(shutil.which(binary()) is None,
                                reason=f"{binary()} is not installed")  # fmt: skip


@needs_qemu
@pytest.mark.parametrize("form", FORMS)
def test_qemu_form_attaches_a_served_disk(
    form: str, datastore: tuple[Path, Path], tmp_path: Path
) -> None:
    path, image = datastore
    tcp = form.endswith("tcp")
    with doc_server(path, tmp_path / "serve.log", tcp=tcp) as server:
        ep = server.endpoint(DISK)
        served = Served(Path(ep["socket"]) if ep["socket"] else None, ep["port"])
        if tcp:
            assert served.port is not None and served.socket is None
            uri = attach.tcp_uri("127.0.0.1", served.port, DISK)
        else:
            assert served.socket == attach.disk_socket(path / "run", DISK)
            uri = attach.unix_uri(served.socket, DISK)
        # the URI the page builds is the one `vdisk disk uri` prints
        assert vdisk(*attach.disk_uri_args(DISK, path)[1:])["uri"] == uri == ep["uri"]
        copy_out_through_qemu(FORMS[form](served), tmp_path, image)
        assert server.stop() == 0


@needs_qemu
def test_qemu_drive_attaches_an_image_mode_export(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = patterned_image(tmp_path / "disk.qcow2")
    with NbdkitServer([f"image={image}"], tmp_path_factory.mktemp("srv")) as server:
        assert server.socket is not None
        args = attach.qemu_drive_args(attach.unix_uri(server.socket))
        copy_out_through_qemu(args, tmp_path, image)


def test_served_sockets_have_the_mode_and_group_asked_for(
    datastore: tuple[Path, Path], tmp_path: Path
) -> None:
    """The permission rule for libvirt (``--socket-mode 0660 --socket-group G``), with a
    group this process may give its files, since libvirt-qemu may not exist here."""
    path, _ = datastore
    mine = os.getegid()
    allowed = [g.gr_gid for g in grp.getgrall()] if os.geteuid() == 0 else os.getgroups()
    gid = next((g for g in allowed if g != mine), mine)
    group = grp.getgrgid(gid).gr_name
    with doc_server(path, tmp_path / "serve.log", socket_mode="0660",
                    socket_group=group) as server:  # fmt: skip
        st = os.stat(server.endpoint(DISK)["socket"])
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        assert server.stop() == 0
