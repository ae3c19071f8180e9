"""One owner for every disk and job: other ``vdisk`` processes see it, never touch it.

A command held at a point of its job (cmdpause.py) is the owner; meanwhile
other processes list, show, try to cancel, snapshot or consolidate. Then
commands killed with SIGTERM and SIGKILL in the middle of a backup leave
nothing behind: no copy running, no temporary file once the disk has an
owner again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cliharness import CLI, Datastore, Result, alive, chain_length, connect, wait_gone

from vdisk import qemu_img, qemu_io

HOLD = Path(__file__).resolve().parent / "cmdpause.py"
MiB = 1 << 20


class Held:
    """A ``vdisk`` command held at a point of its job until released."""

    def __init__(self, tmp: Path, point: str, *args: str | os.PathLike[str],
                 env: dict[str, str] | None = None) -> None:
        self.marker, self.release_file = tmp / "held", tmp / "release"
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLD), point, str(self.marker), str(self.release_file),
             *(os.fspath(a) for a in args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_held(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, "the command never reached its hold point"
            time.sleep(0.02)

    def finish(self, timeout: float = 120.0) -> Result:
        self.release_file.touch()
        out, err = self.proc.communicate(timeout=timeout)
        return Result(self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _disk_with_delta(ds: Datastore, tmp: Path) -> bytes:
    """Disk a: base data, a snapshot, more data in the new top; its guest view."""
    ds.create("a", "64M")
    qemu_io.run(ds.top("a"), "write -P 0x11 0 16M", "write -P 0x12 40M 4M")
    ds.vdisk("snapshot", "a")
    qemu_io.run(ds.top("a"), "write -P 0x22 4M 8M", "write -z 30M 1M")
    view = tmp / "a.raw"
    qemu_img.convert(ds.top("a"), view, "raw")
    return view.read_bytes()


def test_a_running_offline_job_is_seen_and_left_alone(datastore: Datastore,
                                                      tmp_path: Path) -> None:
    ds = datastore
    expected = _disk_with_delta(ds, tmp_path)
    ds.create("b", "16M")
    target = ds.path / "images" / "merged.qcow2"
    held = Held(tmp_path, "consolidate-copy", "consolidate", "a", "-d", ds.path,
                "--to", target, "--json")
    try:
        held.wait_held()
        job = ds.json("job", "list")["jobs"][0]
        assert job["state"] == "copying", job
        assert job.get("owner_pid") == held.pid, job
        assert ds.json("job", "show", str(job["id"]))["state"] == "copying"
        assert ds.disk("a")["job"]["state"] == "copying"
        for action in ("cancel", "resume", "complete"):
            line = ds.vdisk("job", action, str(job["id"]), check=False).error_line()
            assert f"running in process {held.pid}" in line, (action, line)
        line = ds.vdisk("snapshot", "a", check=False).error_line()
        assert f"in use by process {held.pid}" in line, line
        line = ds.vdisk("disk", "remove", "a", check=False).error_line()
        assert f"in use by process {held.pid}" in line, line
        ds.vdisk("snapshot", "b")                 # another disk has its own owner
        assert target.exists()
        assert ds.json("job", "list")["jobs"][0]["state"] == "copying"
        done = held.finish()
    finally:
        held.kill()
    assert done.returncode == 0, done.stderr
    assert done.json()["state"] == "done"
    assert ds.top("a") == target and chain_length(target) == 1   # top and base collapsed
    qemu_img.check_clean(target)
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_img.compare(target, tmp_path / "expected.raw", fmt_b="raw")


def test_a_served_backup_holds_off_a_consolidation(datastore: Datastore, serve,
                                                   tmp_path: Path) -> None:
    """The backup equals the disk at its snapshot: a consolidation asked for
    while it copies is refused, so nothing writes the frozen layers it reads."""
    ds = datastore
    expected = _disk_with_delta(ds, tmp_path)
    before = chain_length(ds.top("a"))
    served = serve(ds)
    backup = tmp_path / "a-backup.qcow2"
    held = Held(tmp_path, "backup-copy", "backup", "a", "--to", backup, "-d", ds.path,
                "--json")
    try:
        held.wait_held()
        with connect(served.uri("a")) as h:      # after the snapshot: not in the backup
            h.pwrite(b"\x77" * MiB, 0)
            h.flush()
        line = ds.vdisk("consolidate", "a", check=False).error_line()
        job = ds.json("job", "list")["jobs"][0]
        assert (job["kind"], job["state"], job["owner_pid"]) == ("backup", "copying", held.pid)
        assert f"already has a job: backup job {job['id']} (copying, running in process " \
               f"{held.pid})" in line, line
        done = held.finish()
    finally:
        held.kill()
    assert done.returncode == 0, done.stderr
    assert done.json()["consolidate"]["state"] == "done"
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_img.compare(backup, tmp_path / "expected.raw", fmt_b="raw")
    assert chain_length(ds.top("a")) == before
    jobs = ds.json("job", "list")["jobs"]
    assert [(j["kind"], j["state"]) for j in jobs[:2]] == [("consolidate", "done"),
                                                           ("backup", "done")]


def _slow_qemu_img(tmp: Path) -> dict[str, str]:
    """QEMU_IMG that, asked to write a backup's temporary copy, starts it and
    then never finishes (its pid in the file `copying`)."""
    script = tmp / "qemu-img-slow"
    script.write_text(
        "#!/bin/bash\n"
        'for a; do last=$a; done\n'
        'if [ "$1" = convert ] && [[ $(basename "$last") == .*.tmp ]]; then\n'
        '    : > "$last"; echo $$ > "$COPYING.tmp"; mv "$COPYING.tmp" "$COPYING"\n'
        "    exec sleep 300\n"
        "fi\n"
        'exec qemu-img "$@"\n')
    script.chmod(0o755)
    return {**os.environ, "QEMU_IMG": str(script), "COPYING": str(tmp / "copying")}


def _start_backup(ds: Datastore, tmp: Path, backup: Path) -> tuple[subprocess.Popen[str], int]:
    env = _slow_qemu_img(tmp)
    proc = subprocess.Popen([*CLI, "backup", "a", "--to", str(backup), "-d", str(ds.path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    copying = tmp / "copying"
    while not copying.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, int(copying.read_text())


def _temps(backup: Path) -> list[str]:
    return [p.name for p in backup.parent.iterdir() if p.name.startswith(f".{backup.name}.")]


def test_sigterm_during_a_backup_copy_cleans_up(datastore: Datastore, tmp_path: Path) -> None:
    ds = datastore
    _disk_with_delta(ds, tmp_path)
    before = chain_length(ds.top("a"))
    backup = tmp_path / "out" / "a.qcow2"
    backup.parent.mkdir()
    proc, copier = _start_backup(ds, tmp_path, backup)
    assert _temps(backup)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.startswith("vdisk: error: ") and len(err.splitlines()) == 1, err
    wait_gone(copier)
    assert not _temps(backup) and not backup.exists()
    assert chain_length(ds.top("a")) == before          # the snapshot merged back
    jobs = ds.json("job", "list")["jobs"]
    assert [(j["kind"], j["state"]) for j in jobs[:2]] == [("consolidate", "done"),
                                                           ("backup", "failed")]
    assert jobs[1]["error"] == "interrupted"


def test_sigkill_during_a_backup_copy_leaves_nothing_running_and_is_settled(
        datastore: Datastore, tmp_path: Path) -> None:
    ds = datastore
    _disk_with_delta(ds, tmp_path)
    before = chain_length(ds.top("a"))
    backup = tmp_path / "out" / "a.qcow2"
    backup.parent.mkdir()
    proc, copier = _start_backup(ds, tmp_path, backup)
    proc.kill()
    proc.wait(30)
    wait_gone(copier)                       # the copy died with its command
    job = ds.json("job", "list")["jobs"][0]
    assert (job["kind"], job["state"]) == ("backup", "failed"), job
    assert "stays in the chain" in job["error"]
    ds.vdisk("snapshot", "a")               # the disk's next owner settles the dead job
    assert not _temps(backup)
    assert ds.json("job", "show", str(job["id"]))["state"] == "failed"
    assert chain_length(ds.top("a")) == before + 2      # the backup's snapshot, and ours
    ds.vdisk("consolidate", "a")                        # nothing holds up a new job
    assert not alive(copier)


def test_sigterm_during_a_backups_merge_back_says_how_to_merge(datastore: Datastore,
                                                               tmp_path: Path) -> None:
    ds = datastore
    expected = _disk_with_delta(ds, tmp_path)
    before = chain_length(ds.top("a"))
    backup = tmp_path / "a-backup.qcow2"
    held = Held(tmp_path, "consolidate-copy", "backup", "a", "--to", backup, "-d", ds.path)
    try:
        held.wait_held()                              # copied; merging the snapshot back
        held.proc.send_signal(signal.SIGTERM)
        out, err = held.proc.communicate(timeout=60)
    finally:
        held.kill()
    assert held.proc.returncode == 143, err
    assert len(err.splitlines()) == 1 and "interrupted; backup" in err, err
    merge = err.split("(", 1)[1].split("'")[1]       # 'vdisk consolidate a --into X'
    assert merge.startswith("vdisk consolidate a --into "), err
    qemu_img.compare(backup, ds.top("a"))            # raises if they differ
    assert chain_length(ds.top("a")) == before + 1   # the snapshot stays, nothing lost
    view = tmp_path / "after.raw"
    qemu_img.convert(ds.top("a"), view, "raw")
    assert view.read_bytes() == expected
    ds.vdisk(*merge.split()[1:])                     # what the message says works
    assert chain_length(ds.top("a")) == before
    qemu_img.convert(ds.top("a"), view, "raw")
    assert view.read_bytes() == expected
    qemu_img.check(ds.top("a"))


def test_backup_end_sent_again_is_answered_as_before(datastore: Datastore,
                                                     tmp_path: Path) -> None:
    """backup-end is retried when the worker restarts during it: the second
    one, the same, returns the job; a different one is refused."""
    import pytest

    from vdisk.routing import open_service
    from vdisk_block.errors import RequestError
    from vdisk_block.owner import Owner

    ds = datastore
    ds.create("a", "8M")
    with open_service(ds.path) as svc, Owner(str(ds.path), "a test's backup") as me:
        begun = svc.execute("backup-begin", {"disk": "a", "owner": me.token,
                                             "output": str(tmp_path / "a.qcow2")})
        end = {"id": begun["job"]["id"], "owner": me.token, "bytes": 4096}
        first = svc.execute("backup-end", end)["job"]
        assert first["state"] == "done"
        assert svc.execute("backup-end", end)["job"] == first
        with pytest.raises(RequestError, match="is done"):
            svc.execute("backup-end", {**end, "error": "interrupted"})
        with pytest.raises(RequestError, match="another process"):
            svc.execute("backup-end", {**end, "owner": "someone-else"})
