"""Snapshot, consolidation and pivot while multi-connection writers run.

Three libnbd connections keep random writes, zeroes and trims of every size
(unaligned too) in flight from before the snapshot until after the pivot.
Afterwards every byte read through NBD equals the oracle of acknowledged
requests, and with nbdkit stopped, QEMU agrees: ``qemu-img check`` is clean on
every image of the final chain and ``qemu-img compare`` finds the oracle.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cons_control import ControlClient
from cons_datastore import (
    Datastore,
    LayeredDisk,
    ServedDatastore,
    assert_no_orphans,
    chain_of,
    check_chain,
    first_difference,
    raw_view,
    read_export,
)
from cons_writers import Writers
from diskmodel import gaps

from vdisk import qemu_img


def check_view(got: bytes, model: bytes, unknown: list[tuple[int, int]], where: str) -> None:
    """got equals model outside the unknown ranges."""
    for lo, hi in gaps(unknown, len(model)):
        diff = first_difference(got[lo:hi], model[lo:hi])
        assert diff == "identical", f"{where}: in [{lo}, {hi}): {diff}"


def snapshot_and_consolidate(ctl: ControlClient, writers: Writers, ds: Datastore, mode: str,
                             cycle: int, scratch: Path, where: str) -> dict[str, Any]:
    """One cycle with the writers running: snapshot, check the frozen image,
    consolidate (pivot), check the job. Returns the finished job."""
    top_before = ctl.disk("a")["top"]
    t0 = writers.mark()
    snap = ctl.execute("snapshot", disk="a")
    t1 = writers.mark()
    assert snap["frozen"] == top_before, snap
    # the frozen chain holds what was acknowledged before the snapshot was asked
    # for, and nothing sent after it was done
    frozen = ds.dir / snap["frozen"]
    assert qemu_img.check(frozen, force_share=True)["corruptions"] == 0
    check_view(raw_view(frozen, scratch), *writers.view_at(t0, t1), f"{where}: frozen image")
    writers.wait_acked(100)
    before = ctl.disk("a")["chain"]
    assert before[:2] == [snap["top"], snap["frozen"]], before
    new = f"images/a-new{cycle}.qcow2"
    args = {"to": new} if mode == "to" else {}
    job = ctl.execute("consolidate", disk="a", **args)["job"]
    assert job["state"] in ("copying", "ready", "pivoting", "done"), job
    job = ctl.wait_job(job["id"], ("done",))
    assert job["state"] == "done", f"{where}: {job}"
    writers.wait_acked(100)         # into the new top, after the pivot

    states = [e["data"]["state"] for e in ctl.events
              if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job["id"]]
    assert states == ["copying", "ready", "pivoting", "done"], states
    assert job["time_to_ready_s"] > 0 and job["duration_s"] >= job["time_to_ready_s"], job
    assert job["pivot_pause_ms"] > 0, job
    assert job["passes"] == 1, job
    assert 0 < job["bytes_copied"] <= job["copy_set_bytes"], job
    assert job["bytes_mirrored"] > 0, job
    after, dropped = ([new, *before[2:]], before[:2]) if mode == "to" else \
        (before[1:], before[:1])
    assert job["top_before"] == snap["top"], job
    assert job["top_after"] == after[0] and job["target"] == after[0], job
    assert sorted(job["dropped"]) == sorted(dropped), job
    disk = ctl.disk("a")
    assert disk["top"] == after[0] and disk["chain"] == after, disk
    assert disk["job"] is None, disk
    for rel in dropped:
        assert not (ds.dir / rel).exists(), f"{where}: dropped image {rel} still exists"
    return job


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["into", "to"])
def test_writers_through_snapshot_consolidate_pivot(
        disk_a: LayeredDisk, serve_ds: Callable[..., ServedDatastore], tmp_path: Path,
        mode: str) -> None:
    ds, size = disk_a.ds, len(disk_a.initial)
    served = serve_ds(ds)
    ctl = served.client()
    seed = random.SystemRandom().randrange(2**32)
    where = f"seed {seed} mode {mode}"
    writers = Writers(served.socket, "a", disk_a.initial, seed=seed, nconn=3).start()
    try:
        writers.wait_acked(100)
        for cycle in range(2):
            snapshot_and_consolidate(ctl, writers, ds, mode, cycle, tmp_path / "frozen.raw",
                                     f"{where} cycle {cycle}")
    finally:
        writers.stop()

    oracle = bytes(writers.oracle)
    got = read_export(served.socket, "a", size)
    assert got == oracle, f"{where}: {first_difference(got, oracle)}"
    chain = ctl.disk("a")["chain"]
    assert len(chain) == len(disk_a.chain), chain
    assert served.stop() in (0, -15), served.log()
    top = ds.dir / chain[0]
    assert ds.catalog_top("a") == top
    assert chain_of(top) == [(ds.dir / p).resolve() for p in chain]
    check_chain(top, oracle, tmp_path / "oracle.raw")
    assert_no_orphans(ds)
