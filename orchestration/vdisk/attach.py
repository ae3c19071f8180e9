"""How clients attach a vdisk export: QEMU options, nbd-client arguments, libvirt XML.

One source for the commands the tests run and for the snippets of
docs/attach.md: the documentation's code blocks are rendered by
:func:`doc_snippets` from the same functions, and a test checks that the
document matches them character for character.

``vdisk serve`` gives each disk its own endpoint (docs/serve.md): a Unix
socket ``RUNDIR/NAME.sock`` or a TCP port of ``--ports``, and the export name
is the disk's name. An export is raw data (vdisk resolves the qcow2 chain on
the server side), so QEMU must open it with ``format=raw``. In ``image=``
mode (one chain, no datastore) the export is the default one, name "".
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

StrPath = str | os.PathLike[str]

NBD_PORT = 10809  # the IANA port of NBD, nbd-client's default


def _opt(value: object) -> str:
    """A value in QEMU's key=value,... option syntax: a literal comma is doubled."""
    return str(value).replace(",", ",,")


# --- endpoints -------------------------------------------------------------------------


def disk_socket(rundir: StrPath, disk: str) -> Path:
    """``RUNDIR/NAME.sock``: the Unix socket ``vdisk serve`` gives a disk."""
    return Path(rundir) / f"{disk}.sock"


def unix_uri(socket: StrPath, export: str = "") -> str:
    """``nbd+unix:///EXPORT?socket=PATH``, the NBD URI of a Unix socket export."""
    return f"nbd+unix:///{quote(export)}?socket={quote(os.fspath(socket), safe='/')}"


def tcp_uri(host: str, port: int = NBD_PORT, export: str = "") -> str:
    """``nbd://HOST:PORT/EXPORT``."""
    return f"nbd://{host}:{port}/{quote(export)}"


def serve_args(
    datastore: StrPath,
    *,
    ports: tuple[int, int] | None = None,
    socket_mode: str | None = None,
    socket_group: str | None = None,
) -> list[str]:
    """``vdisk serve -d DIR``: Unix sockets in DIR/run, or a TCP port per disk of
    ``ports`` (first, last); ``socket_mode`` and ``socket_group`` for the sockets."""
    args = ["vdisk", "serve", "-d", os.fspath(datastore)]
    if ports is not None:
        args += ["--ports", f"{ports[0]}-{ports[1]}"]
    if socket_mode is not None:
        args += ["--socket-mode", socket_mode]
    if socket_group is not None:
        args += ["--socket-group", socket_group]
    return args


def disk_uri_args(disk: str, datastore: StrPath) -> list[str]:
    """``vdisk disk uri NAME -d DIR``: prints the URI of the disk's endpoint."""
    return ["vdisk", "disk", "uri", disk, "-d", os.fspath(datastore)]


# --- QEMU ------------------------------------------------------------------------------


def qemu_drive_args(uri: str, *, interface: str = "virtio") -> list[str]:
    """QEMU ``-drive`` options attaching the export at ``uri`` as a disk."""
    return ["-drive", f"file={_opt(uri)},format=raw,if={interface}"]


def nbd_node(
    *,
    socket: StrPath | None = None,
    host: str | None = None,
    port: int = NBD_PORT,
    export: str = "",
    node_name: str | None = None,
    reconnect_delay: int | None = None,
) -> str:
    """QEMU's ``driver=nbd,...`` block node options (Unix ``socket`` or TCP ``host``):
    the value of ``-blockdev``, or of ``qemu-io --image-opts``.

    ``reconnect_delay``: when the connection drops, QEMU reconnects and holds
    the requests for up to that many seconds, then retries them on the new
    connection, instead of failing them at once.
    """
    if (socket is None) == (host is None):
        raise ValueError("give exactly one of socket and host")
    node = "driver=nbd"
    if node_name is not None:
        node += f",node-name={_opt(node_name)}"
    if socket is not None:
        node += f",server.type=unix,server.path={_opt(os.fspath(socket))}"
    else:
        node += f",server.type=inet,server.host={_opt(host)},server.port={port}"
    if export:
        node += f",export={_opt(export)}"
    if reconnect_delay is not None:
        node += f",reconnect-delay={reconnect_delay}"
    return node


def qemu_blockdev_args(
    *,
    socket: StrPath | None = None,
    host: str | None = None,
    port: int = NBD_PORT,
    export: str = "",
    reconnect_delay: int | None = None,
    node_name: str = "vdisk0",
    device: str = "virtio-blk-pci",
    bootindex: int | None = 1,
) -> list[str]:
    """QEMU ``-blockdev driver=nbd`` and ``-device`` options (see :func:`nbd_node`)."""
    node = nbd_node(socket=socket, host=host, port=port, export=export, node_name=node_name,
                    reconnect_delay=reconnect_delay)  # fmt: skip
    dev = f"{device},drive={_opt(node_name)}"
    if bootindex is not None:
        dev += f",bootindex={bootindex}"
    return ["-blockdev", node, "-device", dev]


# --- nbd-client (the Linux kernel's NBD client) -----------------------------------------


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


# --- libvirt -----------------------------------------------------------------------------


def libvirt_disk_xml(
    *,
    socket: StrPath | None = None,
    host: str | None = None,
    port: int = NBD_PORT,
    export: str = "",
    reconnect_delay: int | None = None,
    target: str = "vda",
) -> str:
    """A libvirt ``<disk type='network'>`` element for the export (Unix socket or TCP).

    ``reconnect_delay`` adds ``<reconnect delay='N'/>`` to the source: QEMU's
    ``reconnect-delay``, known to libvirt 9.2 and later.
    """
    if (socket is None) == (host is None):
        raise ValueError("give exactly one of socket and host")
    name = f" name='{export}'" if export else ""
    if socket is not None:
        server = f"<host transport='unix' socket='{os.fspath(socket)}'/>"
    else:
        server = f"<host name='{host}' port='{port}'/>"
    source = [f"    {server}"]
    if reconnect_delay is not None:
        source.append(f"    <reconnect delay='{reconnect_delay}'/>")
    return "\n".join(
        [
            "<disk type='network' device='disk'>",
            "  <driver name='qemu' type='raw'/>",
            f"  <source protocol='nbd'{name}>",
            *source,
            "  </source>",
            f"  <target dev='{target}' bus='virtio'/>",
            "</disk>",
        ]
    )


# --- the documentation's snippets ------------------------------------------------------------


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
EXAMPLE_DATASTORE = "/srv/vdisk"
EXAMPLE_DISK = "disk0"
EXAMPLE_SOCKET = os.fspath(disk_socket(f"{EXAMPLE_DATASTORE}/run", EXAMPLE_DISK))
EXAMPLE_HOST = "127.0.0.1"
EXAMPLE_PORTS = (NBD_PORT, NBD_PORT + 30)  # the disk0's port: the first of the range
EXAMPLE_RECONNECT_DELAY = 10
EXAMPLE_LIBVIRT_GROUP = "libvirt-qemu"
EXAMPLE_IMAGE_SOCKET = "/tmp/top.sock"  # image= mode: one chain, the default export
QEMU_PREFIX = ["qemu-system-x86_64", "-machine", "accel=kvm:tcg", "-m", "1024"]


def doc_snippets() -> dict[str, str]:
    """The code blocks of docs/attach.md, by the name in their ``<!-- snippet: NAME -->`` line."""
    qemu = QEMU_PREFIX
    ds, disk, sock, host = EXAMPLE_DATASTORE, EXAMPLE_DISK, EXAMPLE_SOCKET, EXAMPLE_HOST
    port = EXAMPLE_PORTS[0]
    delay = EXAMPLE_RECONNECT_DELAY
    return {
        "serve-unix": shell_command(serve_args(ds)),
        "serve-tcp": shell_command(serve_args(ds, ports=EXAMPLE_PORTS)),
        "disk-uri": shell_command(disk_uri_args(disk, ds)),
        "qemu-drive-unix": shell_command(qemu_drive_args(unix_uri(sock, disk)), qemu),
        "qemu-drive-tcp": shell_command(qemu_drive_args(tcp_uri(host, port, disk)), qemu),
        "qemu-blockdev-unix": shell_command(
            qemu_blockdev_args(socket=sock, export=disk, reconnect_delay=delay), qemu
        ),
        "qemu-blockdev-tcp": shell_command(
            qemu_blockdev_args(host=host, port=port, export=disk, reconnect_delay=delay), qemu
        ),
        "qemu-drive-image": shell_command(qemu_drive_args(unix_uri(EXAMPLE_IMAGE_SOCKET)), qemu),
        "serve-libvirt": shell_command(
            serve_args(ds, socket_mode="0660", socket_group=EXAMPLE_LIBVIRT_GROUP)
        ),
        "libvirt-unix": libvirt_disk_xml(socket=sock, export=disk),
        "libvirt-tcp": libvirt_disk_xml(host=host, port=port, export=disk),
        "libvirt-reconnect": libvirt_disk_xml(socket=sock, export=disk, reconnect_delay=delay),
        "nbd-client-tcp": shell_command(nbd_client_args(host, port, export=disk)),
        "nbd-client-unix": shell_command(nbd_client_unix_args(sock, export=disk)),
        "nbd-client-disconnect": shell_command(nbd_client_disconnect_args()),
    }
