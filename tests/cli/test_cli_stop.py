"""Stopping `vdisk serve` while a client stays attached."""

from __future__ import annotations

import signal
import subprocess
import time

import nbd
from cliharness import Datastore, alive, start_serve

from vdisk import qemu_io

MiB = 1 << 20


def test_sigterm_with_an_attached_client_flushes_and_stops(datastore: Datastore) -> None:
    """nbdkit 1.32 waits for clients on SIGTERM: vdisk serve bounds that wait."""
    datastore.create("vm", "16M")
    served = start_serve(datastore, "--stop-timeout", "1")
    worker = served.worker_pid("vm")
    h = nbd.NBD()
    h.connect_uri(served.uri("vm"))
    h.pwrite(b"\x6b" * MiB, 2 * MiB)             # acknowledged, never flushed by the client
    h.pread(4096, 0)
    time.sleep(0.5)                               # an idle client: nbdkit waits for it
    served.proc.send_signal(signal.SIGTERM)
    try:
        served.proc.wait(30)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        raise AssertionError("vdisk serve did not stop with a client attached") from None
    del h                                         # the client stayed attached until now
    stderr = (datastore.path / "serve.stderr").read_text()
    assert "disk vm: clients still attached" in stderr and "flushed and stopped" in stderr, \
        stderr
    assert not alive(worker)
    top = datastore.top("vm")
    qemu_io.run(top, f"read -P 0x6b {2 * MiB} {MiB}", fmt="qcow2")
    result = datastore.vdisk("disk", "info", "vm", "--json").json()
    assert result["name"] == "vm"
