"""One job on one random chain of a served datastore, while two NBD connections write.

The served twin of :mod:`jobengine`: the chain is built by QEMU inside a
datastore and registered as disk ``d``; the datastore is served
(:func:`jobserve.serve_datastore`), the guest writes through two libnbd
connections (and reads through two more with the parallel thread model), and
the job runs through the control socket, or as the ``vdisk`` command for
backup and replicate. Checks as in the engine cases: the guest view through
NBD equals the model while copying (when the copy is caught), at ready, after
the pivot (also the files of the catalog's top, as a crash would leave them)
and after serving again; with the server stopped, ``qemu-img check`` is clean,
``qemu-img compare`` equal, and no image is left that no disk uses.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jobcheck
from cliharness import CLI, run_vdisk
from cons_control import ControlClient, ControlError
from jobcheck import count, verify_view
from jobengine import Plan
from jobguest import Guest, Journal, check_outside
from jobserve import NbdPort, ServedDatastore, serve_datastore
from jobshapes import Built, ShapeSpec, build

from vdisk_block.catalog import Catalog

DISK = "d"


def make_datastore(spec: ShapeSpec, root: Path) -> tuple[Path, Built]:
    """A datastore at root whose disk ``d`` is the chain of spec."""
    ds = root / "ds"
    Catalog.init(str(ds)).close()
    built = build(spec, ds / "images", prefix="d-")
    cat = Catalog(str(ds))
    try:
        cat.add_disk(DISK, os.path.relpath(built.top, ds))
    finally:
        cat.close()
    return ds, built


def used_images(ds: Path) -> set[Path]:
    cat = Catalog(str(ds))
    try:
        tops = [ds / r["top"] for r in cat.disks()]
    finally:
        cat.close()
    return {p for top in tops for p in jobcheck.chain_of(top)}


@dataclass
class ServedCase:
    built: Built
    ds: Path
    plan: Plan
    workdir: Path
    srv: ServedDatastore = field(init=False)
    ctl: ControlClient = field(init=False)
    journal: Journal = field(init=False)
    guest: Guest = field(init=False)
    checker: NbdPort = field(init=False)
    also: list[Path] = field(default_factory=list)
    step: int = 0

    @property
    def where(self) -> str:
        return f"served {self.plan.describe()}; shape {self.built.spec.describe()}"

    def run(self) -> None:
        parallel = self.plan.parallel
        self.journal = Journal(self.built.initial)
        with serve_datastore(self.ds, self.workdir, parallel=parallel) as srv:
            self.srv, self.ctl = srv, srv.control()
            self.checker = NbdPort(srv.connect(DISK))
            verify_view(self.checker.read, self.built.initial, f"{self.where}: served")
            self.guest = Guest(self.journal, lambda: NbdPort(srv.connect(DISK)), writers=2,
                               readers=2 if parallel else 0, seed=self.plan.seed,
                               flush_weight=0.5 if parallel else 0.05, label=self.where)
            self.guest.start()
            try:
                self.guest.run_ops(10)
                for _ in range(self.plan.snapshots_first):
                    self.guest.phase = "a snapshot"
                    self.ctl.execute("snapshot", disk=DISK)
                    self.guest.phase = "writes after a snapshot"
                SERVED_JOBS[self.plan.kind](self)
                self.guest.run_ops(10)
                self.checkpoint("at the end")
            finally:
                self.guest.stop()
            assert srv.stop() in (0, -15), srv.log()
        model = bytes(self.journal.model)
        top = self.srv.top(DISK)
        jobcheck.qemu_final(top, model, self.workdir / "model.raw", self.where, self.also)
        images = {p.resolve() for p in (self.ds / "images").iterdir()}
        assert images <= used_images(self.ds), \
            f"{self.where}: images no disk uses: {sorted(map(str, images - used_images(self.ds)))}"
        with serve_datastore(self.ds, self.workdir, parallel=parallel, name="again") as srv:
            verify_view(NbdPort(srv.connect(DISK)).read, model, f"{self.where}: served again")

    def checkpoint(self, what: str, crash: bool = False) -> None:
        self.guest.pause()
        try:
            self.step += 1
            verify_view(self.checker.read, self.journal.snapshot(), f"{self.where}: {what}",
                        seed=self.plan.seed + self.step)
            if crash:
                want, unknown = self.journal.durable()
                top = self.srv.top(DISK)
                got = jobcheck.on_disk_view(top, self.workdir / "crash.raw")
                check_outside(got, want, unknown, f"{self.where}: {what}: on-disk view of "
                              f"{top.name} (what a crash would leave)")
        finally:
            self.guest.resume()

    def chain(self) -> list[str]:
        return list(self.ctl.disk(DISK)["chain"])

    def consolidate(self, collapse: int, new: bool, cancel: str | None = None) -> None:
        chain = self.chain()
        args: dict[str, Any] = {}
        if new:
            # --to replaces the layers from the top down to `into` (at least two)
            collapse = max(2, collapse)
            args = {"to": "images/d-new.qcow2", "into": chain[collapse - 1]}
        elif collapse > 1:
            args = {"into": chain[collapse]}
        self.guest.phase = "the copy"
        try:
            job = self.ctl.execute("consolidate", disk=DISK, pivot=False, **args)["job"]
        except ControlError as e:
            count(f"served job refused: {e.desc.split(':')[-1].strip()[:60]}")
            self.checkpoint("after a refused job")
            return
        if cancel == "copying":
            done = self.ctl.execute("job-cancel", id=job["id"])["job"]
            assert done["state"] == "cancelled", f"{self.where}: {done}"
            self.guest.phase = "writes after a cancel"
            count("served cancels while copying" if done["bytes_copied"] < done["copy_set_bytes"]
                  else "served cancels (the copy was done)")
            self.checkpoint("cancelled")
            return
        self.guest.run_ops(5)
        copying = self.ctl.job(job["id"])["state"] == "copying"
        self.checkpoint("while copying" if copying else "copied")
        count(f"served checks while copying{'' if copying else ' (copy already done)'}")
        ready = self.ctl.wait_job(job["id"], ("ready",), deadline=30)
        assert ready["state"] == "ready", f"{self.where}: {ready}"
        self.guest.phase = "ready"
        self.guest.run_ops(10)
        self.checkpoint("ready", crash=True)
        if cancel == "ready":
            done = self.ctl.execute("job-cancel", id=job["id"])["job"]
            assert done["state"] == "cancelled", f"{self.where}: {done}"
            self.guest.phase = "writes after a cancel"
            count("served cancels when ready")
            self.checkpoint("cancelled when ready", crash=True)
            assert self.chain() == chain, f"{self.where}: {self.chain()} != {chain}"
            return
        self.guest.phase = "the pivot"
        done = self.ctl.execute("job-complete", id=job["id"])["job"]
        self.guest.phase = "writes after the pivot"
        assert done["state"] == "done", f"{self.where}: {done}"
        assert self.chain()[0] == done["top_after"], f"{self.where}: {done}"
        self.checkpoint("after the pivot", crash=True)
        self.guest.run_ops(10)
        self.checkpoint("writing on the new top")

    def while_snapshot_taken(self, *command: str) -> tuple[Any, int]:
        """Run a vdisk command that snapshots the disk first; the guest waits from
        the start until the snapshot is recorded (so the snapshot's content is
        exactly the model then), and then writes on while the command goes on."""
        before = self.srv.top(DISK)
        self.guest.pause()
        t0 = self.journal.mark()
        proc = subprocess.Popen([*CLI, *command, "--json"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            end = time.monotonic() + 60
            while self.srv.top(DISK) == before and proc.poll() is None:
                assert time.monotonic() < end, f"{self.where}: no snapshot in 60 s"
                time.sleep(0.005)
        finally:
            self.guest.phase = f"vdisk {command[0]} after its snapshot"
            self.guest.resume()
        out, err = proc.communicate(timeout=120)
        self.guest.phase = f"writes after vdisk {command[0]}"
        assert proc.returncode == 0, f"{self.where}: vdisk {' '.join(command)}: {err}"
        return out, t0


def _snapshot(case: ServedCase) -> None:
    t0 = case.journal.mark()
    snap = case.ctl.execute("snapshot", disk=DISK)
    t1 = case.journal.mark()
    case.checkpoint("after the snapshot")
    want, unknown = case.journal.view_at(t0, t1)
    got = jobcheck.on_disk_view(case.ds / snap["frozen"], case.workdir / "frozen.raw")
    check_outside(got, want, unknown, f"{case.where}: the frozen chain")


def _consolidate(case: ServedCase) -> None:
    case.consolidate(case.plan.collapse, case.plan.new, case.plan.cancel)


def _backup(case: ServedCase) -> None:
    backup = case.workdir / "backup.qcow2"
    out, t0 = case.while_snapshot_taken("backup", DISK, "--to", str(backup), "-d", str(case.ds))
    want, unknown = case.journal.view_at(t0)
    got = jobcheck.on_disk_view(backup, case.workdir / "backup.raw")
    check_outside(got, want, unknown, f"{case.where}: the backup")
    case.also.append(backup)
    case.checkpoint("after the backup")


def _replicate(case: ServedCase) -> None:
    target = case.workdir / "replica"
    run_vdisk("datastore", "init", target)
    out, t0 = case.while_snapshot_taken("replicate", DISK, "-d", str(case.ds), "--to",
                                        str(target))
    want, unknown = case.journal.view_at(t0)
    cat = Catalog(str(target))
    try:
        top = target / cat.disk(DISK)["top"]
    finally:
        cat.close()
    got = jobcheck.on_disk_view(top, case.workdir / "replica.raw")
    check_outside(got, want, unknown, f"{case.where}: the replica")
    case.also.extend(jobcheck.chain_of(top))
    case.checkpoint("after the replication")
    case.consolidate(1, False)


SERVED_JOBS = {
    "snapshot": _snapshot,
    "parent": _consolidate,
    "into": _consolidate,
    "to": _consolidate,
    "cancel-copying": _consolidate,
    "cancel-ready": _consolidate,
    "backup": _backup,
    "replicate": _replicate,
}
