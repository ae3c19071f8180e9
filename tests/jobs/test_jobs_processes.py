"""Several processes on one datastore while a job runs.

Offline, ``vdisk consolidate a --to NEW`` runs in its own process (its copy
slowed, :mod:`slowvdisk`); served, nbdkit runs a job held at ready while two
NBD connections write. Meanwhile other processes run ``vdisk`` commands in a
loop: job list and show, disk list and info, a snapshot of another disk, a
replication of another disk, a second ``vdisk serve``, a cancel or a second
consolidation of the busy disk. Then:

* no job is marked otherwise than it is (never ``interrupted`` while its
  process runs), and its target is never touched by anyone else;
* every refusal is one clear line (``vdisk: error: ...``);
* the job finishes ``done`` and the disk reads what it must (QEMU compares).

This is where hole 2 shows (any second process used to take a running
offline job for a dead one, and ``job cancel`` then deleted its target).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import jobcheck
import pytest
from cons_datastore import Datastore, raw_view
from jobguest import Guest, Journal
from jobprocs import (
    Background,
    catalog_jobs,
    catalog_top,
    leftovers,
    refusal,
    vdisk,
    wait_phase,
)
from jobserve import NbdPort, serve_datastore

pytestmark = pytest.mark.slow

MiB = 1 << 20
RUNNING = ("copying", "ready", "pivoting")


def three_disks(root: Path) -> tuple[Datastore, bytes]:
    """Disk a (16 MiB, an 8 MiB delta on top), b and c (small); a's initial view."""
    ds = Datastore(root)
    chain = ds.add_disk("a", [("write -P 0x11 0 16M",), ("write -P 0x21 2M 4M",),
                              ("write -P 0x31 4M 8M", "write -z 13M 1M")], 16 * MiB)
    ds.add_disk("b", [("write -P 0x41 0 1M",)], 4 * MiB)
    ds.add_disk("c", [("write -P 0x51 0 1M",), ("write -P 0x52 1M 1M",)], 4 * MiB)
    return ds, raw_view(chain[0], root / "a-initial.raw")


def try_serve(ds: Path, workdir: Path, job_id: int) -> str:
    """A second ``vdisk serve``: refused in one line, or serving without taking
    the running job for a dead one (then stopped again). Returns what happened."""
    bg = Background(["serve", "-d", ds, "--unix-dir", workdir / "second", "--json"], workdir,
                    name="serve2")
    try:
        end = time.monotonic() + 30
        while bg.proc.poll() is None and not bg.out.read_text():
            assert time.monotonic() < end, "a second vdisk serve neither served nor refused"
            time.sleep(0.05)
        if bg.proc.poll() is not None or "error" in json.loads(bg.out.read_text()):
            refusal(bg.wait(), "a second vdisk serve")
            return "refused"
        state = {j["id"]: j["state"] for j in catalog_jobs(ds)}[job_id]
        assert state in RUNNING + ("done",), f"a second vdisk serve marked job {job_id} {state}"
        return "served"
    finally:
        if bg.proc.poll() is None:
            bg.signal(15)
        bg.cleanup()


def check_job(ds: Path, job_id: int, target: Path, after: str) -> str:
    """The job's journal state is a live one (or done); its target is there."""
    job = {j["id"]: j for j in catalog_jobs(ds)}[job_id]
    assert job["state"] in RUNNING + ("done",), \
        f"after {after}: job {job_id} is {job['state']} while its command runs: {job}"
    if job["state"] in RUNNING:
        assert target.exists(), f"after {after}: the target {target} of running job is gone"
    return str(job["state"])


def test_offline_job_left_alone_by_other_processes(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    ds, initial = three_disks(root)
    target = root / "images" / "a-new.qcow2"
    bg = Background(["consolidate", "a", "-d", root, "--to", target, "--json"], tmp_path,
                    env={"VDISK_TEST_COPY_DELAY": "0.25"}, name="consolidate")
    try:
        job_id = int(wait_phase(root, "copying", bg)["id"])
        seen: dict[str, int] = {}
        refusals: list[str] = []
        replicas = 0
        others: list[tuple[str, ...]] = [
            ("job", "list"), ("job", "show", str(job_id)), ("disk", "list"),
            ("disk", "info", "a"), ("snapshot", "b"), ("job", "cancel", str(job_id)),
            ("replicate", "c", "--to", "REPLICA"), ("job", "list")]
        while bg.proc.poll() is None:
            for cmd in others:
                if cmd[0] == "replicate":
                    replicas += 1
                    cmd = (*cmd[:3], str(tmp_path / f"replica{replicas}"))
                r = vdisk(*cmd, "-d", root, "--json")
                if r.returncode:
                    refusals.append(f"{' '.join(cmd[:2])}: {refusal(r, ' '.join(cmd))}")
                elif cmd[:2] == ("job", "list"):
                    listed = {j["id"]: j["state"] for j in json.loads(r.stdout)["jobs"]}
                    assert listed[job_id] in RUNNING + ("done",), \
                        f"vdisk job list shows job {job_id} {listed[job_id]} while it runs"
                state = check_job(root, job_id, target, " ".join(cmd))
                seen[state] = seen.get(state, 0) + 1
            seen["serve: " + try_serve(root, tmp_path, job_id)] = 1
        result = bg.wait()
    finally:
        bg.cleanup()
    assert result.returncode == 0, f"the consolidation failed: {result.stderr}"
    job = json.loads(result.stdout)
    assert job["state"] == "done", job
    assert seen.get("copying"), f"no command ran while the job copied: {seen}"
    assert not any(r.startswith(("snapshot", "replicate")) for r in refusals), refusals
    jobcheck.count("processes: commands beside an offline job", sum(seen.values()))
    top = catalog_top(root, "a")
    assert top == target, top
    chain = jobcheck.qemu_final(top, initial, tmp_path / "m.raw", "disk a after the job")
    assert [p.name for p in chain] == ["a-new.qcow2", "a-0.qcow2"], chain
    assert not leftovers(root, tmp_path), leftovers(root, tmp_path)


def test_served_job_left_alone_by_other_processes(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    ds, initial = three_disks(root)
    journal = Journal(initial)
    with serve_datastore(root, tmp_path) as srv:
        ctl = srv.control()
        guest = Guest(journal, lambda: NbdPort(srv.connect("a")), writers=2,
                      seed=random.randrange(1 << 30))
        guest.start()
        try:
            guest.run_ops(20)
            job = ctl.execute("consolidate", disk="a", pivot=False)["job"]
            target = root / job["target"]
            assert ctl.wait_job(job["id"], ("ready",))["state"] == "ready"
            refusals: dict[str, str] = {}
            commands: list[tuple[Any, ...]] = [
                ("job", "list"), ("job", "show", str(job["id"])), ("disk", "list"),
                ("disk", "info", "a"), ("snapshot", "b"), ("consolidate", "a"),
                ("snapshot", "a"), ("replicate", "c", "--to", str(tmp_path / "replica"))]
            for _round in range(2):
                for cmd in commands:
                    r = vdisk(*cmd, "-d", root, "--json")
                    if r.returncode:
                        refusals[" ".join(cmd[:2])] = refusal(r, " ".join(cmd))
                    check_job(root, job["id"], target, " ".join(cmd))
                    guest.run_ops(5)
                assert try_serve(root, tmp_path, job["id"]) == "refused"
                refusals["serve"] = "refused"
                commands = commands[:4]     # the replica exists now; b has its snapshot
            assert set(refusals) == {"consolidate a", "snapshot a", "serve"}, refusals
            assert ctl.job(job["id"])["state"] == "ready"
            done = ctl.execute("job-complete", id=job["id"])["job"]
            assert done["state"] == "done", done
            guest.run_ops(20)
        finally:
            guest.stop()
        verify = NbdPort(srv.connect("a"))
        jobcheck.verify_view(verify.read, bytes(journal.model), "disk a after the job")
    jobcheck.count("processes: commands beside a served job", 2 * 8 + 2)
    jobcheck.qemu_final(catalog_top(root, "a"), bytes(journal.model), tmp_path / "m.raw",
                        "disk a after the job")
    assert not leftovers(root, tmp_path), leftovers(root, tmp_path)
