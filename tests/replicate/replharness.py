"""Helpers of the replicate suite: source datastores with shared layers, checks of a target.

The source of most tests (:func:`build_source`) is built with the ``vdisk``
command and written through the block engine (as nbdkit would write it), so
every image carries a valid content ID::

    base  <-  mid  <-  vm1 top          vm1: base, then a snapshot, a snapshot
      ^        ^                         vm2: a linked clone of base
      |        +----  vm3 top            vm3: a linked clone of mid
      +-------------  vm2 top

Each layer holds its own cluster-aligned data (``Source.data``: bytes of
guest data it allocates), so a copy's size is predictable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliharness import Datastore, MiB, Result, run_vdisk
from nbdharness import pattern, snapshot_tree

from vdisk import qemu_img

SIZE = 64 * MiB
CLUSTER = 64 * 1024
COMMAND_TIMEOUT = 60

# (seed, offset, length) written into each layer; all multiples of CLUSTER
WRITES: dict[str, list[tuple[int, int, int]]] = {
    "base": [(1, 0, 4 * MiB), (2, 40 * MiB, MiB)],
    "mid": [(3, 2 * MiB, MiB)],
    "vm1": [(4, 3 * MiB, MiB // 2), (5, 48 * MiB, MiB // 2)],
    "vm2": [(6, MiB, MiB)],
    "vm3": [(7, 8 * MiB, 2 * MiB)],
}


@dataclass
class Source:
    ds: Datastore
    images: dict[str, Path] = field(default_factory=dict)   # base, mid, vm1, vm2, vm3

    @property
    def path(self) -> Path:
        return self.ds.path

    def data(self, layer: str) -> int:
        return sum(length for _seed, _off, length in WRITES[layer])

    def top(self, disk: str) -> Path:
        return self.ds.top(disk)

    def copy_to(self, path: Path) -> Source:
        """The same datastore at path (a datastore is movable: its paths are relative)."""
        shutil.copytree(self.path, path, symlinks=True)
        return Source(Datastore(path), {k: path / v.relative_to(self.path)
                                        for k, v in self.images.items()})


def new_datastore(path: Path) -> Datastore:
    run_vdisk("datastore", "init", path)
    return Datastore(path)


def write_layer(top: Path, writes: list[tuple[int, int, int]]) -> None:
    """Write into the top image of a chain through the block engine (keeps identity valid)."""
    from vdisk_block.chain import open_disk

    disk = open_disk(str(top))
    try:
        for seed, offset, length in writes:
            for off in range(0, length, 4 * MiB):
                n = min(4 * MiB, length - off)
                disk.write(pattern(seed * 1000 + off // MiB, n), offset + off)
        disk.flush()
    finally:
        disk.close()


def build_source(ds: Datastore) -> Source:
    src = Source(ds)
    top = ds.path / ds.create("vm1", "64M")
    write_layer(top, WRITES["base"])
    snap = ds.json("snapshot", "vm1")
    src.images["base"] = ds.path / snap["frozen"]
    write_layer(ds.path / snap["top"], WRITES["mid"])
    snap = ds.json("snapshot", "vm1")
    src.images["mid"] = ds.path / snap["frozen"]
    src.images["vm1"] = ds.path / snap["top"]
    write_layer(src.images["vm1"], WRITES["vm1"])
    for disk, parent in (("vm2", "base"), ("vm3", "mid")):
        made = ds.json("disk", "create", disk, "--backing", str(src.images[parent]))
        src.images[disk] = ds.path / made["top"]
        write_layer(src.images[disk], WRITES[disk])
    return src


# --- commands -----------------------------------------------------------------------------


def vdisk(*args: str | os.PathLike[str]) -> Result:
    """Run ``vdisk`` without failing on a non-zero exit."""
    return run_vdisk(*args, check=False, timeout=COMMAND_TIMEOUT)


def replicate(*args: str | os.PathLike[str]) -> dict[str, Any]:
    """``vdisk replicate ARGS --json``, which must succeed: its JSON object."""
    res = vdisk("replicate", *args, "--json")
    assert res.returncode == 0, f"vdisk replicate failed: {res.stderr}"
    return res.json()


def qemu_io(image: Path, *commands: str) -> None:
    cmd = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        cmd += ["-c", c]
    subprocess.run([*cmd, str(image)], check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


def info(image: Path) -> dict[str, Any]:
    """``vdisk info IMAGE --json`` (must succeed)."""
    res = vdisk("info", image, "--json")
    assert res.returncode == 0, res.stderr
    return res.json()


# --- identity ---------------------------------------------------------------------------


def content_id(image: Path) -> str | None:
    """The image's content ID if valid, else None."""
    from vdisk_block import identity

    _h, ident = identity.read(str(image))
    return identity.format_id(ident.content_id) if ident.valid else None


def identity_of(image: Path) -> dict[str, Any]:
    from vdisk_block import identity

    _h, ident = identity.read(str(image))
    return ident.describe()


# --- checks of a target --------------------------------------------------------------------


def visible_images(ds: Path) -> list[Path]:
    """The images a datastore shows: the files of images/ not hidden."""
    top = ds / "images"
    if not top.is_dir():
        return []
    return sorted(p for p in top.iterdir() if not p.name.startswith(".") and p.is_file())


def hidden_files(ds: Path) -> list[str]:
    top = ds / "images"
    return sorted(p.name for p in top.iterdir() if p.name.startswith(".")) if top.is_dir() else []


def check_all(ds: Path) -> None:
    """Every visible image of the datastore passes ``qemu-img check``."""
    for image in visible_images(ds):
        qemu_img.check_clean(image)


def assert_chain_intact(top: Path) -> None:
    """Every image of the chain has a valid identity and every link is as recorded."""
    for layer in info(top)["chain"]:
        assert layer["state"] == "valid", layer
        assert layer["link"] in ("ok", None), layer


def assert_chain_opens(top: Path) -> None:
    """vdisk opens the chain (read-only): every image there, every recorded parent ID
    matching its parent's."""
    from vdisk_block.chain import open_chain

    for f in open_chain(str(top), readonly=True):
        f.close()


def assert_same_data(a: Path, b: Path) -> None:
    """qemu-img compare: the guest-visible contents of the chains are identical."""
    qemu_img.compare(a, b, force_share=True)


def assert_totals(result: dict[str, Any], target: Path) -> None:
    """The per-layer report adds up, and each copy's bytes are the copy's file."""
    layers = result["layers"]
    assert result["copied"] == sum(r["action"] == "copied" for r in layers)
    assert result["linked"] == sum(r["action"] == "linked" for r in layers)
    assert result["copied"] + result["linked"] == len(layers)
    assert result["bytes_moved"] == sum(r["bytes_moved"] for r in layers)
    for r in layers:
        assert r["action"] in ("copied", "linked"), r
        if r["action"] == "copied":
            assert r["bytes_moved"] == (target / r["image"]).stat().st_size > 0, r
        else:
            assert r["bytes_moved"] == 0, r
    # linking stops the walk: only the deepest layer reported may be linked
    assert all(r["action"] == "copied" for r in layers[:-1]), layers


def target_disk(target: Path, name: str) -> dict[str, Any]:
    listing = run_vdisk("disk", "list", "-d", target, "--json").json()
    disks = {d["name"]: d for d in listing["disks"]}
    assert name in disks, f"disk {name} not on {target}: {sorted(disks)}"
    return disks[name]


def tree(path: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every file under path ({} if it does not exist)."""
    return snapshot_tree(path) if path.exists() else {}
