"""``vdisk job`` after a disk's worker was killed with SIGKILL while a job was ready.

The supervisor restarts the worker on the same endpoint; the new worker
finds the job ``interrupted``; ``vdisk job resume`` finishes it, ``vdisk job
cancel`` rolls it back (also offline, after the server stopped), and either
way the disk serves what the clients wrote and no orphan image remains.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from cliharness import Datastore, MiB, Serve, Served, connect, wait_gone

from vdisk import qemu_img


def ready_job_then_kill(datastore: Datastore, serve: Serve,
                        *extra: str) -> tuple[dict, Served]:
    datastore.create("vm1", "16M")
    served = serve(datastore)
    with connect(served.uri("vm1")) as h:
        h.pwrite(b"\x41" * (2 * MiB), 0)
        h.flush()
        datastore.vdisk("snapshot", "vm1")
        h.pwrite(b"\x42" * MiB, MiB)
        h.flush()
    job = datastore.json("consolidate", "vm1", "--no-pivot", *extra)
    assert job["state"] == "ready"
    worker = served.worker_pid("vm1")
    os.kill(worker, signal.SIGKILL)
    wait_gone(worker)
    deadline = time.monotonic() + 10                # restarted on the same endpoint
    while (w := served.worker("vm1"))["state"] != "running" or w["pid"] == worker:
        assert time.monotonic() < deadline, w
        time.sleep(0.05)
    assert w["restarts"] == 1 and served.proc.poll() is None
    return job, served


def expected() -> bytes:
    return b"\x41" * MiB + b"\x42" * MiB


@pytest.mark.crash
def test_resume_after_kill(datastore: Datastore, serve: Serve) -> None:
    job, served = ready_job_then_kill(datastore, serve)
    chain = datastore.disk("vm1")["chain"]
    shown = datastore.json("job", "show", str(job["id"]))
    assert shown["state"] == "interrupted" and shown["error"]
    with connect(served.uri("vm1")) as h:
        assert h.pread(2 * MiB, 0) == expected()
    resumed = datastore.json("job", "resume", str(job["id"]))
    assert resumed["state"] == "done" and resumed["top_after"] == chain[1]
    assert datastore.disk("vm1")["chain"] == [chain[1]]
    with connect(served.uri("vm1")) as h:
        assert h.pread(2 * MiB, 0) == expected()
    served.stop()
    assert datastore.images() == [os.path.basename(chain[1])]
    qemu_img.check_clean(datastore.path / chain[1])


@pytest.mark.crash
def test_cancel_after_kill_rolls_back(datastore: Datastore, serve: Serve) -> None:
    new = datastore.path / "images" / "target.qcow2"
    job, served = ready_job_then_kill(datastore, serve, "--to", str(new))
    served.stop()
    chain = datastore.disk("vm1")["chain"]
    assert new.exists()
    # offline this time: the command runs the recovery itself
    assert datastore.json("job", "show", str(job["id"]))["state"] == "interrupted"
    cancelled = datastore.json("job", "cancel", str(job["id"]))
    assert cancelled["state"] == "cancelled"
    assert not new.exists()
    assert datastore.disk("vm1")["chain"] == chain
    assert datastore.images() == sorted(os.path.basename(p) for p in chain)
    served = serve(datastore)
    with connect(served.uri("vm1")) as h:
        assert h.pread(2 * MiB, 0) == expected()
