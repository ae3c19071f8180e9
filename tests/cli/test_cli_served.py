"""The ``vdisk`` commands on a served datastore: ``vdisk serve`` and the control sockets.

Each test starts ``vdisk serve`` (one worker and Unix socket per disk in the
datastore's run/) and writes and reads the disks through libnbd while the
commands run against the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import nbd
import pytest
from cliharness import (
    CLI,
    Datastore,
    MiB,
    Serve,
    alive,
    chain_length,
    connect,
    run_vdisk,
    wait_gone,
)

from vdisk import errors, qemu_img
from vdisk.control import ControlClient, ControlError
from vdisk.routing import open_service


def raw_copy(uri: str, dest: Path) -> Path:
    """The disk's guest-visible bytes, read through NBD."""
    with connect(uri) as h, open(dest, "wb") as f:
        size = h.get_size()
        for off in range(0, size, 4 * MiB):
            f.write(h.pread(min(4 * MiB, size - off), off))
    return dest


def test_serve_lists_every_disk_and_snapshots(datastore: Datastore, serve: Serve,
                                              tmp_path: Path) -> None:
    base = datastore.create("vm1", "16M")
    datastore.create("vm2", "8M")
    served = serve(datastore)
    assert [(d["disk"], d["state"]) for d in served.info["disks"]] == \
        [("vm1", "running"), ("vm2", "running")]
    assert served.info["control"] == str(datastore.path / "run" / "vdisk.ctl")
    assert os.stat(served.info["control"]).st_mode & 0o777 == 0o600
    pids = set()
    for name, size in (("vm1", 16 * MiB), ("vm2", 8 * MiB)):    # one worker, one endpoint
        worker = served.worker(name)
        assert worker["uri"] == served.uri(name) and worker["socket"] == str(served.socket(name))
        assert os.stat(served.socket(name)).st_mode & 0o777 == 0o600
        listing = subprocess.run(["nbdinfo", "--list", "--json", served.uri(name)],
                                 capture_output=True, text=True, timeout=30, check=True)
        exports = json.loads(listing.stdout)["exports"]
        assert [(e["export-name"], e["export-size"]) for e in exports] == [(name, size)]
        pids.add(worker["pid"])
    assert len(pids) == 2 and served.pid not in pids
    listed = datastore.json("disk", "list")
    assert listed["served"] is True
    assert [d["uri"] for d in listed["disks"]] == [served.uri("vm1"), served.uri("vm2")]
    assert datastore.json("disk", "uri", "vm2")["uri"] == served.uri("vm2")

    with connect(served.uri("vm1")) as h:
        h.pwrite(b"\x01" * MiB, 0)
        h.flush()
        snap = datastore.json("snapshot", "vm1")     # while the client stays connected
        assert snap["frozen"] == base
        h.pwrite(b"\x02" * MiB, MiB)
        h.flush()
        assert h.pread(2 * MiB, 0) == b"\x01" * MiB + b"\x02" * MiB
    info = datastore.disk("vm1")
    assert info["served"] and info["open"] and info["chain"] == [snap["top"], base]
    qemu_img.compare(datastore.path / snap["top"],
                     raw_copy(served.uri("vm1"), tmp_path / "vm1.raw"), force_share=True)


def test_consolidate_while_writing(datastore: Datastore, serve: Serve, tmp_path: Path) -> None:
    base = datastore.create("vm1", "32M")
    served = serve(datastore)
    uri = served.uri("vm1")
    with connect(uri) as h:
        h.pwrite(b"\x0a" * (8 * MiB), 0)
        h.flush()
    top = datastore.json("snapshot", "vm1")["top"]
    with connect(uri) as h:
        h.pwrite(b"\x0b" * (8 * MiB), 4 * MiB)
        h.flush()

    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:       # keeps writing 64 KiB blocks while the job runs
        with connect(uri) as w:
            n = 0
            while not stop.is_set() and n < 256:
                w.pwrite(bytes([n % 251 + 1]) * 65536, 16 * MiB + n * 65536)
                written.append(n)
                n += 1
            w.flush()

    t = threading.Thread(target=writer)
    t.start()
    try:
        job = datastore.json("consolidate", "vm1")
    finally:
        stop.set()
        t.join(30)
    assert job["state"] == "done" and job["passes"] == 1
    assert job["top_before"] == top and job["top_after"] == base
    assert job["bytes_copied"] <= job["copy_set_bytes"]
    assert {"duration_s", "pivot_pause_ms", "bytes_mirrored"} <= job.keys()
    assert datastore.disk("vm1")["chain"] == [base]

    expected = bytearray(b"\x0a" * (4 * MiB) + b"\x0b" * (8 * MiB) + bytes(20 * MiB))
    for n in written:
        expected[16 * MiB + n * 65536:16 * MiB + (n + 1) * 65536] = bytes([n % 251 + 1]) * 65536
    with connect(uri) as h:
        assert h.pread(32 * MiB, 0) == expected
    served.stop()
    qemu_img.check_clean(datastore.path / base)
    assert (datastore.path / base).exists() and chain_length(datastore.path / base) == 1


def test_no_pivot_then_complete_or_cancel(datastore: Datastore, serve: Serve) -> None:
    base = datastore.create("vm1", "16M")
    served = serve(datastore)
    datastore.vdisk("snapshot", "vm1")
    with connect(served.uri("vm1")) as h:
        h.pwrite(b"\x05" * (2 * MiB), 0)
        h.flush()
    top = datastore.disk("vm1")["top"]

    job = datastore.json("consolidate", "vm1", "--no-pivot")
    assert job["state"] == "ready" and job["top_after"] is None
    assert datastore.json("job", "show", str(job["id"]))["state"] == "ready"
    assert datastore.disk("vm1")["job"]["id"] == job["id"]
    with connect(served.uri("vm1")) as h:         # mirrored while ready
        h.pwrite(b"\x06" * MiB, 4 * MiB)
        h.flush()
    result = datastore.vdisk("snapshot", "vm1", check=False)
    assert result.returncode == 1 and "has a job" in result.error_line()
    done = datastore.json("job", "complete", str(job["id"]))["state"]
    assert done == "done"
    assert datastore.disk("vm1")["chain"] == [base]
    assert not (datastore.path / top).exists()
    with connect(served.uri("vm1")) as h:
        assert h.pread(5 * MiB, 0) == b"\x05" * (2 * MiB) + bytes(2 * MiB) + b"\x06" * MiB

    datastore.vdisk("snapshot", "vm1")
    new = datastore.path / "images" / "new.qcow2"
    job = datastore.json("consolidate", "vm1", "--to", new, "--no-pivot")
    assert job["state"] == "ready" and new.exists()
    cancelled = datastore.json("job", "cancel", str(job["id"]))
    assert cancelled["state"] == "cancelled" and not new.exists()
    assert len(datastore.disk("vm1")["chain"]) == 2
    jobs = datastore.json("job", "list")["jobs"]
    assert [j["state"] for j in jobs] == ["cancelled", "done"]


def test_backup_equals_the_disk_at_snapshot_time(datastore: Datastore, serve: Serve,
                                                 tmp_path: Path) -> None:
    base = datastore.create("vm1", "32M")
    served = serve(datastore)
    uri = served.uri("vm1")
    with connect(uri) as h:
        h.pwrite(b"\x31" * (4 * MiB), 0)
        h.pwrite(b"\x32" * MiB, 20 * MiB)
        h.flush()
    datastore.vdisk("snapshot", "vm1")           # a chain of two, to show it stays two
    with connect(uri) as h:
        h.pwrite(b"\x33" * MiB, 2 * MiB)
        h.flush()
    chain_before = datastore.disk("vm1")["chain"]
    at_snapshot = raw_copy(uri, tmp_path / "at-snapshot.raw")

    backup = tmp_path / "backup.qcow2"
    out = datastore.json("backup", "vm1", "--to", backup)
    assert out["consolidate"]["state"] == "done"
    assert out["snapshot"]["frozen"] == chain_before[0]
    with connect(uri) as h:                      # the disk moves on; the backup does not
        h.pwrite(b"\x34" * MiB, 0)
        h.flush()
    qemu_img.check_clean(backup, allow_leaks=False)
    assert chain_length(backup) == 1
    qemu_img.compare(backup, at_snapshot)
    with pytest.raises(errors.ContentMismatch):
        qemu_img.compare(backup, raw_copy(uri, tmp_path / "now.raw"))
    assert datastore.disk("vm1")["chain"] == chain_before
    assert sorted(Path(p).name for p in chain_before) == datastore.images()
    assert base in chain_before


def test_remove_is_refused_while_served_and_open(datastore: Datastore, serve: Serve) -> None:
    datastore.create("vm1")
    served = serve(datastore)
    with connect(served.uri("vm1")):
        result = datastore.vdisk("disk", "remove", "vm1", check=False)
        assert result.returncode == 1 and "1 client(s) attached" in result.error_line()
        result = datastore.vdisk("disk", "remove", "vm1", "--keep-images", check=False)
        assert result.returncode == 1 and "1 client(s) attached" in result.error_line()
    assert [d["name"] for d in datastore.json("disk", "list")["disks"]] == ["vm1"]
    assert served.worker("vm1")["state"] == "running"


def test_serve_refusals(datastore: Datastore, serve: Serve, tmp_path: Path) -> None:
    datastore.create("vm1")
    serve(datastore)
    result = run_vdisk("serve", "-d", datastore.path, "--unix-dir", tmp_path / "other",
                       check=False)
    assert result.returncode == 1 and "already served" in result.error_line()
    not_ds = tmp_path / "empty"
    not_ds.mkdir()
    result = run_vdisk("serve", "-d", not_ds, check=False)
    assert result.returncode == 1 and "not a vdisk datastore" in result.error_line()


def test_control_option_and_a_dead_control_socket(datastore: Datastore, serve: Serve,
                                                  tmp_path: Path) -> None:
    datastore.create("vm1")
    served = serve(datastore, "--unix-dir", str(datastore.path / "r2"))
    control = datastore.path / "r2" / "vdisk.ctl"
    assert served.info["control"] == str(control) and served.socket("vm1").parent == control.parent
    out = datastore.json("disk", "list", "--control", str(control))
    assert out["served"] is True
    result = datastore.vdisk("disk", "list", "--control", str(tmp_path / "nope.sock"),
                             check=False)
    assert result.returncode == 1 and "nope.sock" in result.error_line()


def test_foreground_serve_stops_cleanly_on_sigterm(datastore: Datastore, serve: Serve) -> None:
    datastore.create("vm1")
    # a socket file left behind by a server that died is removed first
    (datastore.path / "run").mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(datastore.path / "run" / "vm1.sock"))
    stale.close()
    pidfile = datastore.path / "serve.pid"
    served = serve(datastore, "--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == served.pid
    worker = served.worker_pid("vm1")
    os.kill(served.pid, signal.SIGTERM)
    assert served.proc.wait(30) == 0
    wait_gone(worker)
    assert not served.socket("vm1").exists() and not pidfile.exists()
    assert not (datastore.path / "run" / "vdisk.ctl").exists()
    assert datastore.json("disk", "list")["served"] is False


def test_detached_serve_with_pidfile(datastore: Datastore) -> None:
    datastore.create("vm1", "4M")
    rundir, pidfile = datastore.path / "d", datastore.path / "d.pid"
    sock = rundir / "vm1.sock"
    out = run_vdisk("serve", "-d", datastore.path, "--unix-dir", rundir, "--detach",
                    "--pidfile", pidfile, "--json").json()
    pid = int(pidfile.read_text())
    try:
        assert out["pid"] == pid and out["detached"] is True
        assert alive(pid)
        with connect(f"nbd+unix:///vm1?socket={sock}") as h:
            assert h.get_size() == 4 * MiB
        assert datastore.json("snapshot", "vm1")["disk"] == "vm1"
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not pidfile.exists() and not sock.exists()
    # without --pidfile, the pid file is RUNDIR/serve.pid
    out = run_vdisk("serve", "-d", datastore.path, "--detach", "--json").json()
    default = datastore.path / "run" / "serve.pid"
    try:
        assert int(default.read_text()) == out["pid"]
    finally:
        os.kill(out["pid"], signal.SIGTERM)
    wait_gone(out["pid"])
    assert not default.exists()


def test_tcp_with_tls_psk(datastore: Datastore, tmp_path: Path) -> None:
    datastore.create("vm1", "4M")
    keys = tmp_path / "keys.psk"
    keys.write_text(f"vdisk:{os.urandom(32).hex()}\n")
    keys.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*CLI, "serve", "-d", str(datastore.path), "--ports",
                             f"{port}-{port}", "--tls-psk", str(keys), "--json"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())      # printed once it serves
        assert info["disks"][0]["uri"] == f"nbds://127.0.0.1:{port}/vm1" and info["tls"] is True
        h = nbd.NBD()
        with pytest.raises(nbd.Error, match="TLS"):
            h.connect_uri(f"nbd://127.0.0.1:{port}/vm1")
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(keys))
        h.set_tls_username("vdisk")
        h.set_export_name("vm1")
        h.connect_tcp("127.0.0.1", str(port))
        assert h.get_size() == 4 * MiB
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_control_client_against_the_server(datastore: Datastore, serve: Serve) -> None:
    datastore.create("vm1", "4M")
    served = serve(datastore)
    with ControlClient.connect(served.info["control"]) as supervisor:
        assert supervisor.datastore == str(datastore.path)
        with pytest.raises(ControlError, match="disk 'vm9' does not exist"):
            supervisor.execute("query-disks", {"disk": "vm9"})
        with pytest.raises(ControlError) as e:
            supervisor.execute("snapshot", {"disk": "vm1"})    # a disk's command
        assert e.value.error_class == "CommandNotFound"
    with ControlClient.connect(served.worker("vm1")["control"]) as client:
        assert client.datastore == str(datastore.path) and client.greeting["disk"] == "vm1"
        with pytest.raises(ControlError) as e:
            client.execute("bogus")
        assert e.value.error_class == "CommandNotFound" and "bogus" in str(e.value)
        with pytest.raises(ControlError, match="runs disk 'vm1', not 'vm9'"):
            client.execute("snapshot", {"disk": "vm9"})
        with pytest.raises(ControlError, match="argument 'pivot' must be true or false"):
            client.execute("consolidate", {"disk": "vm1", "pivot": "no"})
        with pytest.raises(ControlError, match="missing argument 'disk'"):
            client.execute("snapshot", {})
        client.execute("snapshot", {"disk": "vm1"})
        job = client.execute("consolidate", {"disk": "vm1", "pivot": False})["job"]
        deadline = time.monotonic() + 30
        while client.execute("query-jobs", {"id": job["id"]})["jobs"][0]["state"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.execute("job-complete", {"id": job["id"]})["job"]["state"] == "done"
        # the events that came between replies were kept, not taken for replies
        states = [ev["data"]["state"] for ev in client.events
                  if ev["event"] == "JOB_STATUS_CHANGE"]
        assert "ready" in states
    with open_service(datastore.path) as service:
        assert service.served
    served.stop()
    with open_service(datastore.path) as service:
        assert not service.served
        assert service.execute("query-disks", {})["disks"][0]["name"] == "vm1"
