"""kill -9 in the middle of ``vdisk replicate``, then the same command again.

The source is one disk on a large base (256 MiB written), so a copy takes a
while::

    base.qcow2 (512 MiB, 256 MiB data) <- mid.qcow2 (32 MiB data) <- vm top (8 MiB)

Two ways to kill: the real command killed when the target shows a given
state (a ``.partial`` file, a first visible image...), and the command run by
replpause.py, stopped at an exact point of the workflow. Either way, after
the kill every visible target image is whole (``qemu-img check`` clean, its
chain opens, its data is its source's), and a second run succeeds, leaves no
temporary file, links only to whole images and gives the source's data.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cliharness import CLI, Datastore, MiB, run_vdisk
from replharness import (
    COMMAND_TIMEOUT,
    assert_chain_opens,
    assert_same_data,
    assert_totals,
    content_id,
    hidden_files,
    identity_of,
    new_datastore,
    qemu_io,
    target_disk,
    visible_images,
    write_layer,
)

from vdisk import qemu_img

pytestmark = pytest.mark.crash

PAUSE = Path(__file__).resolve().parent / "replpause.py"
DEADLINE = 60.0


@dataclass
class BigSource:
    ds: Datastore
    chain: list[Path]           # top first

    @property
    def top(self) -> Path:
        return self.chain[0]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigSource]:
    ds = new_datastore(tmp_path_factory.mktemp("big"))
    images = ds.path / "images"
    base, mid = images / "base.qcow2", images / "mid.qcow2"
    qemu_img.create(base, "qcow2", 512 * MiB)
    qemu_io(base, "write -P 0x31 0 128M", "write -P 0x32 128M 128M")
    run_vdisk("identity", "stamp", base)
    qemu_img.create(mid, "qcow2", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(mid, "write -P 0x33 100M 32M")
    run_vdisk("identity", "stamp", mid)
    top = ds.path / ds.json("disk", "create", "vm", "--backing", str(mid))["top"]
    write_layer(top, [(9, 300 * MiB, 8 * MiB)])
    yield BigSource(ds, [top, mid, base])
    shutil.rmtree(ds.path)


@pytest.fixture
def big_target(target: Path) -> Iterator[Path]:
    yield target
    shutil.rmtree(target, ignore_errors=True)       # ~300 MiB each


def args(big: BigSource, target: Path, *extra: str) -> list[str]:
    return ["replicate", "vm", "-d", str(big.ds.path), "--to", str(target), "--json", *extra]


def wait_for(what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"vdisk replicate exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {DEADLINE} s")
        time.sleep(0.001)


def kill(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, "the replicate had already finished"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(COMMAND_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def run_then_kill(cmd: list[str], what: str, cond: Callable[[], bool]) -> None:
    proc = start(cmd)
    try:
        wait_for(what, cond, proc)
        kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(COMMAND_TIMEOUT)
        if proc.stderr:
            proc.stderr.close()


# --- checks ---------------------------------------------------------------------------


def assert_whole(big: BigSource, image: Path) -> None:
    """A visible target image is whole: it checks clean, its chain opens, and it reads
    as the source layer it copies (a disk's new top reads as the source top)."""
    qemu_img.check_clean(image)
    assert_chain_opens(image)
    sources = {content_id(p): p for p in big.chain}
    ident = identity_of(image)
    if ident["content_id"] in sources:
        assert_same_data(sources[ident["content_id"]], image)
    else:
        assert ident["parent_id"] == content_id(big.top), f"{image}: unknown image {ident}"
        assert_same_data(big.top, image)


def stamp(image: Path) -> tuple[int, int, int]:
    st = image.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_after_kill(big: BigSource, target: Path) -> dict[Path, tuple[int, int, int]]:
    """Every visible image is whole; returns them, with what tells a later change."""
    visible = visible_images(target)
    for image in visible:
        assert_whole(big, image)
    return {image: stamp(image) for image in visible}


def check_rerun(big: BigSource, target: Path, cmd: list[str],
                left: dict[Path, tuple[int, int, int]]) -> None:
    res = run_vdisk(*cmd, check=False)
    assert res.returncode == 0, f"second run failed: {res.stderr}"
    result = res.json()
    assert [r["source"] for r in result["layers"]] == \
        [str(p) for p in big.chain[:len(result["layers"])]]
    assert_totals(result, target)
    assert not [n for n in hidden_files(target) if n.endswith(".partial")]
    for r in result["layers"]:
        if r["action"] == "linked":         # only ever to a whole image the kill left
            assert target / r["image"] in left, r
            assert_same_data(Path(r["source"]), target / r["image"])
    for image in visible_images(target):
        if image in left:                   # checked after the kill, untouched since
            assert stamp(image) == left[image], image
        else:
            assert_whole(big, image)
    top = target / target_disk(target, "vm")["top"]
    assert top == target / result["top"]
    assert_same_data(big.top, top)
    # what the killed run was writing is gone too
    assert hidden_files(target) == []


# --- the real command, killed when the target shows a state ------------------------------


def partial_exists(target: Path) -> bool:
    return any(n.endswith(".partial") for n in hidden_files(target))


TRIGGERS: dict[str, Callable[[Path], bool]] = {
    "partial-appears": partial_exists,
    "first-image-visible": lambda t: bool(visible_images(t)),
}


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_kill_while_copying_then_rerun(big: BigSource, big_target: Path, trigger: str) -> None:
    cmd = [*CLI, *args(big, big_target)]
    run_then_kill(cmd, trigger, lambda: TRIGGERS[trigger](big_target))
    left = check_after_kill(big, big_target)
    check_rerun(big, big_target, args(big, big_target), left)


# --- stopped at an exact point ------------------------------------------------------------


POINTS = ["target-init", "copy:1", "renamed:1", "copy:2", "renamed:2", "copy:3", "renamed:3",
          "creating", "add-disk", "verify:1", "verify:2", "verify:3"]


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_point_then_rerun(big: BigSource, big_target: Path, tmp_path: Path,
                                  point: str) -> None:
    extra = ("--verify",) if point.startswith("verify") else ()
    marker = tmp_path / "paused"
    cmd = [sys.executable, str(PAUSE), point, str(marker), *args(big, big_target, *extra)]
    run_then_kill(cmd, f"pause point {point}", marker.exists)
    left = check_after_kill(big, big_target)
    if point.startswith("renamed:"):        # the copies renamed so far are in place
        assert len(left) == int(point.split(":")[1])
    if point.startswith("verify:"):
        # a copy is compared before it is renamed: the kill leaves visible (so
        # matchable) only the copies compared before, none of them unverified
        assert len(left) == int(point.split(":")[1]) - 1, sorted(left)
    check_rerun(big, big_target, args(big, big_target, *extra), left)


def test_kill_leaves_nothing_to_link_to(big: BigSource, big_target: Path,
                                        tmp_path: Path) -> None:
    """Killed while copying base: the next run copies base (no image to link to)."""
    marker = tmp_path / "paused"
    cmd = [sys.executable, str(PAUSE), "copy:1", str(marker), *args(big, big_target)]
    run_then_kill(cmd, "the base copy", marker.exists)
    assert visible_images(big_target) == []
    assert partial_exists(big_target)
    res = run_vdisk(*args(big, big_target))
    result: dict[str, Any] = res.json()
    assert [r["action"] for r in result["layers"]] == ["copied"] * 3
    assert not partial_exists(big_target)
