"""What a process acknowledged and did not flush, when it dies.

A worker that dies is restarted under its clients, and QEMU's NBD client
with ``reconnect-delay`` goes on as if nothing happened: its next flush
succeeds on the new worker. So every write the dead process acknowledged
(allocating a cluster, a new L2 table, overwriting, zeroing, trimming) must
be in the file as the next process reads it, flushed or not; the image may
leak clusters, never hold a corruption. The writes run in a child process
that dies with os._exit (no flush, no close), at random points of a random
sequence.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vdisk import qemu_img

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from vdisk_block import open_disk
disk = open_disk(sys.argv[2])
for op in json.loads(sys.argv[3]):
    kind, off, n, byte = op
    if kind == "write":
        disk.write(bytes([byte]) * n, off)
    elif kind == "zero":
        disk.zero(n, off, may_trim=bool(byte & 1))
    elif kind == "trim":
        disk.trim(n, off)
    elif kind == "flush":
        disk.flush()
os._exit(0)         # dies: no flush, no close
"""


def _ops(rnd: random.Random, size: int, cluster: int) -> list[list[int]]:
    ops = []
    for _ in range(rnd.randrange(1, 40)):
        kind = rnd.choices(["write", "zero", "trim", "flush"], [8, 2, 1, 1])[0]
        off = rnd.randrange(0, size // 512) * 512
        n = min(rnd.choice([512, 4096, cluster, 3 * cluster + 512, 1 << 20]), size - off)
        ops.append([kind, off, n, rnd.randrange(1, 256)])
    return ops


def _model(ops: list[list[int]], base: bytearray, cluster: int) -> bytearray:
    data = bytearray(base)
    for kind, off, n, byte in ops:
        if kind == "write":
            data[off:off + n] = bytes([byte]) * n
        elif kind == "zero":
            data[off:off + n] = bytes(n)
        elif kind == "trim":        # whole clusters covered read zeros (v3 top)
            first, end = -(-off // cluster), (off + n) // cluster
            if end > first:
                data[first * cluster:end * cluster] = bytes((end - first) * cluster)
    return data


@pytest.mark.crash
@pytest.mark.parametrize("cluster", [512, 65536])
@pytest.mark.parametrize("seed", range(6))
def test_acknowledged_writes_survive_the_death_of_the_process(tmp_path: Path, cluster: int,
                                                              seed: int) -> None:
    rnd = random.Random(seed * 1000 + cluster)
    size = 8 * MiB
    base = tmp_path / "base.qcow2"
    qemu_img.create(base, size=size, options={"cluster_size": cluster})
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 3M", str(base)], check=True,
                   capture_output=True)
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, size=size, backing="base.qcow2", backing_fmt="qcow2",
                    options={"cluster_size": cluster})
    ops = _ops(rnd, size, cluster)
    subprocess.run([sys.executable, "-c", CHILD, str(REPO / "plugin"), str(top),
                    json.dumps(ops)], check=True, timeout=120)
    result = qemu_img.check(top)
    assert result["corruptions"] == 0, result
    expected = tmp_path / "expected.raw"
    expected.write_bytes(_model(ops, bytearray(b"\x11" * (3 * MiB) + bytes(5 * MiB)), cluster))
    qemu_img.compare(top, expected, fmt_b="raw")
