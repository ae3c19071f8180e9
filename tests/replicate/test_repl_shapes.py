"""Replication of random chain shapes: layers whose identity is valid, unknown or
unsupported (qcow2 v2), with or without a recorded parent ID; then one layer
changes (by QEMU or by vdisk) and a new top on some layer is replicated to the
same target.

Properties: every replica reads as its source (``qemu-img compare``), and a
replicate never links at a layer at or above the layer that changed (the copy
there would sit on the old data). A source chain vdisk refuses (a parent
modified since its child recorded it) is refused by replicate too.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdharness import pattern

from vdisk import qemu_img, qemu_io
from vdisk import replicate as repl
from vdisk_block import ImageError, open_disk
from vdisk_block import identity as ident

SIZE = 8 << 20
REGION = 256 << 10          # layer i writes [i * REGION, i * REGION + 128 KiB)
CHANGED = 6 << 20           # where a change writes: no layer above covers it
MODES = ["unknown", "stamped", "written"]


@dataclass(frozen=True)
class Shape:
    layers: list[tuple[bool, str]]      # base first: (qcow2 v2, how it got its data)
    changed: int                        # index of the layer that changes
    changer: str                        # qemu or vdisk
    on: int                             # index of the layer the second top goes on


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    layers = draw(st.lists(st.tuples(st.booleans(), st.sampled_from(MODES)),
                           min_size=1, max_size=4))
    n = len(layers)
    return Shape(layers, draw(st.integers(0, n - 1)), draw(st.sampled_from(["qemu", "vdisk"])),
                 draw(st.integers(0, n - 1)))


def engine_write(path: Path, data: bytes, offset: int) -> None:
    d = open_disk(str(path))
    try:
        d.write(data, offset)
        d.flush()
    finally:
        d.close()


def make_layer(path: Path, backing: str | None, v2: bool, mode: str, seed: int,
               offset: int) -> None:
    qemu_img.create(path, "qcow2", None if backing else SIZE, backing=backing,
                    backing_fmt="qcow2" if backing else None,
                    options={"compat": "0.10" if v2 else "1.1"})
    data = pattern(seed, 128 << 10)
    if mode == "written":
        engine_write(path, data, offset)
        return
    qemu_io.run(path, f"write -P {seed % 250 + 1} {offset} 128k")
    if mode == "stamped" and not v2:          # as 'vdisk identity stamp' does
        parent = ident.read(str(path.parent / backing))[1] if backing else None
        ident.write_path(str(path), ident.new_id(),
                         parent.content_id if parent is not None and parent.valid else None)


def replicate(top: Path, target: Path) -> dict:
    with repl.Session(str(target)) as session:
        session.add(str(top))
    (result,) = session.results
    qemu_img.compare(top, target / result["top"], force_share=True)
    return result


def run_shape(shape: Shape, work: Path) -> None:
    src, target = work / "src", work / "dst"
    src.mkdir()
    names = [f"l{i}.qcow2" for i in range(len(shape.layers))]
    for i, (v2, mode) in enumerate(shape.layers):
        make_layer(src / names[i], names[i - 1] if i else None, v2, mode, i + 1, i * REGION)
    make_layer(src / "t1.qcow2", names[-1], False, "written", 90, 5 << 20)
    replicate(src / "t1.qcow2", target)

    changed = src / names[shape.changed]
    if shape.changer == "qemu":
        qemu_io.run(changed, f"write -P 238 {CHANGED} 64k")
    else:
        engine_write(changed, pattern(91, 64 << 10), CHANGED)
    make_layer(src / "t2.qcow2", names[shape.on], False, "unknown", 92, 5 << 20)
    try:
        result = replicate(src / "t2.qcow2", target)
    except ImageError as e:
        assert "modified since the child was created" in str(e), e
        return
    linked = [r["source"] for r in result["layers"] if r["action"] == "linked"]
    if linked:
        at = names.index(Path(linked[0]).name)
        assert at < shape.changed, (f"linked at {linked[0]}, above or at the changed "
                                    f"{changed}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes())
def test_replica_reads_as_its_source_whatever_the_chain(shape: Shape) -> None:
    with tempfile.TemporaryDirectory(prefix="repl-shape-") as work:
        run_shape(shape, Path(work))
