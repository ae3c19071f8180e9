"""``vdisk serve`` as a supervisor of one nbdkit worker per disk.

Its life (disks created, imported and removed while it serves, a stale
socket, a port in use), and its faults: a worker killed with SIGKILL in the
middle of a client's writes comes back on the same endpoint, what it
acknowledged before a completed flush is all there, and the other disks
never see a failed request.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import nbd
import pytest
from cliharness import CLI, Datastore, MiB, Serve, connect, run_vdisk, wait_gone

from vdisk import qemu_img


def test_disks_come_and_go_while_served(datastore: Datastore, serve: Serve,
                                        tmp_path: Path) -> None:
    ds = datastore
    ds.create("a", "8M")
    served = serve(ds)
    created = ds.json("disk", "create", "b", "--size", "4M")
    assert created["uri"] == served.uri("b") and created["worker"]["state"] == "running"
    with connect(created["uri"]) as h:                 # served at once, on its own socket
        assert h.get_size() == 4 * MiB
    image = tmp_path / "source.qcow2"
    qemu_img.create(image, size=2 * MiB)
    imported = ds.json("disk", "import", "c", image)
    assert imported["worker"]["state"] == "running"
    with connect(served.uri("c")) as h:
        assert h.get_size() == 2 * MiB
    pids = {w["disk"]: w["pid"] for w in run_vdisk(
        "serve", "status", "-d", ds.path, "--json").json()["workers"]}
    assert sorted(pids) == ["a", "b", "c"] and len(set(pids.values())) == 3
    removed = ds.json("disk", "remove", "b")
    assert removed["deleted"] == [created["top"]]
    wait_gone(pids["b"])                                # its worker is stopped
    assert not served.socket("b").exists()
    status = run_vdisk("serve", "status", "-d", ds.path, "--json").json()
    assert [w["disk"] for w in status["workers"]] == ["a", "c"]
    assert {w["pid"] for w in status["workers"]} == {pids["a"], pids["c"]}   # untouched
    with connect(served.uri("a")) as h:
        assert h.get_size() == 8 * MiB


def test_a_port_in_use_is_named_and_nothing_starts(datastore: Datastore,
                                                   tmp_path: Path) -> None:
    datastore.create("a", "4M")
    datastore.create("b", "4M")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_vdisk("serve", "-d", datastore.path, "--ports", f"{port - 1}-{port}",
                           check=False)
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is in use" in result.error_line()
    assert not (datastore.path / "run" / "a.log").exists()     # no worker half-started
    assert datastore.json("disk", "list")["served"] is False


def test_a_live_socket_is_refused_a_stale_one_replaced(datastore: Datastore, serve: Serve,
                                                       tmp_path: Path) -> None:
    datastore.create("a", "4M")
    rundir = tmp_path / "r"
    rundir.mkdir()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(rundir / "a.sock"))
    live.listen(1)
    try:
        result = run_vdisk("serve", "-d", datastore.path, "--unix-dir", rundir, check=False)
        assert result.returncode == 1 and f"{rundir / 'a.sock'} is in use" in \
            result.error_line()
    finally:
        live.close()                  # now a stale socket file: replaced at the next start
    served = serve(datastore, "--unix-dir", str(rundir))
    with connect(served.uri("a")) as h:
        assert h.get_size() == 4 * MiB


def test_socket_group_and_mode(datastore: Datastore, serve: Serve) -> None:
    datastore.create("a", "4M")
    served = serve(datastore, "--socket-mode", "0660", "--socket-group", "disk")
    st = os.stat(served.socket("a"))
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == 6   # Debian's group disk
    assert os.stat(served.info["control"]).st_mode & 0o777 == 0o600


@pytest.mark.crash
def test_a_killed_worker_is_back_and_its_neighbour_never_noticed(
        datastore: Datastore, serve: Serve) -> None:
    ds = datastore
    ds.create("a", "32M")
    ds.create("b", "32M")
    served = serve(ds)
    stop = threading.Event()
    failures: list[str] = []
    a_written: dict[int, int] = {}

    def neighbour() -> None:             # disk a: writes and reads, every one must succeed
        rnd = random.Random(1)
        try:
            with connect(served.uri("a")) as h:
                n = 0
                while not stop.is_set():
                    block = rnd.randrange(512)
                    h.pwrite(bytes([n % 251 + 1]) * 65536, block * 65536)
                    a_written[block] = n % 251 + 1
                    if n % 8 == 0:
                        h.flush()
                    got = h.pread(65536, block * 65536)
                    if got[0] != n % 251 + 1:
                        failures.append(f"block {block} read back {got[0]}")
                    n += 1
        except nbd.Error as e:
            failures.append(f"disk a: {e}")

    t = threading.Thread(target=neighbour)
    t.start()
    b_flushed: dict[int, int] = {}
    try:
        h = nbd.NBD()
        h.connect_uri(served.uri("b"))
        for n in range(64):
            h.pwrite(bytes([n + 1]) * 65536, n * 65536)
            if n % 4 == 3:
                h.flush()
                b_flushed.update({k: k + 1 for k in range(n + 1)})
        worker = served.worker_pid("b")
        os.kill(worker, signal.SIGKILL)                 # mid-stream: b's client loses it
        with pytest.raises(nbd.Error):
            for n in range(64, 128):
                h.pwrite(bytes([n + 1]) * 65536, n * 65536)
        wait_gone(worker)
        deadline = time.monotonic() + 10
        while (w := served.worker("b"))["state"] != "running":
            assert time.monotonic() < deadline, w
            time.sleep(0.05)
        assert w["restarts"] == 1 and w["pid"] != worker
        time.sleep(0.5)                                 # a's writes go on meanwhile
    finally:
        stop.set()
        t.join(30)
    assert not failures, failures[:5]
    assert a_written
    with connect(served.uri("b")) as h2:               # the same endpoint, a new worker
        for block, value in b_flushed.items():
            assert h2.pread(65536, block * 65536)[0] == value, block
        with connect(served.uri("a")) as ha:
            for block, value in a_written.items():
                assert ha.pread(1, block * 65536)[0] == value, block
    served.stop()
    for name in ("a", "b"):
        for image in ds.disk(name)["chain"]:
            qemu_img.check_clean(ds.path / image)


def test_a_broken_disk_is_refused_with_its_reason_until_mended(datastore: Datastore,
                                                               serve: Serve) -> None:
    ds = datastore
    ds.create("good", "4M")
    ds.create("bad", "4M")
    frozen = ds.json("snapshot", "bad")["frozen"]
    hidden = ds.path / "hidden.qcow2"
    (ds.path / frozen).rename(hidden)
    served = serve(ds)
    bad = next(d for d in served.info["disks"] if d["disk"] == "bad")
    assert bad["state"] == "broken" and "not found" in bad["error"], bad
    assert "disk bad is not served" in (ds.path / "serve.stderr").read_text()
    t0 = time.monotonic()
    with pytest.raises(nbd.Error), connect(served.uri("bad")):
        pass
    assert time.monotonic() - t0 < 5, "a broken disk's client must be refused, not queued"
    with connect(served.uri("good")) as h:
        assert h.get_size() == 4 * MiB
    hidden.rename(ds.path / frozen)                     # mended: served again
    deadline = time.monotonic() + 15
    while served.worker("bad")["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with connect(served.uri("bad")) as h:
        assert h.get_size() == 4 * MiB


def test_a_worker_that_keeps_dying_is_given_up_and_its_endpoint_closed(
        datastore: Datastore, tmp_path: Path) -> None:
    datastore.create("a", "4M")
    fake = tmp_path / "nbdkit"
    fake.write_text("#!/bin/sh\necho 'nbdkit: error: this nbdkit always fails' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.Popen([*CLI, "serve", "-d", str(datastore.path), "--json"],
                            env={**os.environ, "NBDKIT": str(fake)}, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            status = run_vdisk("serve", "status", "-d", datastore.path, "--json",
                               check=False)
            if status.returncode == 0 and status.json()["workers"][0]["state"] == "failed":
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        worker = status.json()["workers"][0]
        assert worker["restarts"] == 4 and "always fails" in worker["error"]
        assert not (datastore.path / "run" / "a.sock").exists()     # refused, not queued
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "giving up" in err and "always fails" in err, err


def test_removing_a_disk_with_a_job_is_refused_and_its_worker_untouched(
        datastore: Datastore, serve: Serve) -> None:
    datastore.create("a", "8M")
    served = serve(datastore)
    datastore.vdisk("snapshot", "a")
    with connect(served.uri("a")) as h:
        h.pwrite(b"\x07" * MiB, 0)
        h.flush()
    pid = served.worker_pid("a")
    job = datastore.json("consolidate", "a", "--no-pivot")
    assert job["state"] == "ready"
    refused = datastore.vdisk("disk", "remove", "a", check=False)
    assert refused.returncode == 1 and "job" in refused.error_line(), refused.stderr
    assert served.worker_pid("a") == pid and served.worker("a")["state"] == "running"
    with connect(served.uri("a")) as h:               # still served, still mirrored
        h.pwrite(b"\x08" * MiB, MiB)
        h.flush()
    assert datastore.json("job", "complete", str(job["id"]))["state"] == "done"
    with connect(served.uri("a")) as h:
        assert h.pread(2 * MiB, 0) == b"\x07" * MiB + b"\x08" * MiB
    assert served.worker_pid("a") == pid


def test_a_killed_supervisor_takes_its_workers_along_and_a_new_one_serves(
        datastore: Datastore, serve: Serve) -> None:
    datastore.create("a", "8M")
    served = serve(datastore)
    worker = served.worker_pid("a")
    h = nbd.NBD()
    h.connect_uri(served.uri("a"))
    h.pwrite(b"\x09" * MiB, 0)
    h.flush()
    served.proc.kill()                                # no chance to stop its workers
    served.proc.wait(15)
    wait_gone(worker, timeout=30)                     # the worker notices on its own
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    del h
    again = serve(datastore)                          # the stale sockets are replaced
    assert again.worker_pid("a") != worker
    with connect(again.uri("a")) as h2:
        assert h2.pread(MiB, 0) == b"\x09" * MiB


def test_a_worker_that_does_not_answer_in_time_is_not_called_stopped(
        datastore: Datastore, serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    from vdisk.control import ControlClient
    from vdisk.errors import Error
    from vdisk.routing import open_service

    datastore.create("a", "4M")
    served = serve(datastore)
    pid = served.worker_pid("a")
    connect_worker = ControlClient.connect.__func__          # type: ignore[attr-defined]
    monkeypatch.setattr(ControlClient, "connect", classmethod(
        lambda cls, path, **kw: connect_worker(cls, path, **{**kw, "command_timeout": 1.0})))
    with open_service(datastore.path) as service:
        assert service.execute("query-disk", {"disk": "a"})["name"] == "a"
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_stopped(pid)
            with pytest.raises(Error) as e:
                service.execute("query-disk", {"disk": "a"})
        finally:
            os.kill(pid, signal.SIGCONT)
    assert "did not answer query-disk in time" in str(e.value)
    assert "may still be running it" in str(e.value)
    assert served.worker_pid("a") == pid                      # nobody restarted it


def wait_stopped(pid: int, timeout: float = 30.0) -> None:
    """Until every thread of pid is stopped: kill() returns before they all are (a
    thread of a stopped process still runs until the thread that took the
    signal is scheduled, later on a busy machine)."""
    end = time.monotonic() + timeout
    while True:
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in os.listdir(f"/proc/{pid}/task")]
        if all(s == "T" for s in states):
            return
        assert time.monotonic() < end, f"pid {pid} not stopped within {timeout} s: {states}"
        time.sleep(0.01)
