"""Test images for the benchmark, built with qemu-img and qemu-io.

All data is written by QEMU's tools so the images are what a user would have:
``qemu-img convert`` for the fully allocated image, ``qemu-io write -P`` for
chain layers and sparse images. Binaries are overridable by ``$QEMU_IMG`` and
``$QEMU_IO``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 1 << 20


class ToolError(Exception):
    """An image tool failed."""

    template = "{cmd} failed with exit {returncode}: {stderr}"

    def __init__(self, cmd: list[str], returncode: int, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(self.template.format(
            cmd=" ".join(cmd[:3]), returncode=returncode, stderr=stderr.strip()))


def run(cmd: list[str]) -> str:
    """Run ``cmd``; return its stdout, raise ToolError with its stderr on failure."""
    log.debug("running %s", " ".join(cmd[:8]) + (" ..." if len(cmd) > 8 else ""))
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        log.error("%s failed: %s", cmd[0], res.stderr.strip())
        raise ToolError(cmd, res.returncode, res.stderr)
    return res.stdout


def qemu_img(*args: str) -> str:
    return run([os.environ.get("QEMU_IMG", "qemu-img"), *args])


def qemu_io(image: Path, commands: list[str]) -> None:
    """Run qemu-io commands on ``image`` (qcow2), in batches to bound argv size."""
    binary = os.environ.get("QEMU_IO", "qemu-io")
    for i in range(0, len(commands), 2000):
        argv = [binary, "-f", "qcow2"]
        for c in commands[i:i + 2000]:
            argv += ["-c", c]
        run([*argv, str(image)])


def create_qcow2(path: Path, size: int, cluster_size: int, backing: str | None = None) -> None:
    """An empty qcow2; ``backing`` is the name written in the header (qcow2 backing)."""
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*args, str(path), str(size))


def write_raw(path: Path, size: int, seed: int) -> None:
    """A raw file full of non-zero pseudo-random data (no block reads as zeros)."""
    rng = random.Random(seed)
    block = bytearray(rng.randbytes(MiB))
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(MiB, size - written)
            block[0:8] = written.to_bytes(8, "little")  # every MiB differs
            f.write(block[:n])
            written += n


def qcow2_from_raw(raw: Path, qcow2: Path, cluster_size: int) -> None:
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2",
             "-o", f"cluster_size={cluster_size}", str(raw), str(qcow2))


def allocated_bytes(image: Path) -> tuple[int, int]:
    """(data bytes, virtual size) of the guest-visible view of ``image``'s chain."""
    entries = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(image)))
    data = sum(e["length"] for e in entries if e.get("data"))
    return data, sum(e["length"] for e in entries)


def build_chain(directory: Path, depth: int, size: int, cluster_size: int, seed: int) -> Path:
    """A chain of ``depth`` qcow2 images whose top view is fully allocated.

    Clusters are dealt out to the layers in runs of 1-8 clusters, each run to a
    layer picked at random (fixed seed), so every layer holds a different
    subset and adjacent runs usually come from different layers::

        layer 2 (top)  |  AA      AAA         |
        layer 1        |    BBB         BB  B |
        layer 0 (base) |CC     C   CCCCC   C  |

    Layer ``i`` writes pattern byte ``i + 1``. Returns the top image.
    """
    directory.mkdir(parents=True, exist_ok=True)
    nclusters = size // cluster_size
    rng = random.Random(seed + depth)
    runs: list[list[tuple[int, int]]] = [[] for _ in range(depth)]
    c = 0
    while c < nclusters:
        n = min(rng.randint(1, 8), nclusters - c)
        runs[rng.randrange(depth)].append((c, n))
        c += n
    previous: Path | None = None
    for layer in range(depth):
        image = directory / f"layer{layer:02d}.qcow2"
        # Relative backing names, as qemu-img writes them for a chain in one directory.
        create_qcow2(image, size, cluster_size,
                     backing=previous.name if previous is not None else None)
        commands = [f"write -P {layer + 1} {start * cluster_size} {n * cluster_size}"
                    for start, n in runs[layer]]
        if commands:
            qemu_io(image, commands)
        previous = image
    assert previous is not None
    data, virtual = allocated_bytes(previous)
    if data != virtual:
        raise ToolError(["build_chain"], 1, f"top view has {data} of {virtual} bytes allocated")
    return previous


def build_sparse(path: Path, size: int, allocated: int, chunk: int = MiB) -> None:
    """``size`` bytes virtual with ``allocated`` bytes of data in evenly spread chunks."""
    create_qcow2(path, size, 65536)
    count = max(1, allocated // chunk)
    stride = size // count
    qemu_io(path, [f"write -P 0x5a {i * stride} {chunk}" for i in range(count)])


def build_allocated(path: Path, size: int, cluster_size: int) -> None:
    """A fully allocated qcow2 (for overwrites)."""
    create_qcow2(path, size, cluster_size)
    step = 64 * MiB
    qemu_io(path, [f"write -P 0x33 {off} {min(step, size - off)}" for off in range(0, size, step)])


def create_overlay(path: Path, backing: Path, cluster_size: int) -> None:
    """A fresh, empty overlay (every write into it allocates)."""
    size = json.loads(qemu_img("info", "--output=json", str(backing)))["virtual-size"]
    path.unlink(missing_ok=True)
    create_qcow2(path, size, cluster_size, backing=str(backing.resolve()))


def check(image: Path) -> dict[str, object]:
    """``qemu-img check`` result (exit 2/3 = corruption/leaks still yield JSON)."""
    binary = os.environ.get("QEMU_IMG", "qemu-img")
    res = subprocess.run([binary, "check", "--output=json", "-f", "qcow2", str(image)],
                         capture_output=True, text=True, check=False)
    try:
        out: dict[str, object] = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise ToolError([binary, "check", str(image)], res.returncode, res.stderr) from None
    return out


def verify_pattern(image: Path, offset: int, length: int, pattern: int) -> bool:
    """True if ``qemu-io read -P`` finds ``pattern`` in every byte of the range."""
    binary = os.environ.get("QEMU_IO", "qemu-io")
    res = subprocess.run([binary, "-r", "-f", "qcow2", "-c",
                          f"read -P {pattern} {offset} {length}", str(image)],
                         capture_output=True, text=True, check=False)
    return res.returncode == 0 and "verification failed" not in res.stdout


def compare_export(uri: str, image: Path) -> str:
    """``qemu-img compare`` of an NBD export against ``image`` read by QEMU itself:
    "identical", or QEMU's words for the difference."""
    binary = os.environ.get("QEMU_IMG", "qemu-img")
    res = subprocess.run([binary, "compare", "-f", "raw", "-F", "qcow2", uri, str(image)],
                         capture_output=True, text=True, check=False, timeout=600)
    if res.returncode == 0:
        return "identical"
    return f"exit {res.returncode}: {(res.stdout + res.stderr).strip()}"
