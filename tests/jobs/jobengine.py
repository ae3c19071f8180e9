"""One job on one random chain, driven through the engine API while a guest writes.

A case builds the chain with QEMU, opens it with ``open_disk``, starts the
guest (:mod:`jobguest`) and runs one job kind through its states; at every
step the guest pauses and the whole view is compared with the model::

    open ─ verify ─ guest writes ─ job start ─ COPYING: verify ─ READY: verify,
    on-disk view (crash) ─ pivot (readers and a write+flush racing it) ─ verify,
    on-disk view of the persisted top ─ writes on the new top ─ verify ─ close ─
    qemu-img check / compare ─ reopen ─ verify

Kinds: ``snapshot``; ``parent`` (the top into its backing file); ``into`` (the
top layers into a lower image); ``to`` (the top layers into a new image);
``cancel-copying`` and ``cancel-ready`` (one of those three, cancelled);
``backup`` (snapshot, ``qemu-img convert`` of the frozen layers, consolidate
back); ``replicate`` (snapshot, replicate the frozen chain to a second
datastore, consolidate back).

The copy is slowed (a millisecond per chunk, see :func:`slow_copy`) so that
the COPYING checks land while it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jobcheck
from hypothesis import strategies as st
from jobcheck import count, verify_view
from jobguest import Guest, Journal, check_outside
from jobshapes import Built

from vdisk import qemu_img
from vdisk_block import ImageError, open_disk
from vdisk_block.chainops import snapshot
from vdisk_block.disk import Disk
from vdisk_block.mirror import MirrorJob, State

KINDS = ("snapshot", "parent", "into", "to", "cancel-copying", "cancel-ready", "backup",
         "replicate")
PARALLEL_KINDS = ("parent", "into", "to", "backup")
STATE_DEADLINE = 30.0


class EnginePort:
    def __init__(self, disk: Disk) -> None:
        self.disk = disk

    def write(self, data: bytes, offset: int) -> None:
        self.disk.write(data, offset)

    def zero(self, length: int, offset: int, may_trim: bool) -> None:
        self.disk.zero(length, offset, may_trim=may_trim)

    def trim(self, length: int, offset: int) -> None:
        self.disk.trim(length, offset)

    def flush(self) -> None:
        self.disk.flush()

    def read(self, length: int, offset: int) -> bytes:
        return self.disk.read(length, offset)


def slow_copy(job: MirrorJob, delay: float, budget: float = 0.1) -> None:
    """Make each chunk of the copy pass take ``delay`` longer, up to ``budget``
    seconds in all (mirrored guest writes are not slowed): the copy thread is
    the one named ``vdisk-mirror``."""
    target = job._target        # the Disk of the target chain (private to the job)
    if target is None:
        return
    left = [budget]
    for name in ("write", "zero"):
        orig = getattr(target, name)

        def slowed(*args: object, _orig: Callable[..., None] = orig, **kw: object) -> None:
            if threading.current_thread().name == "vdisk-mirror" and left[0] > 0:
                left[0] -= delay
                time.sleep(delay)
            _orig(*args, **kw)

        setattr(target, name, slowed)


@dataclass
class Plan:
    """What a case does, drawn from the shape."""

    kind: str
    parallel: bool
    seed: int
    collapse: int = 1           # layers above the target (into / parent) or replaced (to)
    new: bool = False           # target is a new image
    chunk: int = 1 << 16
    cancel: str | None = None   # copying / ready
    snapshots_first: int = 0    # to reach the depth the job needs

    def describe(self) -> str:
        return (f"{self.kind}{' parallel' if self.parallel else ''} seed {self.seed} "
                f"collapse {self.collapse}{' to a new image' if self.new else ''} chunk "
                f"{self.chunk} cancel {self.cancel} snapshots first {self.snapshots_first}")


@st.composite
def plans(draw: st.DrawFn, kind: str, depth: int, parallel: bool = False) -> Plan:
    plan = Plan(kind, parallel, draw(st.integers(0, 2**31)),
                chunk=draw(st.sampled_from([16 << 10, 64 << 10, 256 << 10, 1 << 20])))
    job = kind
    if kind.startswith("cancel-"):
        plan.cancel = kind.split("-", 1)[1]
        job = draw(st.sampled_from(["parent", "into", "to"]))
    if job == "parent":
        plan.snapshots_first = max(0, 2 - depth)
    elif job == "into":
        plan.snapshots_first = max(0, 3 - depth)
        plan.collapse = draw(st.integers(2, depth + plan.snapshots_first - 1))
    elif job == "to":
        plan.new = True
        plan.collapse = draw(st.integers(1, depth))
    return plan


@dataclass
class EngineCase:
    built: Built
    plan: Plan
    workdir: Path
    disk: Disk = field(init=False)
    journal: Journal = field(init=False)
    guest: Guest = field(init=False)
    persisted: Path = field(init=False)     # the top a restart would open
    also: list[Path] = field(default_factory=list)   # other images to check at the end
    step: int = 0

    @property
    def where(self) -> str:
        return f"{self.plan.describe()}; shape {self.built.spec.describe()}"

    # -- steps ---------------------------------------------------------------------

    def run(self) -> None:
        self.disk = open_disk(str(self.built.top))
        self.persisted = self.built.top
        try:
            self.disk.concurrent_reads = self.plan.parallel
            verify_view(self.disk.read, self.built.initial, f"{self.where}: opened")
            self.journal = Journal(self.built.initial)
            self.guest = Guest(self.journal, lambda: EnginePort(self.disk),
                               writers=2, readers=2 if self.plan.parallel else 0,
                               seed=self.plan.seed,
                               flush_weight=0.5 if self.plan.parallel else 0.05,
                               label=self.where)
            self.guest.start()
            try:
                self.guest.run_ops(10)
                for _ in range(self.plan.snapshots_first):
                    self.snapshot()
                JOBS[self.plan.kind](self)
                self.guest.run_ops(10)
                self.checkpoint("at the end")
            finally:
                self.guest.stop()
        finally:
            self.disk.close()
        model = bytes(self.journal.model)
        top = Path(self.disk.path)
        assert top == self.persisted, f"{self.where}: serving {top}, persisted {self.persisted}"
        jobcheck.qemu_final(top, model, self.workdir / "model.raw", self.where, self.also)
        again = open_disk(str(top))
        try:
            verify_view(again.read, model, f"{self.where}: reopened")
        finally:
            again.close()

    def checkpoint(self, what: str, crash: bool = False) -> None:
        """Pause the guest; the view equals the model (and, with ``crash``, the files
        hold what the last flush promised); resume."""
        self.guest.pause()
        try:
            self.step += 1
            verify_view(self.disk.read, self.journal.snapshot(), f"{self.where}: {what}",
                        seed=self.plan.seed + self.step)
            if crash:
                want, unknown = self.journal.durable()
                got = jobcheck.on_disk_view(self.persisted, self.workdir / "crash.raw")
                check_outside(got, want, unknown, f"{self.where}: {what}: on-disk view of "
                              f"{self.persisted.name} (what a crash would leave)")
        finally:
            self.guest.resume()

    def snapshot(self) -> Path:
        new = self.workdir / f"snap{self.step}-{len(self.disk.layers)}.qcow2"
        self.step += 1
        self.guest.phase = "a snapshot"
        snapshot(self.disk, str(new), lambda p: setattr(self, "persisted", Path(p)))
        self.guest.phase = "writes after a snapshot"
        return new

    def job(self, collapse: int, new: bool) -> MirrorJob | None:
        """Start a job, or None if it was refused (a clear one-line reason)."""
        new_path = self.workdir / f"new{self.step}.qcow2" if new else None
        try:
            job = MirrorJob(self.disk, collapse, chunk=self.plan.chunk,
                            new_path=str(new_path) if new_path else None).start()
        except ImageError as e:
            assert "\n" not in str(e), e
            count(f"engine job refused: {e.reason.split(':')[0][:60]}")
            return None
        slow_copy(job, 0.002)
        self.guest.phase = "the copy"
        return job

    def consolidate(self, collapse: int, new: bool, cancel: str | None = None) -> None:
        job = self.job(collapse, new)
        if job is None:
            self.checkpoint("after a refused job")
            return
        self.guest.run_ops(5)
        copying = job.state is State.COPYING
        self.checkpoint("while copying")
        count(f"engine checks while copying{'' if copying else ' (copy already done)'}")
        if cancel == "copying" and job.state is State.COPYING:
            job.cancel()
            self.guest.phase = "writes after a cancel"
            count("engine cancels while copying")
            self.checkpoint("cancelled while copying")
            return
        state = job.wait((State.READY,), STATE_DEADLINE)
        assert state is State.READY, f"{self.where}: job {state.value}: {job.error}"
        self.guest.phase = "ready"
        self.guest.run_ops(10)           # mirrored writes after the READY flush
        self.checkpoint("ready", crash=True)
        if cancel is not None:
            job.cancel()
            self.guest.phase = "writes after a cancel"
            count("engine cancels when ready")
            self.checkpoint("cancelled when ready", crash=True)
            return
        target = Path(job.target_path)
        self.guest.phase = "the pivot"
        job.complete(lambda p: setattr(self, "persisted", Path(p)))
        self.guest.phase = "writes after the pivot"
        assert self.persisted == target, f"{self.where}: persisted {self.persisted}"
        assert Path(self.disk.path) == target, self.disk.path
        self.checkpoint("after the pivot", crash=True)
        self.guest.run_ops(10)
        self.checkpoint("writing on the new top")


def _snapshot_job(case: EngineCase) -> None:
    t0 = case.journal.mark()
    frozen = Path(case.disk.path)
    case.snapshot()
    t1 = case.journal.mark()
    case.checkpoint("after the snapshot")
    want, unknown = case.journal.view_at(t0, t1)
    got = jobcheck.on_disk_view(frozen, case.workdir / "frozen.raw")
    check_outside(got, want, unknown, f"{case.where}: the frozen chain")
    case.snapshot()
    case.checkpoint("after a second snapshot")


def _consolidate_job(case: EngineCase) -> None:
    case.consolidate(case.plan.collapse, case.plan.new, case.plan.cancel)


def _backup_job(case: EngineCase) -> None:
    t0 = case.journal.mark()
    frozen = Path(case.disk.path)
    case.snapshot()
    t1 = case.journal.mark()
    backup = case.workdir / "backup.qcow2"
    case.guest.phase = "the backup's copy"
    qemu_img.convert(frozen, backup, "qcow2", force_share=True)
    want, unknown = case.journal.view_at(t0, t1)
    got = jobcheck.on_disk_view(backup, case.workdir / "backup.raw")
    check_outside(got, want, unknown, f"{case.where}: the backup")
    case.also.append(backup)
    case.consolidate(1, False)


def _replicate_job(case: EngineCase) -> None:
    from vdisk import replicate
    from vdisk.errors import Error

    t0 = case.journal.mark()
    frozen = Path(case.disk.path)
    case.snapshot()
    t1 = case.journal.mark()
    target = case.workdir / "replica"
    case.guest.phase = "the replication"
    try:
        with replicate.Session(str(target)) as session:
            session.add(str(frozen))
    except (Error, ImageError) as e:
        assert "\n" not in str(e), e
        assert any(layer.fmt == "raw" for layer in case.built.spec.layers), \
            f"{case.where}: replicate refused: {e}"
        count("engine replicate refused (raw base)")
    else:
        top = target / session.results[0]["top"]
        want, unknown = case.journal.view_at(t0, t1)
        got = jobcheck.on_disk_view(top, case.workdir / "replica.raw")
        check_outside(got, want, unknown, f"{case.where}: the replica")
        case.also.extend(jobcheck.chain_of(top))
    case.consolidate(1, False)


JOBS: dict[str, Callable[[EngineCase], None]] = {
    "snapshot": _snapshot_job,
    "parent": _consolidate_job,
    "into": _consolidate_job,
    "to": _consolidate_job,
    "cancel-copying": _consolidate_job,
    "cancel-ready": _consolidate_job,
    "backup": _backup_job,
    "replicate": _replicate_job,
}
