"""Crash safety: SIGKILL nbdkit in the middle of a request stream.

Each trial serves a fresh copy of the top of a QEMU-written chain, sends a
random stream of write / FUA write / zero / trim / flush requests
asynchronously (several in flight; the kill lands while requests and often a
flush are in flight), then kills nbdkit with SIGKILL. Afterwards:

- ``qemu-img check`` finds no corruption (leaked clusters are tolerated);
- every request that is durable by NBD's rules reads back: requests acknowledged
  before the last acknowledged flush was sent, and acknowledged FUA writes. Only
  bytes no other (possibly half-done) request touched are checked;
- vdisk re-serves the image and reads exactly what QEMU reads, and can write to
  it again with ``qemu-img check`` still clean.

Requests in flight at the same time never overlap, so the durable state is
well defined. ``VDISK_CRASH_TRIALS`` and ``VDISK_CRASH_SEED`` tune the run; a
failing trial prints its seed.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from diskmodel import DiskModel, Op, gaps, merge, ranges_touched
from nbdharness import (
    EXAMPLES_RUN,
    AsyncStream,
    KiB,
    MiB,
    ServerFactory,
    first_difference,
    pattern,
    read_all,
)
from qchain import Chain, Layer, build_chain

from vdisk import qemu_img
from vdisk.errors import NbdkitError

pytestmark = pytest.mark.crash

TRIALS = int(os.environ.get("VDISK_CRASH_TRIALS", "60"))
BASE_SEED = int(os.environ.get("VDISK_CRASH_SEED", str(random.SystemRandom().randrange(2**31))))
SIZE = 2 * MiB

CHAINS: dict[str, list[Layer]] = {
    "v3-64k": [
        Layer(compressed=True, io=("write -P 0x11 0 512k", "write -P 0x12 1M 256k")),
        Layer(io=("write -P 0x13 256k 128k", "write -z 1152k 64k")),
    ],
    "v2-64k-on-4k": [
        Layer(cluster_size=4 * KiB, io=("write -P 0x21 0 512k", "write -P 0x22 1M 256k")),
        Layer(compat="0.10", io=("write -P 0x23 256k 128k",)),
    ],
    # 512-byte clusters with 64-bit refcounts: the refcount table grows (and
    # moves) once about 2 MiB of the file is allocated
    "v3-512-rc64": [
        Layer(io=("write -P 0x41 0 1M",)),
        Layer(cluster_size=512, refcount_bits=64, io=("write -P 0x42 512k 16k",)),
    ],
    "v3-4k": [
        Layer(io=("write -P 0x31 0 1M",)),
        Layer(cluster_size=4 * KiB, io=("write -P 0x32 512k 16k", "write -z 768k 64k")),
    ],
}


@dataclass
class Template:
    chain: Chain
    initial: bytes
    below: list[bool]
    n: int = 0

    def fresh_top(self) -> Path:
        self.n += 1
        path = self.chain.directory / f"trial-{self.n}.qcow2"
        shutil.copyfile(self.chain.top, path)
        return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    result = {}
    for name, layers in CHAINS.items():
        chain = build_chain(tmp_path_factory.mktemp(name), layers, SIZE)
        result[name] = Template(chain, chain.raw(), chain.below_has_data())
    return result


def random_op(rng: random.Random, cs: int) -> Op:
    kind = rng.choices(["write", "zero", "trim", "flush"], weights=[6, 2, 2, 1])[0]
    if kind == "flush":
        return Op("flush")
    shape = rng.random()
    if shape < 0.4:
        offset = rng.randrange(SIZE // cs) * cs
        length = rng.randint(1, 3) * cs
    elif shape < 0.8:
        offset = rng.randrange(SIZE)
        length = rng.randint(1, 3 * cs)
    else:
        offset = rng.randrange(SIZE)
        length = rng.randint(1, 256 * KiB)
    length = min(length, SIZE - offset)
    return Op(kind, offset, length, seed=rng.randrange(2**32), fua=rng.random() < 0.2)


def durable_state(
    stream: AsyncStream, template: Template, cs: int, v3: bool
) -> tuple[DiskModel, list[tuple[int, int]]]:
    """The content NBD promises after the crash, and the byte ranges it does not promise."""
    flushes = [x for x in stream.issued if x.op.kind == "flush" and x.acked is not None]
    guaranteed: set[int] = set(flushes[-1].acked_before_issue) if flushes else set()
    for i, x in enumerate(stream.issued):
        if x.op.kind == "write" and x.op.fua and x.acked is not None:
            guaranteed.add(i)
    model = DiskModel(template.initial, cs, v3, template.below)
    unknown: list[tuple[int, int]] = []
    for i, x in enumerate(stream.issued):
        if x.op.kind == "flush":
            continue
        if i in guaranteed:
            op = x.op
            if op.kind == "write":
                model.write(op.offset, pattern(op.seed, op.length))
            elif op.kind == "zero":
                model.zero(op.offset, op.length)
            else:
                model.trim(op.offset, op.length)
        else:
            span = ranges_touched(x.op)
            if span:
                unknown.append(span)
    return model, merge(unknown)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill9(templates: dict[str, Template], trial: int, tmp_path_factory) -> None:
    seed = BASE_SEED * 1000 + trial
    rng = random.Random(seed)
    name = list(CHAINS)[trial % len(CHAINS)]
    template = templates[name]
    cs, v3 = template.chain.top_layer.cluster_size, template.chain.top_layer.v3
    where = f"trial {trial} seed {seed} (VDISK_CRASH_SEED={BASE_SEED}) chain {name}"
    top = template.fresh_top()
    factory = ServerFactory(lambda: tmp_path_factory.mktemp("s"))
    try:
        served = factory(top)
        stream = AsyncStream(served.connect(meta=False))
        n_ops = rng.randint(5, 120)
        max_in_flight = rng.randint(1, 8)
        mode = rng.choice(["in-flush", "in-flight", "after-flush"])
        for _ in range(n_ops):
            stream.issue(random_op(rng, cs), max_in_flight)
        if mode == "in-flush":
            stream.issue(Op("flush"), max_in_flight + 1)
            time.sleep(rng.uniform(0, 0.003))
        elif mode == "in-flight":
            time.sleep(rng.uniform(0, 0.01))
        else:
            stream.issue(Op("flush"), max_in_flight + 1)
            stream.drain()
        stream.reap()
        served.kill()
    except nbd.Error as e:
        done = sum(1 for x in stream.issued if x.acked is not None)
        raise AssertionError(
            f"{where}: a request failed before the kill ({done} of {len(stream.issued)} "
            f"acknowledged): {e}; nbdkit: {served.stderr().strip()}"
        ) from e
    finally:
        factory.close_all()
    EXAMPLES_RUN["crash trials"] = EXAMPLES_RUN.get("crash trials", 0) + 1

    result = qemu_img.check(top)
    assert result["corruptions"] == 0, f"{where}: {result}"
    after = qemu_view(top)
    model, unknown = durable_state(stream, template, cs, v3)
    for lo, hi in gaps(unknown, SIZE):
        got, want = after[lo:hi], bytes(model.data[lo:hi])
        assert got == want, (
            f"{where}: durable data lost in [{lo}, {hi}) mode {mode}: {first_difference(got, want)}"
        )

    # vdisk reads what QEMU reads, and can carry on writing
    factory = ServerFactory(lambda: tmp_path_factory.mktemp("s"))
    offset = rng.randrange(SIZE - 3 * cs)
    step = "serving read-only"
    try:
        served = factory(top, readonly=True)
        step = "reading everything"
        data = read_all(served.connect(meta=False))
        assert data == after, f"{where}: re-served content: {first_difference(data, after)}"
        factory.close_all()
        step = "serving read-write"
        served = factory(top)
        step = f"writing {2 * cs} bytes at {offset}"
        h = served.connect(meta=False)
        h.pwrite(pattern(seed, 2 * cs), offset)
        h.flush()
        served.stop()
    except (nbd.Error, NbdkitError) as e:
        raise AssertionError(
            f"{where}: after the crash, {step} of {top} failed: {e}; "
            f"nbdkit: {served.stderr().strip() if step != 'serving read-only' else ''}"
        ) from e
    finally:
        factory.close_all()
    assert qemu_img.check(top)["corruptions"] == 0, where
    expected = after[:offset] + pattern(seed, 2 * cs) + after[offset + 2 * cs :]
    got = qemu_view(top)
    assert got == expected, f"{where}: write after crash: {first_difference(got, expected)}"
    top.unlink()


def qemu_view(top: Path) -> bytes:
    raw = top.with_suffix(".raw")
    qemu_img.convert(top, raw, "raw")
    data = raw.read_bytes()
    raw.unlink()
    return data

