"""How clients attach a vdisk export: QEMU options, nbd-client arguments, libvirt XML.

One source for the commands the boot tests run and for the snippets of
docs/attach.md: the documentation's code blocks are rendered by
:func:`doc_snippets` from the same functions, and a test checks that the
document matches them character for character.

An export is raw data (vdisk resolves the qcow2 chain on the server side), so
QEMU must open it with ``format=raw``; the export name is the disk name, or
"" for the default export of ``image=`` mode.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from urllib.parse import quote

StrPath = str | os.PathLike[str]

NBD_PORT = 10809  # the IANA port of NBD, nbd-client's default


def _opt(value: object) -> str:
    """A value in QEMU's key=value,... option syntax: a literal comma is doubled."""
    return str(value).replace(",", ",,")


def unix_uri(socket: StrPath, export: str = "") -> str:
    """``nbd+unix:///EXPORT?socket=PATH``, the NBD URI of a Unix socket export."""
    return f"nbd+unix:///{quote(export)}?socket={quote(os.fspath(socket), safe='/')}"


def tcp_uri(host: str, port: int = NBD_PORT, export: str = "") -> str:
    """``nbd://HOST:PORT/EXPORT``."""
    return f"nbd://{host}:{port}/{quote(export)}"


def qemu_drive_args(uri: str, *, interface: str = "virtio") -> list[str]:
    """QEMU ``-drive`` options attaching the export at ``uri`` as a disk."""
    return ["-drive", f"file={_opt(uri)},format=raw,if={interface}"]


def qemu_blockdev_args(
    *,
    socket: StrPath | None = None,
    host: str | None = None,
    port: int = NBD_PORT,
    export: str = "",
    node_name: str = "vdisk0",
    device: str = "virtio-blk-pci",
    bootindex: int | None = 1,
) -> list[str]:
    """QEMU ``-blockdev driver=nbd`` and ``-device`` options (Unix ``socket`` or TCP ``host``)."""
    if (socket is None) == (host is None):
        raise ValueError("give exactly one of socket and host")
    node = f"driver=nbd,node-name={_opt(node_name)}"
    if socket is not None:
        node += f",server.type=unix,server.path={_opt(os.fspath(socket))}"
    else:
        node += f",server.type=inet,server.host={_opt(host)},server.port={port}"
    if export:
        node += f",export={_opt(export)}"
    dev = f"{device},drive={_opt(node_name)}"
    if bootindex is not None:
        dev += f",bootindex={bootindex}"
    return ["-blockdev", node, "-device", dev]


def nbd_client_args(
    host: str,
    port: int = NBD_PORT,
    device: str = "/dev/nbd0",
    *,
    export: str = "",
) -> list[str]:
    """The ``nbd-client`` command connecting ``device`` to a TCP export."""
    return ["nbd-client", "-N", export, host, str(port), device]


def nbd_client_unix_args(
    socket: StrPath, device: str = "/dev/nbd0", *, export: str = ""
) -> list[str]:
    """The ``nbd-client`` command connecting ``device`` to a Unix socket export."""
    return ["nbd-client", "-unix", "-N", export, os.fspath(socket), device]


def nbd_client_disconnect_args(device: str = "/dev/nbd0") -> list[str]:
    return ["nbd-client", "-d", device]


def libvirt_disk_xml(
    *,
    socket: StrPath | None = None,
    host: str | None = None,
    port: int = NBD_PORT,
    export: str = "",
    target: str = "vda",
) -> str:
    """A libvirt ``<disk type='network'>`` element for the export (Unix socket or TCP)."""
    if (socket is None) == (host is None):
        raise ValueError("give exactly one of socket and host")
    name = f" name='{export}'" if export else ""
    if socket is not None:
        server = f"<host transport='unix' socket='{os.fspath(socket)}'/>"
    else:
        server = f"<host name='{host}' port='{port}'/>"
    return "\n".join(
        [
            "<disk type='network' device='disk'>",
            "  <driver name='qemu' type='raw'/>",
            f"  <source protocol='nbd'{name}>",
            f"    {server}",
            "  </source>",
            f"  <target dev='{target}' bus='virtio'/>",
            "</disk>",
        ]
    )


def shell_command(args: Sequence[str], prefix: Sequence[str] = (), indent: str = "    ") -> str:
    """A command as a user would type it: ``prefix`` on the first line, then one
    option (with its value) per continuation line."""
    lines = [shlex.join(prefix)] if prefix else []
    i = 0
    while i < len(args):
        if args[i].startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            lines.append(shlex.join(args[i : i + 2]))
            i += 2
        else:
            lines.append(shlex.join(args[i : i + 1]))
            i += 1
    if not prefix:
        return " ".join(lines)
    return (" \\\n" + indent).join(lines)


# Example values used in docs/attach.md.
EXAMPLE_SOCKET = "/run/vdisk/disk0.sock"
EXAMPLE_HOST = "127.0.0.1"
EXAMPLE_EXPORT = "disk0"
QEMU_PREFIX = ["qemu-system-x86_64", "-machine", "accel=kvm:tcg", "-m", "1024"]


def doc_snippets() -> dict[str, str]:
    """The code blocks of docs/attach.md, by the name in their ``<!-- snippet: NAME -->`` line."""
    qemu = QEMU_PREFIX
    return {
        "qemu-drive-unix": shell_command(qemu_drive_args(unix_uri(EXAMPLE_SOCKET)), qemu),
        "qemu-drive-tcp": shell_command(qemu_drive_args(tcp_uri(EXAMPLE_HOST)), qemu),
        "qemu-drive-export": shell_command(
            qemu_drive_args(unix_uri(EXAMPLE_SOCKET, EXAMPLE_EXPORT)), qemu
        ),
        "qemu-blockdev-unix": shell_command(qemu_blockdev_args(socket=EXAMPLE_SOCKET), qemu),
        "qemu-blockdev-tcp": shell_command(
            qemu_blockdev_args(host=EXAMPLE_HOST, export=EXAMPLE_EXPORT), qemu
        ),
        "libvirt-unix": libvirt_disk_xml(socket=EXAMPLE_SOCKET),
        "libvirt-tcp": libvirt_disk_xml(host=EXAMPLE_HOST, export=EXAMPLE_EXPORT),
        "nbd-client-tcp": shell_command(nbd_client_args(EXAMPLE_HOST)),
        "nbd-client-unix": shell_command(nbd_client_unix_args(EXAMPLE_SOCKET)),
        "nbd-client-disconnect": shell_command(nbd_client_disconnect_args()),
    }
