"""`pivot: false`: the job waits at ready, in sync, for job-complete or job-cancel.

Writers run on three connections throughout. A job held at ready keeps
mirroring (its bytes_mirrored grows, the disk keeps its old chain) and
job-complete then pivots with the writers still running. job-cancel, from
ready or while copying, leaves the chain exactly as it was, the data intact,
and no new image behind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest
from cons_control import ControlClient
from cons_datastore import (
    LayeredDisk,
    ServedDatastore,
    assert_no_orphans,
    chain_of,
    check_chain,
    compare_with,
    first_difference,
    read_export,
)
from cons_writers import Writers

NEW = "images/a-new.qcow2"
KiB = 1024
MiB = 1024 * KiB


def expected_after(chain: list[str], mode: str) -> tuple[list[str], list[str]]:
    """(chain, dropped) after consolidating the top into its backing image (or --to NEW)."""
    if mode == "to":
        return [NEW, *chain[2:]], chain[:2]
    return chain[1:], chain[:1]


def consolidate_held(ctl: ControlClient, mode: str) -> dict[str, Any]:
    """Start a ``pivot: false`` job on disk "a", into its backing image or --to NEW."""
    args = {"to": NEW} if mode == "to" else {}
    return ctl.execute("consolidate", disk="a", pivot=False, **args)["job"]


def start_writers(served: ServedDatastore, disk: LayeredDisk, **kw: object) -> Writers:
    seed = random.SystemRandom().randrange(2**32)
    return Writers(served.socket, disk.name, disk.initial, seed=seed, **kw).start()  # type: ignore[arg-type]


def assert_final(served: ServedDatastore, disk: LayeredDisk, oracle: bytes, chain: list[str],
                 gone: list[str], scratch: Path) -> None:
    """Data through NBD, then (stopped) catalog, chain, checks, compare, leftovers."""
    ds = disk.ds
    got = read_export(served.socket, disk.name, len(oracle))
    assert got == oracle, first_difference(got, oracle)
    assert served.stop() in (0, -15), served.log()
    top = ds.dir / chain[0]
    assert ds.catalog_top(disk.name) == top
    assert chain_of(top) == [(ds.dir / p).resolve() for p in chain]
    check_chain(top, oracle, scratch)
    for rel in gone:
        assert not (ds.dir / rel).exists(), f"{rel} still exists"
    assert_no_orphans(ds)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["into", "to"])
def test_ready_stays_in_sync_until_complete(
        disk_a: LayeredDisk, serve_ds: Callable[..., ServedDatastore], tmp_path: Path,
        mode: str) -> None:
    served = serve_ds(disk_a.ds)
    ctl = served.client()
    before = ctl.disk("a")["chain"]
    writers = start_writers(served, disk_a)
    try:
        writers.wait_acked(50)
        job = consolidate_held(ctl, mode)
        ready = ctl.wait_job(job["id"], ("ready",))
        assert ready["state"] == "ready", ready
        assert ready["passes"] == 1 and ready["bytes_copied"] <= ready["copy_set_bytes"]
        writers.wait_acked(300)
        still = ctl.job(job["id"])
        assert still["state"] == "ready", still
        assert still["bytes_mirrored"] > ready["bytes_mirrored"], (ready, still)
        assert still["bytes_copied"] == ready["bytes_copied"], "the copy must not iterate"
        disk = ctl.disk("a")
        assert disk["chain"] == before and disk["job"]["state"] == "ready", disk
        done = ctl.execute("job-complete", id=job["id"])["job"]
        assert done["state"] == "done", done
        writers.wait_acked(50)
    finally:
        writers.stop()
    assert done["passes"] == 1 and done["bytes_copied"] <= done["copy_set_bytes"], done
    chain, dropped = expected_after(before, mode)
    assert done["top_after"] == chain[0] and sorted(done["dropped"]) == sorted(dropped), done
    assert_final(served, disk_a, bytes(writers.oracle), chain, dropped, tmp_path / "o.raw")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["into", "to"])
@pytest.mark.parametrize("when", ["ready", "copying"])
def test_cancel(request: pytest.FixtureRequest, serve_ds: Callable[..., ServedDatastore],
                tmp_path: Path, mode: str, when: str) -> None:
    disk: LayeredDisk = request.getfixturevalue("big_a" if when == "copying" else "disk_a")
    served = serve_ds(disk.ds)
    ctl = served.client()
    before = ctl.disk("a")["chain"]
    files_before = disk.ds.image_files()
    writers = start_writers(served, disk)
    try:
        writers.wait_acked(50)
        for _attempt in range(3):     # the copy may win the race with job-cancel: again
            job = consolidate_held(ctl, mode)
            if when == "ready":
                assert ctl.wait_job(job["id"], ("ready",))["state"] == "ready"
                writers.wait_acked(100)
            cancelled = ctl.execute("job-cancel", id=job["id"])["job"]
            assert cancelled["state"] == "cancelled", cancelled
            if when == "ready" or cancelled["bytes_copied"] < cancelled["copy_set_bytes"]:
                break
        else:
            pytest.fail(f"the job was never cancelled while copying: {cancelled}")
        writers.wait_acked(100)
        disk_info = ctl.disk("a")
        assert disk_info["chain"] == before and disk_info["job"] is None, disk_info
        assert ctl.job(job["id"])["state"] == "cancelled"
        err = ctl.call("job-complete", {"id": job["id"]})
        assert "error" in err, f"job-complete of a cancelled job: {err}"
    finally:
        writers.stop()
    gone = [NEW] if mode == "to" else []
    assert_final(served, disk, bytes(writers.oracle), before, gone, tmp_path / "o.raw")
    assert disk.ds.image_files() == files_before


@pytest.mark.parametrize("mode", ["into", "to"])
def test_sigterm_with_a_job_at_ready_cancels_it(
        disk_a: LayeredDisk, serve_ds: Callable[..., ServedDatastore], tmp_path: Path,
        mode: str) -> None:
    """A clean shutdown is not a crash: the job is cancelled, the new image removed."""
    served = serve_ds(disk_a.ds)
    ctl = served.client()
    before = ctl.disk("a")["chain"]
    writers = start_writers(served, disk_a)
    try:
        writers.wait_acked(50)
        job = consolidate_held(ctl, mode)
        assert ctl.wait_job(job["id"], ("ready",))["state"] == "ready"
        writers.wait_acked(50)
    finally:
        writers.stop()
    assert served.stop() in (0, -15), served.log()
    assert disk_a.ds.catalog_job(job["id"])["state"] == "cancelled"
    assert not (disk_a.ds.dir / NEW).exists()
    again = serve_ds(disk_a.ds, name="again")
    ctl = again.client()
    assert ctl.job(job["id"])["state"] == "cancelled"
    assert_final(again, disk_a, bytes(writers.oracle), before, [NEW], tmp_path / "o.raw")


@pytest.mark.parametrize("op", ["zero", "trim"])
def test_cleared_cluster_stays_clear_after_cancel(
        big_a: LayeredDisk, serve_ds: Callable[..., ServedDatastore], tmp_path: Path,
        op: str) -> None:
    """A write mirrored into the `into` image, then the cluster cleared in the top.

    The target (a backing image of the old chain) now holds the write; once the
    job is cancelled, the top must still hide it::

        top     [ W ] -> zero/trim -> [ 0 ]      must stay a zero cluster
        target  [ W ]  (mirrored while copying, flushed at ready)
    """
    ds, size = big_a.ds, len(big_a.initial)
    expected = bytearray(big_a.initial)
    served = serve_ds(ds)
    ctl = served.client()
    h = nbd.NBD()
    h.set_export_name("a")
    h.connect_unix(str(served.socket))
    try:
        for attempt in range(3):     # the write must be mirrored while the job copies
            x = (88 + attempt) * MiB                # no layer holds data here
            job = ctl.execute("consolidate", disk="a", pivot=False)["job"]
            h.pwrite(b"\x77" * 512, x + 100)
            expected[x + 100:x + 612] = b"\x77" * 512
            if ctl.job(job["id"])["state"] == "copying":
                break
            ctl.execute("job-cancel", id=job["id"])
        else:
            pytest.fail("could not write while the job copied")
        assert ctl.wait_job(job["id"], ("ready",))["state"] == "ready"
        if op == "zero":
            h.zero(64 * KiB, x)                   # may trim: no NO_HOLE flag
        else:
            h.trim(64 * KiB, x)
        h.flush()
        expected[x:x + 64 * KiB] = bytes(64 * KiB)
        assert h.pread(1024, x) == bytes(1024)
        ctl.execute("job-cancel", id=job["id"])
        assert h.pread(1024, x) == bytes(1024)
    finally:
        h.shutdown()
    assert served.stop() in (0, -15), served.log()
    compare_with(ds.catalog_top("a"), bytes(expected), tmp_path / "o.raw")
    again = serve_ds(ds, name="again")
    got = read_export(again.socket, "a", size)
    assert got == bytes(expected), first_difference(got, bytes(expected))
