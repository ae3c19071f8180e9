"""In-memory model of a served disk: what every read must return after a sequence of ops.

Semantics modelled (the plugin contract):

- write: the bytes land.
- zero (with or without may_trim): the whole range reads as zeros.
- trim: zeroes ONLY the clusters of the top image it fully covers, and only if
  the top is qcow2 v3 or nothing below the top has data for that cluster;
  partial clusters are left unchanged::

        cluster:   |....c0....|....c1....|....c2....|
        trim:           [=================]
        effect:     unchanged |  zeroed  | unchanged      (c1 if v3 or no data below)

- flush: no change of content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One request: kind in write/zero/trim/flush/fastzero; data only for write."""

    kind: str
    offset: int = 0
    length: int = 0
    seed: int = 0
    may_trim: bool = False
    fua: bool = False

    def end(self) -> int:
        return self.offset + self.length


class DiskModel:
    def __init__(
        self,
        initial: bytes,
        cluster_size: int,
        top_v3: bool,
        below_has_data: Sequence[bool],
    ) -> None:
        self.data = bytearray(initial)
        self.cluster_size = cluster_size
        self.top_v3 = top_v3
        self.below_has_data = list(below_has_data)

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)

    def trim_clusters(self, offset: int, length: int) -> list[int]:
        """The clusters a trim of [offset, offset+length) zeroes."""
        self._check(offset, length)
        cs = self.cluster_size
        first = (offset + cs - 1) // cs
        end = offset + length
        # a last cluster cut short by the virtual size is covered when the trim
        # reaches the end of the disk
        last = -(-self.size // cs) if end >= self.size else end // cs  # exclusive
        return [
            c
            for c in range(first, last)
            if self.top_v3 or not self.below_has_data[c]
        ]

    def trim(self, offset: int, length: int) -> None:
        cs = self.cluster_size
        for c in self.trim_clusters(offset, length):
            end = min((c + 1) * cs, self.size)
            self.data[c * cs : end] = bytes(end - c * cs)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise ValueError(f"request [{offset}, {offset + length}) outside disk of {self.size}")


def ranges_touched(op: Op) -> tuple[int, int] | None:
    """The byte range an op may change, or None (flush).

    A trim changes at most the clusters it fully covers, all inside its range.
    """
    if op.kind in ("write", "zero", "fastzero", "trim"):
        return (op.offset, op.end())
    return None


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (lo, hi) spans."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def gaps(unknown: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The complement of sorted, merged spans within [0, size)."""
    out, pos = [], 0
    for lo, hi in unknown:
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < size:
        out.append((pos, size))
    return out
