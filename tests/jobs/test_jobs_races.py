"""Races on a datastore: a backup against a consolidation, and commands killed mid-way.

* Backup against consolidate (hole 7): ``vdisk backup`` snapshots the disk and
  copies the frozen layers; its copy is held (:class:`jobprocs.ConvertGate`)
  while the guest writes a known pattern and ``vdisk consolidate`` runs. The
  backup must equal the disk at its snapshot: the pattern is not in it.
* ``vdisk consolidate`` (offline) and ``vdisk backup`` killed with SIGKILL or
  SIGTERM in each phase (held there by :mod:`slowvdisk`). Then the next
  commands recover: ``job list`` shows a clear state, ``job resume`` or ``job
  cancel`` work (or refuse in one line a job already done), ``qemu-img check``
  finds no corruption, the disk reads what it did, and no temporary file or
  orphan process (a ``qemu-img`` the command started) is left.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jobcheck
import pytest
from cons_datastore import Datastore, raw_view
from jobprocs import (
    Background,
    ConvertGate,
    catalog_jobs,
    catalog_top,
    leftovers,
    ok,
    refusal,
    vdisk,
    wait_group_gone,
    wait_phase,
)
from jobserve import NbdPort, serve_datastore

pytestmark = [pytest.mark.crash, pytest.mark.slow]

MiB = 1 << 20
FINAL = ("done", "cancelled", "failed", "interrupted")


def disk_a(root: Path) -> tuple[Datastore, bytes]:
    ds = Datastore(root)
    chain = ds.add_disk("a", [("write -P 0x11 0 8M",), ("write -P 0x21 1M 2M",),
                              ("write -P 0x31 2M 4M", "write -z 7M 512k")], 8 * MiB)
    return ds, raw_view(chain[0], root / "a-initial.raw")


# -- backup against consolidate -------------------------------------------------------------


def test_backup_lacks_writes_after_its_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _ds, initial = disk_a(root)
    backup = tmp_path / "backup.qcow2"
    gate = ConvertGate(tmp_path)
    pattern = b"\xa7" * (64 * 1024)
    with serve_datastore(root, tmp_path) as srv:
        h = NbdPort(srv.connect("a"))
        bg = Background(["backup", "a", "--to", backup, "-d", root, "--json"], tmp_path,
                        env=gate.env, name="backup")
        try:
            gate.wait_started()
            h.write(pattern, 5 * MiB)           # after the snapshot: not in the backup
            h.flush()
            other = vdisk("consolidate", "a", "-d", root, "--json", timeout=60)
            consolidated = "refused" if other.returncode else json.loads(other.stdout)["state"]
            if other.returncode:
                refusal(other, "vdisk consolidate during a backup")
            gate.release()
            result = bg.wait()
        finally:
            gate.release()
            bg.cleanup()
        got = h.read(len(initial), 0)
        want = initial[:5 * MiB] + pattern + initial[5 * MiB + len(pattern):]
        assert got == want, jobcheck.first_difference(got, want)
    jobcheck.count(f"backup against consolidate: consolidate {consolidated}")
    assert result.returncode == 0 or backup.exists(), refusal(result, "vdisk backup")
    view = jobcheck.on_disk_view(backup, tmp_path / "b.raw")
    diff = jobcheck.first_difference(view, initial)
    assert diff is None, f"the backup is not the disk at its snapshot (consolidate " \
                         f"{consolidated} during its copy): {diff}"
    jobcheck.qemu_final(catalog_top(root, "a"), want, tmp_path / "m.raw", "disk a", [backup])


@pytest.mark.parametrize("target_exists", [False, True], ids=["new-target", "target"])
def test_replicates_into_one_target_at_once(tmp_path: Path, target_exists: bool) -> None:
    """Three ``vdisk replicate`` of three disks into one target datastore at once
    (three times when the target is new: the race is in creating it): each
    finishes (the target takes one at a time) or refuses in one line; what
    they leave on the target is whole and reads as its source."""
    root = tmp_path / "ds"
    ds, initial = disk_a(root)
    ds.add_disk("b", [("write -P 0x61 0 2M",), ("write -P 0x62 1M 2M",)], 4 * MiB)
    ds.add_disk("c", [("write -P 0x71 0 3M",)], 4 * MiB)
    sources = {"a": initial, **{n: raw_view(catalog_top(root, n), tmp_path / f"{n}.raw")
                                for n in ("b", "c")}}
    for attempt in range(1 if target_exists else 3):
        target = tmp_path / f"target{attempt}"
        if target_exists:
            ok(vdisk("datastore", "init", target), "datastore init")
        runs = {name: Background(["replicate", name, "-d", root, "--to", target, "--json"],
                                 tmp_path, name=f"replicate-{name}") for name in sources}
        try:
            results = {name: bg.wait() for name, bg in runs.items()}
        finally:
            for bg in runs.values():
                bg.cleanup()
        done = [name for name, r in results.items() if r.returncode == 0]
        for name, r in results.items():
            if r.returncode:
                refusal(r, f"replicate {name} beside two others into "
                           f"{'a' if target_exists else 'a new'} datastore")
        assert done, results
        jobcheck.count(f"replicates into one target at once: {len(done)} of 3 done")
        for name in done:
            top = catalog_top(target, name)
            jobcheck.qemu_final(top, sources[name], tmp_path / "m.raw", f"replica of {name}")
        assert not leftovers(target), leftovers(target)


# -- commands killed mid-way ------------------------------------------------------------------

# (phase the command is held in, signal, how the job is finished afterwards)
CONSOLIDATE_KILLS = [
    ("creating", signal.SIGKILL, "resume"), ("creating", signal.SIGTERM, "cancel"),
    ("copying", signal.SIGKILL, "resume"), ("copying", signal.SIGTERM, "cancel"),
    ("ready", signal.SIGKILL, "cancel"), ("ready", signal.SIGTERM, "resume"),
    ("barrier", signal.SIGKILL, "resume"), ("pivoted", signal.SIGTERM, "resume"),
]
BACKUP_KILLS = [
    ("snapshot", signal.SIGTERM, "resume"), ("convert", signal.SIGKILL, "resume"),
    ("ready", signal.SIGKILL, "cancel"), ("pivoted", signal.SIGTERM, "resume"),
]
HOLD = "60"


def held(phase: str, workdir: Path) -> tuple[dict[str, str], ConvertGate | None]:
    """The environment that holds a command in phase (and the convert gate, if any)."""
    if phase == "copying":
        return {"VDISK_TEST_COPY_DELAY": "0.5"}, None
    if phase == "convert":
        gate = ConvertGate(workdir, hold=60)
        return gate.env, gate
    return {"VDISK_TEST_HOLD": f"{phase}:{HOLD}",
            "VDISK_TEST_RELEASE": str(workdir / "release")}, None


def reach(phase: str, root: Path, bg: Background, gate: ConvertGate | None,
          top_before: Path) -> None:
    """Wait (bounded) until the held command is in phase."""
    if gate is not None:
        gate.wait_started()
        return
    if phase in ("snapshot", "pivoted", "creating", "barrier"):
        end = time.monotonic() + 60
        while not _in(phase, root, top_before):
            assert bg.proc.poll() is None, bg.err.read_text()
            assert time.monotonic() < end, f"no {phase} within 60 s"
            time.sleep(0.01)
        return
    wait_phase(root, phase, bg)


def _in(phase: str, root: Path, top_before: Path) -> bool:
    if phase == "creating":           # the new image, under its temporary name
        return any((root / "images").glob(".*.creating"))
    if phase == "barrier":            # the hold's mark: the journal still says ready
        if not (root.parent / "release.barrier").exists():
            return False
        jobs = catalog_jobs(root)
        assert jobs[0]["state"] == "ready" and catalog_top(root, "a") == top_before, jobs[0]
        return True
    top = catalog_top(root, "a")
    if phase == "snapshot":
        return top != top_before
    jobs = catalog_jobs(root)         # pivoted: the new top and the pivot in one step
    return bool(jobs) and jobs[0]["state"] == "pivoting" and top == root / jobs[0]["target"]


def recover(root: Path, finish: str, where: str) -> str:
    """The commands after the kill: a clear job list, then resume or cancel."""
    jobs = json.loads(ok(vdisk("job", "list", "-d", root, "--json"), "job list").stdout)["jobs"]
    states = [j["state"] for j in jobs]
    assert all(s in FINAL for s in states), f"{where}: job list after the kill: {states}"
    if not jobs:
        return "no job"
    job = jobs[0]
    if job["state"] != "interrupted":
        refusal(vdisk("job", "resume", str(job["id"]), "-d", root),
                f"job resume of a {job['state']} job")
        r = vdisk("job", "cancel", str(job["id"]), "-d", root, "--json")
        if r.returncode:                # refused, or nothing to do: the state stays
            refusal(r, f"job cancel of a {job['state']} job")
        else:
            assert json.loads(r.stdout)["state"] == job["state"], f"{where}: {r.stdout}"
        return f"{job['kind']} {job['state']}"
    r = ok(vdisk("job", finish, str(job["id"]), "-d", root, "--json"), f"job {finish}")
    after = json.loads(r.stdout)["state"]
    assert after == ("done" if finish == "resume" else "cancelled"), f"{where}: {r.stdout}"
    return f"interrupted, then {after}"


def killed(root: Path, tmp_path: Path, command: list[str | Path], phase: str, sig: int,
           finish: str) -> tuple[Background, str]:
    """Run command held in phase, signal it there, recover. Returns (bg, outcome)."""
    where = f"{command[0]} killed by {signal.Signals(sig).name} while {phase}"
    env, gate = held(phase, tmp_path)
    top_before = catalog_top(root, "a")
    bg = Background(command, tmp_path, env=env, name=command[0])
    try:
        reach(phase, root, bg, gate, top_before)
        bg.signal(sig, release=tmp_path / "release")
        orphans = wait_group_gone(bg.pgid)
    finally:
        bg.cleanup()
    assert not orphans, f"{where}: processes it started outlive it: {orphans}"
    outcome = recover(root, finish, where)
    jobcheck.count(f"{where}: {outcome}")
    return bg, where


@pytest.mark.parametrize(("phase", "sig", "finish"), CONSOLIDATE_KILLS,
                         ids=[f"{p}-{s.name}-{f}" for p, s, f in CONSOLIDATE_KILLS])
def test_consolidate_killed(tmp_path: Path, phase: str, sig: int, finish: str) -> None:
    root = tmp_path / "ds"
    _ds, initial = disk_a(root)
    new = root / "images" / "a-new.qcow2"
    _bg, where = killed(root, tmp_path, ["consolidate", "a", "-d", root, "--to", new],
                        phase, sig, finish)
    top = catalog_top(root, "a")
    jobcheck.qemu_final(top, initial, tmp_path / "m.raw", where, allow_leaks=True)
    images = {p.name for p in (root / "images").iterdir()}
    chain = {p.name for p in jobcheck.chain_of(top)}
    assert images == chain, f"{where}: images outside the chain: {images - chain}"
    assert not leftovers(root, tmp_path), f"{where}: {leftovers(root, tmp_path)}"


@pytest.mark.parametrize(("phase", "sig", "finish"), BACKUP_KILLS,
                         ids=[f"{p}-{s.name}-{f}" for p, s, f in BACKUP_KILLS])
def test_backup_killed(tmp_path: Path, phase: str, sig: int, finish: str) -> None:
    root = tmp_path / "ds"
    _ds, initial = disk_a(root)
    dest = tmp_path / "out" / "backup.qcow2"
    dest.parent.mkdir()
    _bg, where = killed(root, tmp_path, ["backup", "a", "--to", dest, "-d", root],
                        phase, sig, finish)
    # the next backup works (or refuses in one line a destination that exists)
    again = vdisk("backup", "a", "--to", dest, "-d", root, "--json")
    if again.returncode:
        assert dest.exists(), refusal(again, f"{where}: the next backup")
    jobcheck.count(f"{where}: next backup {'refused' if again.returncode else 'done'}")
    assert jobcheck.on_disk_view(dest, tmp_path / "b.raw") == initial, where
    top = catalog_top(root, "a")
    jobcheck.qemu_final(top, initial, tmp_path / "m.raw", where, [dest], allow_leaks=True)
    assert not leftovers(root, tmp_path), f"{where}: {leftovers(root, tmp_path)}"
