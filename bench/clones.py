"""The disks of the workers benchmark: linked clones of one base, in a datastore.

    vdisk datastore init DIR
    vdisk disk create base --size SIZE -d DIR      (filled with data)
    vdisk snapshot base -d DIR                     (the base is now frozen)
    vdisk disk create cloneK --backing FROZEN -d DIR   K = 1..N
    vdisk disk remove base -d DIR                  (its empty top; the frozen base stays)

The base is filled with non-zero data through the block engine (so reads cost
real lookups and copies, not zero fills) and keeps a valid content ID. Each
clone's top is empty; a pristine copy of it is kept, and ``reset`` puts it back
(a new file, renamed over the old) before each server's turn, so every server
writes into the same empty tops.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import images
from replicate_contenders import fill_base, vdisk_json

log = logging.getLogger(__name__)

MiB = images.MiB


@dataclass
class Datastore:
    dir: Path
    base: Path                          # the frozen base every clone continues
    tops: dict[str, Path]               # clone name -> its top image (absolute)
    size: int                           # virtual size of every disk
    pristine: Path                      # directory of the empty tops as created
    raw: Path | None = None             # the base's contents as a raw file, if made

    def make_raw(self) -> Path:
        """The guest-visible contents of every clone (its top is empty): the base, raw."""
        if self.raw is None:
            self.raw = self.dir.parent / f"{self.dir.name}-base.raw"
            images.qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", str(self.base),
                            str(self.raw))
        return self.raw

    def pick(self, n: int) -> dict[str, Path]:
        """The first ``n`` clones."""
        names = list(self.tops)[:n]
        if len(names) < n:
            raise ValueError(f"the datastore has {len(self.tops)} clones, not {n}")
        return {name: self.tops[name] for name in names}

    def reset(self, names: list[str]) -> None:
        """Give these clones their empty top back (the written one is replaced)."""
        for name in names:
            top = self.tops[name]
            tmp = top.with_name(top.name + ".reset")
            shutil.copyfile(self.pristine / top.name, tmp)
            os.replace(tmp, top)

    def warm(self, names: list[str]) -> None:
        """Read the base, these tops and the raw file once, so the page cache holds them."""
        for path in [self.base, *(self.tops[n] for n in names), *filter(None, [self.raw])]:
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.read(fd, 8 * MiB):
                    pass
            finally:
                os.close(fd)

    def check(self, names: list[str]) -> str:
        """``qemu-img check`` of these tops: "clean" or what it found."""
        problems = []
        for name in names:
            out = images.check(self.tops[name])
            bad = {k: out.get(k, 0) for k in ("corruptions", "leaks", "check-errors")
                   if out.get(k, 0)}
            if bad:
                problems.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in bad.items()))
        return "; ".join(problems) or "clean"


def build(directory: Path, clones: int, size: int, seed: int, fill: bool = True) -> Datastore:
    """A datastore of ``clones`` linked clones clone1..cloneN of one frozen base of
    ``size`` bytes (all data if ``fill``)."""
    vdisk_json("datastore", "init", str(directory))
    base = vdisk_json("disk", "create", "base", "-d", str(directory), "--size", str(size))
    if fill:
        fill_base(directory / base["top"], seed)
    frozen = vdisk_json("snapshot", "base", "-d", str(directory))["frozen"]
    tops = {}
    for k in range(1, clones + 1):
        made = vdisk_json("disk", "create", f"clone{k}", "-d", str(directory),
                          "--backing", frozen)
        tops[f"clone{k}"] = directory / made["top"]
    vdisk_json("disk", "remove", "base", "-d", str(directory))
    pristine = directory.parent / f"{directory.name}-pristine"
    pristine.mkdir()
    for top in tops.values():
        shutil.copyfile(top, pristine / top.name)
    if not (directory / frozen).exists():
        raise images.ToolError(["disk remove base"], 1, f"removed the frozen base {frozen}")
    return Datastore(directory, directory / frozen, tops, size, pristine)
