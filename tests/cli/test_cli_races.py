"""``vdisk`` commands racing for one disk name in one datastore, as real processes.

Whatever the interleaving: every command either succeeds or fails with one
line, one disk of the name exists, every image the catalog names is there and
``qemu-img check`` clean, it holds what the winner copied, and a loser
leaves no file behind (it removes only what it created).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cliharness import CLI, COMMAND_TIMEOUT, Datastore, MiB, Result, run_vdisk

from vdisk import qemu_img, qemu_io

ROUNDS = 3
IMPORTERS = 4
SLOW_CONVERT_S = 1.0    # longer than a replicate of a small disk takes


def run_parallel(*commands: list[str], env: dict[int, dict[str, str]] | None = None
                 ) -> list[Result]:
    """Start every command at once (``env``: extra variables by index); their
    results, in order."""
    env = env or {}
    procs = [subprocess.Popen([*CLI, *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env.get(i, {})})
             for i, cmd in enumerate(commands)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.wait()
            raise
        results.append(Result(p.returncode, out, err))
    return results


def check_outcome(ds: Datastore, results: list[Result], name: str, kept: str = "") -> int:
    """The assertions every race shares; the index of the winner. Images named
    ``kept*`` may stay beside the disk's (replicated copies stay, by design)."""
    winners = [i for i, r in enumerate(results) if r.returncode == 0]
    for r in results:
        if r.returncode != 0:
            r.error_line()                          # one line, or the assert says why
    assert len(winners) == 1, [r.stderr for r in results]
    chain = ds.disk(name)["chain"]
    for image in chain:
        assert (ds.path / image).exists(), f"the catalog names a missing {image}"
        qemu_img.check_clean(ds.path / image, allow_leaks=False)
    # the losers removed what they made, and only that
    others = set(ds.images()) - {Path(p).name for p in chain}
    assert not [n for n in others if not kept or not n.startswith(kept)], others
    for n in others:
        qemu_img.check_clean(ds.path / "images" / n, allow_leaks=False)
    return winners[0]


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    """Single images with distinct contents."""
    paths = []
    for i in range(IMPORTERS):
        p = tmp_path / f"src{i}.qcow2"
        qemu_img.create(p, "qcow2", 4 * MiB)
        qemu_io.run(p, f"write -P {0x41 + i} 0 1M")
        paths.append(p)
    return paths


def test_parallel_imports_under_one_name(datastore: Datastore, sources: list[Path]) -> None:
    for _ in range(ROUNDS):
        results = run_parallel(*(["disk", "import", "X", str(src), "-d", str(datastore.path)]
                                 for src in sources))
        won = check_outcome(datastore, results, "X")
        qemu_img.compare(datastore.top("X"), sources[won])
        datastore.vdisk("disk", "remove", "X")


def test_import_races_replicate(datastore: Datastore, sources: list[Path], tmp_path: Path,
                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """``vdisk replicate Y --to DS --name X`` makes disk X on DS while an import of
    X copies: the import picked its image names before the replicate picks the
    name of X's new top, and renames its copy after."""
    src_ds = Datastore(tmp_path_factory.mktemp("src"))
    run_vdisk("datastore", "init", src_ds.path)
    src_ds.vdisk("disk", "import", "Y", sources[1])
    slow = tmp_path / "qemu-img-slow"
    slow.write_text(f"#!/bin/sh\n[ \"$1\" = convert ] && sleep {SLOW_CONVERT_S}\n"
                    f"exec {shutil.which(os.environ.get('QEMU_IMG', 'qemu-img'))} \"$@\"\n")
    slow.chmod(0o755)
    for _ in range(ROUNDS):
        results = run_parallel(
            ["disk", "import", "X", str(sources[0]), "-d", str(datastore.path)],
            ["replicate", "Y", "-d", str(src_ds.path), "--to", str(datastore.path),
             "--name", "X"],
            env={0: {"QEMU_IMG": str(slow)}})
        won = check_outcome(datastore, results, "X", kept="Y-")
        qemu_img.compare(datastore.top("X"), sources[won])
        datastore.vdisk("disk", "remove", "X")
