"""vdisk.nbdkit.NbdkitServer with real nbdkit: its C plugins, and the vdisk plugin."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from vdisk import errors, qemu_img, qemu_io
from vdisk.lab.vdiskrun import free_tcp_port
from vdisk.nbdkit import PLUGIN, SUN_PATH_MAX, NbdkitServer

MiB = 1024 * 1024
MEMORY = ["memory"]  # nbdkit's own RAM disk plugin: no dependency on the vdisk plugin


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # short, so that the Unix socket path stays far below the kernel's limit
    return tmp_path_factory.mktemp("nbdkit")


@contextlib.contextmanager
def connected(uri: str) -> Iterator[nbd.NBD]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield h
    finally:
        h.shutdown()


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def fake_nbdkit(tmp_path: Path, script: str) -> Path:
    path = tmp_path / "fake-nbdkit"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_serves_on_unix_socket_and_stops(workdir: Path) -> None:
    server = NbdkitServer(["size=1M"], workdir, plugin=MEMORY)
    assert server.pid is None
    with server:
        assert server.socket == workdir / "nbdkit.sock"
        assert server.uri == f"nbd+unix:///?socket={workdir}/nbdkit.sock"
        assert server.socket.is_socket()
        pid = server.pid
        assert pid is not None and alive(pid)
        with connected(server.uri) as h:
            assert h.get_size() == MiB
            assert not h.is_read_only()
            h.pwrite(b"\xa5" * 4096, 8192)
            h.flush()
            assert h.pread(4096, 8192) == b"\xa5" * 4096
    assert not alive(pid)
    assert server.returncode == 0
    assert not server.socket.exists()
    assert server.stop() == 0  # stopping again is harmless


def test_uri_quotes_the_socket_path(workdir: Path) -> None:
    odd = workdir / "a dir&x"
    with NbdkitServer(["size=1M"], odd, plugin=MEMORY) as server:
        assert server.uri == f"nbd+unix:///?socket={workdir}/a%20dir%26x/nbdkit.sock"
        with connected(server.uri) as h:
            assert h.get_size() == MiB


def test_readiness_probe_leaves_no_error_in_log(workdir: Path) -> None:
    with NbdkitServer(["size=1M"], workdir, plugin=MEMORY) as server:
        with connected(server.uri) as h:
            assert h.get_size() == MiB
    assert "error" not in server.stderr_text()


def test_command_line(workdir: Path) -> None:
    server = NbdkitServer(
        ["image=/x.qcow2"], workdir, readonly=True, extra_args=["-t", "2"], start_timeout=1
    )
    sock = str(workdir / "nbdkit.sock")
    assert server.cmd[1:] == [
        "-f",
        "-U",
        sock,
        "-r",
        "--exit-with-parent",
        "-t",
        "2",
        "python",
        str(PLUGIN),
        "image=/x.qcow2",
    ]
    assert PLUGIN.is_absolute() and PLUGIN.name == "vdisk_nbdkit.py"


def test_readonly(workdir: Path) -> None:
    with NbdkitServer(["size=1M"], workdir, plugin=MEMORY, readonly=True) as server:
        with connected(server.uri) as h:
            assert h.is_read_only()
            with pytest.raises(nbd.Error):
                h.pwrite(b"x" * 512, 0)


def test_tcp_port(workdir: Path) -> None:
    port = free_tcp_port()
    with NbdkitServer(["size=2M"], workdir, plugin=MEMORY, tcp_port=port) as server:
        assert server.socket is None
        assert server.uri == f"nbd://127.0.0.1:{port}/"
        with connected(server.uri) as h:
            assert h.get_size() == 2 * MiB


def test_tcp_port_in_use(workdir: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = NbdkitServer(["size=1M"], workdir, plugin=MEMORY, tcp_port=port)
        with pytest.raises(errors.AddressInUse, match=f"127.0.0.1:{port}"):
            server.start()
        assert server.pid is None


def test_failing_start_raises_with_stderr(workdir: Path) -> None:
    server = NbdkitServer(["size=not-a-size"], workdir, plugin=MEMORY)
    with pytest.raises(errors.NbdkitError) as excinfo:
        server.start()
    e = excinfo.value
    assert e.returncode not in (0, None)
    assert "not-a-size" in e.stderr
    assert e.cmd == server.cmd
    assert "not-a-size" in str(e) and "\n" not in str(e)
    assert server.pid is not None and not alive(server.pid)


def test_unknown_plugin(workdir: Path) -> None:
    with pytest.raises(errors.NbdkitError, match="no-such-plugin"):
        NbdkitServer([], workdir, plugin=["no-such-plugin"]).start()


def test_process_exiting_before_serving(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBDKIT", str(fake_nbdkit(tmp_path, "echo 'cannot open image' >&2; exit 3")))
    with pytest.raises(errors.NbdkitError) as excinfo:
        NbdkitServer(["image=x"], workdir).start()
    assert excinfo.value.returncode == 3
    assert excinfo.value.stderr == "cannot open image\n"
    assert excinfo.value.cmd[0].endswith("fake-nbdkit")


def test_start_timeout_stops_the_process(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBDKIT", str(fake_nbdkit(tmp_path, "echo starting >&2; exec sleep 60")))
    server = NbdkitServer(["image=x"], workdir, start_timeout=0.5)
    with pytest.raises(errors.NbdkitTimeout) as excinfo:
        server.start()
    assert excinfo.value.timeout == 0.5
    assert "starting" in str(excinfo.value)
    assert server.returncode == -signal.SIGTERM


def test_missing_binary(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBDKIT", str(workdir / "no-such-nbdkit"))
    with pytest.raises(errors.NbdkitError, match="cannot run") as excinfo:
        NbdkitServer([], workdir, plugin=MEMORY).start()
    assert excinfo.value.returncode is None


def test_stale_socket_is_replaced(workdir: Path) -> None:
    stale = workdir / "nbdkit.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a dead server leaves behind
    assert stale.is_socket()
    with NbdkitServer(["size=1M"], workdir, plugin=MEMORY) as server:
        with connected(server.uri) as h:
            assert h.get_size() == MiB


def test_socket_in_use_by_a_live_server(workdir: Path) -> None:
    with NbdkitServer(["size=1M"], workdir, plugin=MEMORY) as first:
        second = NbdkitServer(["size=2M"], workdir, plugin=MEMORY)
        with pytest.raises(errors.AddressInUse, match="nbdkit.sock"):
            second.start()
        with connected(first.uri) as h:
            assert h.get_size() == MiB  # the first server was left alone


def test_servers_named_apart_share_a_workdir(workdir: Path) -> None:
    with (
        NbdkitServer(["size=1M"], workdir, plugin=MEMORY, name="a") as a,
        NbdkitServer(["size=2M"], workdir, plugin=MEMORY, name="b") as b,
    ):
        assert a.log_path != b.log_path
        with connected(a.uri) as ha, connected(b.uri) as hb:
            assert (ha.get_size(), hb.get_size()) == (MiB, 2 * MiB)


def test_socket_path_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (SUN_PATH_MAX - len(str(tmp_path))))
    with pytest.raises(errors.SocketPathTooLong):
        NbdkitServer(["size=1M"], deep, plugin=MEMORY).start()


def test_kill_leaves_socket_and_restart_works(workdir: Path) -> None:
    with NbdkitServer(["size=1M"], workdir, plugin=MEMORY) as server:
        pid = server.pid
        assert pid is not None
        server.kill()
        assert server.returncode == -signal.SIGKILL
        assert not alive(pid)
        assert server.socket is not None and server.socket.is_socket()  # as after a crash
        with NbdkitServer(["size=2M"], workdir, plugin=MEMORY) as again:
            with connected(again.uri) as h:
                assert h.get_size() == 2 * MiB
            server.stop()  # must not remove the socket of the new server
            assert again.socket is not None and again.socket.is_socket()
            with connected(again.uri) as h:
                assert h.get_size() == 2 * MiB
        assert not again.socket.exists()


def test_stop_escalates_to_sigkill(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "server" that listens on the socket but ignores SIGTERM.
    script = (
        "trap '' TERM\n"
        f"exec {sys.executable} -c 'import socket,sys,time; s=socket.socket(socket.AF_UNIX); "
        f's.bind(sys.argv[1]); s.listen(); time.sleep(60)\' "$3"'
    )
    monkeypatch.setenv("NBDKIT", str(fake_nbdkit(tmp_path, script)))
    server = NbdkitServer([], workdir, plugin=[], exit_with_parent=False)
    server.start()
    assert server.stop(timeout=0.5) == -signal.SIGKILL


def test_exit_with_parent_is_optional(workdir: Path) -> None:
    server = NbdkitServer([], workdir, plugin=MEMORY, exit_with_parent=False)
    assert "--exit-with-parent" not in server.cmd
    extra = NbdkitServer([], workdir, plugin=MEMORY, extra_args=["--exit-with-parent"])
    assert extra.cmd.count("--exit-with-parent") == 1


def test_dies_with_its_parent(workdir: Path) -> None:
    # A parent process that starts nbdkit and is killed without cleaning up.
    code = (
        "import sys, time\n"
        "from vdisk.nbdkit import NbdkitServer\n"
        "s = NbdkitServer(['size=1M'], sys.argv[1], plugin=['memory'])\n"
        "s.start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert alive(pid)
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


# The vdisk plugin (the default plugin)


def test_serves_vdisk_plugin(workdir: Path) -> None:
    base = workdir / "base.qcow2"
    top = workdir / "top.qcow2"
    qemu_img.create(base, size=4 * MiB)
    qemu_io.run(base, "write -P 0x6b 1M 1M")
    qemu_img.create(top, backing="base.qcow2")
    with NbdkitServer([f"image={top}"], workdir) as server:
        with connected(server.uri) as h:
            assert h.get_size() == 4 * MiB
            assert h.pread(MiB, MiB) == b"\x6b" * MiB
            assert h.pread(4096, 0) == bytes(4096)


def test_vdisk_plugin_refuses_missing_image(workdir: Path) -> None:
    with pytest.raises(errors.NbdkitError) as excinfo:
        NbdkitServer([f"image={workdir / 'missing.qcow2'}"], workdir).start()
    assert "missing.qcow2" in excinfo.value.stderr
