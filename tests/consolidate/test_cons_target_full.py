"""The target's filesystem fills up: the job fails, the guest does not notice.

There are no mounts to fill here, so nbdkit runs under RLIMIT_FSIZE
(``prlimit --fsize``): no file it writes may grow beyond a bound chosen just
above the files that exist, so the top (overwritten in place by the guest)
and the catalog keep working while the new image of ``consolidate --to``
cannot hold the copy set. A write past the bound fails with EFBIG ("File too
large") once SIGXFSZ is ignored, as the Python runtime inside nbdkit does.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from cons_datastore import (
    LayeredDisk,
    ServedDatastore,
    assert_no_orphans,
    check_chain,
    first_difference,
    read_export,
)
from cons_writers import Writers

MiB = 1 << 20
NEW = "images/a-new.qcow2"
TOP_OWNED = [(2 * MiB, 6 * MiB), (26 * MiB, 30 * MiB)]   # whole clusters of a-2 (TOP_IO)


@pytest.mark.slow
def test_target_file_too_large_fails_the_job_only(
        disk_a: LayeredDisk, serve_ds: Callable[..., ServedDatastore], tmp_path: Path) -> None:
    ds = disk_a.ds
    written = [disk_a.chain[0], *ds.dir.glob("vdisk.db*")]
    limit = max(p.stat().st_size for p in written) + MiB
    served = serve_ds(ds, fsize=limit)
    ctl = served.client()
    before = ctl.disk("a")["chain"]
    seed = random.SystemRandom().randrange(2**32)
    # writes only, where the top already owns the clusters: the top never grows
    writers = Writers(served.socket, "a", disk_a.initial, seed=seed, regions=TOP_OWNED,
                      kinds=(1, 0, 0)).start()
    try:
        writers.wait_acked(50)
        job = ctl.execute("consolidate", disk="a", to=NEW)["job"]
        assert job["copy_set_bytes"] > limit, (limit, job)
        try:
            job = ctl.wait_job(job["id"], ("done", "failed"), deadline=30)
        except EOFError:
            pytest.fail(f"nbdkit died (exit {served.server.returncode}; SIGXFSZ is 25) "
                        f"instead of failing the job: {served.log()[-2000:]}")
        assert job["state"] == "failed", job
        assert "File too large" in (job["error"] or ""), f"unclear error: {job['error']!r}"
        assert served.server.returncode is None, "nbdkit exited"
        writers.wait_acked(200)           # the guest carries on
    finally:
        writers.stop()
    assert not (ds.dir / NEW).exists(), "the half-written new image remains"
    events = [e["data"]["state"] for e in ctl.events if e["event"] == "JOB_STATUS_CHANGE"]
    assert events and events[-1] == "failed", ctl.events
    disk = ctl.disk("a")
    assert disk["chain"] == before and disk["job"] is None, disk
    oracle = bytes(writers.oracle)
    got = read_export(served.socket, "a", len(oracle))
    assert got == oracle, f"seed {seed}: {first_difference(got, oracle)}"
    assert served.stop() in (0, -15), served.log()
    top = ds.catalog_top("a")
    assert top == disk_a.chain[0]
    check_chain(top, oracle, tmp_path / "o.raw")
    assert_no_orphans(ds)
