"""The catalog shared by a worker's threads, and what recovery reads in its journal.

Every read takes the connection's lock. A worker's threads (the control
socket, a job's automatic pivot, the copy pass's journal updates) share one
sqlite connection. A statement run without the lock can take another
thread's error: a pivot once failed in its check of the disk's users with
"no such table: snapshots", the error of a query another thread made.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from vdisk_block import snapshots
from vdisk_block.catalog import Catalog


def test_reads_in_threads_never_see_each_others_errors(tmp_path: Path) -> None:
    Catalog.init(str(tmp_path / "ds")).close()
    catalog = Catalog(str(tmp_path / "ds"))
    catalog.add_disk("a", "images/a.qcow2")
    job = catalog.add_job("a", "consolidate", target="images/a.qcow2")
    errors: list[str] = []
    stop = time.monotonic() + 3.0

    def missing_table() -> None:            # no snapshot was ever named: "no such table"
        while time.monotonic() < stop:
            try:
                assert snapshots.all_rows(catalog) == []
            except Exception as e:          # noqa: BLE001 - collected, asserted below
                errors.append(f"{type(e).__name__}: {e}")

    def reads() -> None:
        while time.monotonic() < stop:
            try:
                assert catalog.disk("a")["top"] == "images/a.qcow2"
                assert [d["name"] for d in catalog.disks()] == ["a"]
                assert catalog.job(job)["disk"] == "a"
                assert catalog.get_meta("format") is not None
            except Exception as e:          # noqa: BLE001 - collected, asserted below
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=missing_table), threading.Thread(target=reads),
               threading.Thread(target=reads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    catalog.close()
    assert not errors, sorted(set(errors))[:5]


def test_what_a_dead_pivot_left_is_judged_by_its_journal_and_top(tmp_path: Path) -> None:
    """recovery.verdict: a journal that reads pivoting with the new top named is
    done; one that reads pivoting with the old top (an older vdisk journaled
    the state on its own first) or ready is interrupted."""
    from vdisk_block import recovery

    Catalog.init(str(tmp_path / "ds")).close()
    catalog = Catalog(str(tmp_path / "ds"))
    catalog.add_disk("a", "images/top.qcow2")
    job = catalog.add_job("a", "consolidate", target="images/base.qcow2",
                          top_before="images/top.qcow2")
    catalog.update_job(job, state="ready")
    assert recovery.verdict(catalog, catalog.job(job)) == recovery.INTERRUPTED
    catalog.update_job(job, state="pivoting", top_after="images/base.qcow2")
    assert recovery.verdict(catalog, catalog.job(job)) == recovery.INTERRUPTED
    catalog.set_top("a", "images/base.qcow2", job=job, state="pivoting",
                    top_after="images/base.qcow2")
    assert recovery.verdict(catalog, catalog.job(job)) == "done"
    catalog.close()
