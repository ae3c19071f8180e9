"""kill -9 of nbdkit while a consolidation runs, then serve the datastore again.

Writers on three connections flush every 20 ms; the kill lands while the job
copies, while it waits at ready (``pivot: false``), or right after
job-complete was sent (the pivot may or may not have been recorded: a trial
accepts whichever state the journal shows). After the restart:

- the disk serves every byte the last acknowledged flush made durable (ranges
  of requests not covered by it are not checked);
- query-jobs shows ``interrupted``, or ``done`` if the pivot was recorded (its
  dropped images then already deleted);
- job-resume finishes an interrupted job (with new writers running), or
  job-cancel rolls it back to the old chain;
- no orphan images remain and ``qemu-img check`` finds no corruption.

``VDISK_CONS_KILL_TRIALS`` sets the number of pivoting trials (default 8).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cons_control import ControlError
from cons_datastore import (
    LayeredDisk,
    ServedDatastore,
    assert_no_orphans,
    chain_of,
    check_chain,
    first_difference,
    read_export,
)
from cons_writers import Writers
from diskmodel import gaps
from nbdharness import EXAMPLES_RUN

pytestmark = [pytest.mark.crash, pytest.mark.slow]

NEW = "images/a-new.qcow2"
PIVOT_TRIALS = int(os.environ.get("VDISK_CONS_KILL_TRIALS", "8"))

CASES = [(when, mode, finish) for when in ("copying", "ready") for mode in ("into", "to")
         for finish in ("resume", "cancel")]
CASES += [("pivoting", ("into", "to")[t % 2], ("resume", "cancel")[t // 2 % 2])
          for t in range(PIVOT_TRIALS)]


def expected_after(chain: list[str], mode: str) -> tuple[list[str], list[str]]:
    if mode == "to":
        return [NEW, *chain[2:]], chain[:2]
    return chain[1:], chain[:1]


def kill_during_job(served: ServedDatastore, disk: LayeredDisk, when: str, mode: str,
                    rng: random.Random) -> tuple[int, Writers]:
    """Run writers and a job, kill nbdkit at the point asked for; returns (job id, writers)."""
    ctl = served.client()
    writers = Writers(served.socket, "a", disk.initial, seed=rng.randrange(2**32),
                      flush_every=0.02).start()
    try:
        writers.wait_acked(50)
        args = {"to": NEW} if mode == "to" else {}
        job = ctl.execute("consolidate", disk="a", pivot=False, **args)["job"]
        if when == "copying":
            for _attempt in range(3):   # the copy may win the race with us: again
                now = ctl.job(job["id"])
                if now["state"] == "copying" and now["bytes_copied"] < now["copy_set_bytes"]:
                    break
                ctl.execute("job-cancel", id=job["id"])
                job = ctl.execute("consolidate", disk="a", pivot=False, **args)["job"]
            else:
                pytest.fail(f"could not catch the job copying: {now}")
        else:
            assert ctl.wait_job(job["id"], ("ready",))["state"] == "ready"
            writers.wait_acked(rng.randint(20, 100))
            if when == "pivoting":
                ctl.send_only("job-complete", id=job["id"])
                time.sleep(rng.uniform(0, 0.04))      # job-complete takes ~30 ms here
        served.kill()
    finally:
        writers.stop(expect_errors=True)
    return job["id"], writers


@pytest.mark.parametrize(("when", "mode", "finish"), CASES)
def test_kill9_during_consolidation(
        request: pytest.FixtureRequest, serve_ds: Callable[..., ServedDatastore],
        tmp_path: Path, when: str, mode: str, finish: str) -> None:
    disk: LayeredDisk = request.getfixturevalue("big_a" if when == "copying" else "disk_a")
    ds, size = disk.ds, len(disk.initial)
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    where = f"seed {seed}: kill while {when}, {mode}, then {finish}"
    before = [f"images/a-{i}.qcow2" for i in (2, 1, 0)]
    after, dropped = expected_after(before, mode)

    job_id, writers = kill_during_job(serve_ds(ds), disk, when, mode, rng)
    model, unknown = writers.durable()
    at_kill = ds.catalog_job(job_id)["state"]     # the journal as the crash left it

    served = serve_ds(ds, name="restarted")
    ctl = served.client()
    row = ctl.job(job_id)
    allowed = ("interrupted", "done") if when == "pivoting" else ("interrupted",)
    assert row["state"] in allowed, f"{where}: {row}"
    outcome = f"consolidate kill -9 while {when}: journal {at_kill} -> {row['state']}"
    EXAMPLES_RUN[outcome] = EXAMPLES_RUN.get(outcome, 0) + 1
    info = ctl.disk("a")
    chain = info["chain"]
    assert chain == (after if row["state"] == "done" else before), f"{where}: {row} {chain}"
    if row["state"] == "interrupted":
        assert info["job"] and info["job"]["id"] == job_id, f"{where}: {info}"
        assert ctl.call("snapshot", {"disk": "a"}).get("error"), "snapshot over a job"
    got = read_export(served.socket, "a", size)
    checked = gaps(unknown, size)
    for lo, hi in checked:
        diff = first_difference(got[lo:hi], model[lo:hi])
        assert diff == "identical", f"{where}: durable data lost in [{lo}, {hi}): {diff}"
    assert sum(hi - lo for lo, hi in checked) > size // 4, f"{where}: too little checked"

    # finish or roll back, with the guest writing again
    again = Writers(served.socket, "a", got, seed=rng.randrange(2**32)).start()
    try:
        again.wait_acked(50)
        if row["state"] == "done":
            for command in ("job-resume", "job-cancel", "job-complete"):
                with pytest.raises(ControlError):
                    ctl.execute(command, id=job_id)
            final, gone = after, dropped
        elif finish == "resume":
            resumed = ctl.execute("job-resume", id=job_id)["job"]
            assert resumed["state"] in ("copying", "ready", "pivoting", "done"), resumed
            done = ctl.wait_job(job_id, ("done",))
            assert done["state"] == "done", f"{where}: {done}"
            assert done["passes"] == 1 and done["bytes_copied"] <= done["copy_set_bytes"], done
            final, gone = after, dropped
        else:
            cancelled = ctl.execute("job-cancel", id=job_id)["job"]
            assert cancelled["state"] == "cancelled", f"{where}: {cancelled}"
            final, gone = before, [NEW] if mode == "to" else []
        again.wait_acked(50)
    finally:
        again.stop()
    assert ctl.disk("a")["chain"] == final, where
    assert ctl.disk("a")["job"] is None, where
    oracle = bytes(again.oracle)
    got = read_export(served.socket, "a", size)
    assert got == oracle, f"{where}: {first_difference(got, oracle)}"

    assert served.stop() in (0, -15), served.log()
    top = ds.catalog_top("a")
    assert top == ds.dir / final[0], where
    assert chain_of(top) == [(ds.dir / p).resolve() for p in final], where
    check_chain(top, oracle, tmp_path / "o.raw", allow_leaks=True)
    for rel in gone:
        assert not (ds.dir / rel).exists(), f"{where}: {rel} remains"
    assert_no_orphans(ds)
