"""The copy set read from L2 tables a run at a time equals the one read entry by entry.

layer_ranges runs under the disk lock at a job's start (for the top), where
every millisecond is one a guest write may wait: it finds the runs of
allocated entries with bytes.find over one flag byte per entry. This holds
it to the plain definition (an entry is allocated unless it is 0 or the
COPIED bit alone), on random tables, sizes and cluster-to-slot ratios.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from vdisk_block.copyset import layer_ranges, merged
from vdisk_block.image import COMPRESSED, COPIED, ZERO_FLAG, Qcow2File

KINDS = {
    "unallocated": lambda k: 0,
    "copied-alone": lambda k: COPIED,
    "data": lambda k: (k + 1) << 16 | COPIED,
    "shared": lambda k: (k + 1) << 16,
    "zero": lambda k: ZERO_FLAG,
    "zero-with-offset": lambda k: (k + 1) << 16 | ZERO_FLAG,
    "compressed": lambda k: COMPRESSED | (k + 1) << 9,
}


def reference(tables: dict[int, array], span: int, per: int, nslots: int) -> list[tuple[int, int]]:
    out = []
    for l1_index, l2 in tables.items():
        for k, e in enumerate(l2):
            if e & ~COPIED:
                first = (l1_index * span + k) * per
                if first < nslots:
                    out.append((first, min(first + per, nslots)))
    return merged(out)


@st.composite
def cases(draw):
    span = draw(st.sampled_from([8, 64, 512]))
    per = draw(st.sampled_from([1, 2, 8]))
    nl1 = draw(st.integers(1, 4))
    tables = {}
    for l1_index in draw(st.lists(st.integers(0, nl1 - 1), unique=True)):
        entries: list[int] = []
        while len(entries) < span:
            kind = draw(st.sampled_from(sorted(KINDS)))
            for _ in range(draw(st.integers(1, span))):
                if len(entries) < span:
                    entries.append(KINDS[kind](l1_index * span + len(entries)))
        tables[l1_index] = array("Q", entries)
    nslots = draw(st.integers(1, nl1 * span * per + 3))
    return span, per, nslots, tables


@settings(max_examples=300, deadline=None)
@given(case=cases())
def test_runs_equal_entries(case) -> None:
    span, per, nslots, tables = case
    f = Qcow2File.__new__(Qcow2File)       # the attributes layer_ranges reads, no file
    f.size, f.cluster_size, f.header = 1 << 40, per * 512, SimpleNamespace(l2_entries=span)
    disk = SimpleNamespace(map=SimpleNamespace(g=512, nslots=nslots), layers=[f],
                           size=1 << 40, top=SimpleNamespace(l2=tables))
    assert merged(layer_ranges(disk, [0])) == reference(tables, span, per, nslots)  # type: ignore[arg-type]

