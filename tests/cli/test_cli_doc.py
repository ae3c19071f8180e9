"""docs/cli.md documents every field ``--json`` prints, and nothing else.

One scenario runs every command with ``--json`` (one disk's whole life, a
served datastore, jobs cancelled and resumed after their command died, a
failure) and collects the objects printed per command; each is checked
against the tables of docs/cli.md: every field it has is documented, every
field documented as always there is there, and fields documented as
objects (JOB, DISK...) are checked the same way, recursively.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cliharness import REPO, Datastore, MiB, Serve, run_vdisk

from vdisk import qemu_img, qemu_io

DOC = REPO / "docs" / "cli.md"
HOLD = Path(__file__).resolve().parent / "cmdpause.py"


# --- the document -----------------------------------------------------------------------


@dataclass
class Shape:
    """A documented object: its fields (name -> type text) and which are optional;
    ``base``, from a line ``Prints a JOB...``: an object type whose fields it
    has too (all of them, without a table of its own)."""

    fields: dict[str, str] = field(default_factory=dict)
    optional: set[str] = field(default_factory=set)
    base: str | None = None


_HEADING = re.compile(r"^###\s+(.+?)\s*$")
_ROW = re.compile(r"^\|\s*`(\w+)`(\?)?\s*\|\s*([^|]+?)\s*\|")
_TYPE = re.compile(r"\b([A-Z][A-Z_]{2,})\b")


def read_doc() -> dict[str, Shape]:
    """The sections of docs/cli.md's JSON reference, by heading (without backticks)."""
    shapes: dict[str, Shape] = {}
    current: Shape | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = None
        elif m := _HEADING.match(line):
            current = shapes.setdefault(m.group(1).replace("`", ""), Shape())
        elif current is not None and (m := _ROW.match(line)):
            current.fields[m.group(1)] = m.group(3)
            if m.group(2):
                current.optional.add(m.group(1))
        elif current is not None and line.startswith("Prints a "):
            current.base = _TYPE.findall(line)[0]
    return shapes


def check(shapes: dict[str, Shape], name: str, obj: Any, where: str) -> list[str]:
    """What differs between obj and the documented shape ``name`` (empty: nothing)."""
    shape = shapes[name]
    fields, optional = dict(shape.fields), set(shape.optional)
    if shape.base is not None:
        fields.update(shapes[shape.base].fields)
        optional |= shapes[shape.base].optional
    assert isinstance(obj, dict), f"{where}: not an object: {obj!r}"
    problems = [f"{where}: field {k!r} is not documented" for k in obj.keys() - fields]
    problems += [f"{where}: documented field {k!r} is missing"
                 for k in fields.keys() - optional - obj.keys()]
    for key, type_text in fields.items():
        types = [t for t in _TYPE.findall(type_text) if t in shapes]
        if key not in obj or not types or obj[key] is None:
            continue
        value = obj[key]
        items = value if type_text.startswith("[") else [value]
        for i, item in enumerate(items):
            problems += check(shapes, types[0], item, f"{where}.{key}"
                              f"{f'[{i}]' if type_text.startswith('[') else ''}")
    return problems


# --- the scenario ------------------------------------------------------------------------


class Outputs:
    """The objects printed per command (the doc's heading, e.g. 'vdisk disk info')."""

    def __init__(self, ds: Datastore, cwd: Path) -> None:
        self.ds, self.cwd = ds, cwd
        self.seen: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, command: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.seen[command].append(obj)
        return obj

    def run(self, command: str, *args: str | os.PathLike[str],
            datastore: bool = True) -> dict[str, Any]:
        words = command.split(",")[0].split()[1:]
        if datastore:
            obj = self.ds.json(*words, *args, cwd=self.cwd)
        else:
            obj = run_vdisk(*words, *args, "--json", cwd=self.cwd).json()
        return self.add(command, obj)


def dead_job(ds: Datastore, tmp: Path, name: str) -> int:
    """A consolidation of disk ``name`` whose command was killed mid-copy."""
    marker, release = tmp / f"held-{name}", tmp / f"release-{name}"
    proc = subprocess.Popen([sys.executable, str(HOLD), "consolidate-copy", str(marker),
                             str(release), "consolidate", name, "-d", str(ds.path), "--json"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the consolidation never reached its copy"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    jobs = ds.json("job", "list", "--disk", name)["jobs"]
    assert jobs[0]["state"] == "interrupted", jobs[0]
    return int(jobs[0]["id"])


@pytest.fixture
def outputs(datastore: Datastore, tmp_path: Path, serve: Serve) -> Outputs:
    out = Outputs(datastore, tmp_path)
    out.run("vdisk datastore init", tmp_path / "new-ds", datastore=False)
    out.run("vdisk disk create", "vm1", "--size", "4M")
    qemu_io.run(datastore.top("vm1"), "write -P 1 0 1M")
    src = tmp_path / "src.qcow2"
    qemu_img.create(src, "qcow2", 4 * MiB)
    out.run("vdisk disk import", "vm2", src)
    snap = out.run("vdisk snapshot", "vm1")
    out.run("vdisk disk create", "clone", "--backing", snap["frozen"])
    out.run("vdisk snapshot", "vm1")            # the next consolidation leaves the clone's base
    qemu_io.run(datastore.top("vm1"), "write -P 2 1M 1M")
    out.run("vdisk disk list")
    out.run("vdisk disk info", "vm1")
    job = out.run("vdisk consolidate", "vm1")
    out.run("vdisk job show", str(job["id"]))
    out.run("vdisk backup", "vm1", "--to", tmp_path)
    out.run("vdisk job list")
    out.run("vdisk info", "vm1")
    out.run("vdisk info", datastore.top("vm1"), datastore=False)
    bare = tmp_path / "bare.qcow2"
    qemu_img.create(bare, "qcow2", MiB)
    out.run("vdisk identity stamp", bare, datastore=False)
    out.run("vdisk replicate", "vm1", "--to", tmp_path / "ds2")
    out.run("vdisk replicate, several disks", "vm1", "vm2", "--to", tmp_path / "ds3")
    out.run("vdisk disk remove", "vm2")
    datastore.create("s", "4M")
    out.run("vdisk snapshot", "s", "--name", "first")
    out.run("vdisk snapshot", "s", "--name", "second")
    out.run("vdisk snapshot list", "s")
    out.run("vdisk snapshot revert", "s", "first")
    out.run("vdisk snapshot delete", "s", "second")
    out.run("vdisk snapshot delete", "s", "first")
    out.run("vdisk disk resize", "s", "8M")
    out.run("vdisk disk rename", "s", "t")
    for name, action in (("a", "cancel"), ("b", "resume")):
        datastore.create(name, "4M")
        datastore.vdisk("snapshot", name)
        qemu_io.run(datastore.top(name), "write -P 3 0 1M")
        out.run(f"vdisk job {action}", str(dead_job(datastore, tmp_path, name)))
    served = serve(datastore)
    out.add("vdisk serve", served.info)
    out.run("vdisk serve status")
    out.run("vdisk disk uri", "vm1")
    out.run("vdisk disk list")
    out.run("vdisk snapshot", "vm1")
    job = out.run("vdisk consolidate", "vm1", "--no-pivot")
    out.run("vdisk job complete", str(job["id"]))
    failed = datastore.vdisk("snapshot", "nosuch", "--json", check=False)
    out.add("errors", failed.json())
    return out


def test_the_json_reference_matches_the_output(outputs: Outputs) -> None:
    shapes = read_doc()
    commands = {name for name in shapes if name.startswith("vdisk ") or name == "errors"}
    problems = [f"{c}: not documented" for c in sorted(outputs.seen.keys() - commands)]
    problems += [f"{c}: documented, not run here" for c in sorted(commands - outputs.seen.keys())]
    problems += [p for command, objs in outputs.seen.items() if command in commands
                 for i, obj in enumerate(objs) for p in check(shapes, command, obj,
                                                             f"{command}#{i}")]
    assert problems == [], "\n".join(problems)
