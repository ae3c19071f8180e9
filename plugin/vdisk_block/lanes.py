"""Whole tables of 64-bit entries at once, as lanes of one Python integer.

Opening an image checks and maps every L2 entry; entry by entry that is
Python bytecode per entry (a 1 GiB image: 16 Ki entries, 10-15 ms holding
the interpreter, which a guest's requests to the same worker wait for). The
table's bytes read as one integer make each step one operation in C over
the whole table: entry k is lane k, bits [64k, 64k + 64).

Every operation here keeps each lane's result inside its lane: AND, OR and
XOR cannot cross lanes; an addition or a shift is used only where the
operands leave room for it (said at each use).
"""

from __future__ import annotations

import sys
from array import array
from functools import lru_cache

ORDER = sys.byteorder                   # array("Q") holds native integers
LANE_ONES = (1 << 64) - 1
HIGH = 1 << 63


def spread(value: int, n: int) -> int:
    """value in each of n lanes."""
    return int.from_bytes(value.to_bytes(8, ORDER) * n, ORDER)


# the constant masks (a handful, at a few table sizes); a mask that depends
# on a file or a layer is made each time (spread), not kept: with 2 MiB
# clusters one mask is 2 MiB
repeat = lru_cache(maxsize=16)(spread)


def lanes(a: array, start: int, stop: int) -> int:
    """Entries [start, stop) of a as one integer."""
    return int.from_bytes(memoryview(a)[start:stop], ORDER)


def entries(x: int, n: int) -> array:
    """The n lanes of x as an array of entries."""
    out = array("Q")
    out.frombytes(x.to_bytes(8 * n, ORDER))
    return out


def nonzero(x: int, n: int) -> int:
    """1 in bit 0 of each lane of x that is not zero; every lane must be below 2**63.

    A lane plus 2**63 - 1 reaches bit 63 exactly when it is not zero, and
    stays below 2**64: nothing carries into the next lane.
    """
    return ((x + repeat(HIGH - 1, n)) & repeat(HIGH, n)) >> 63


def any_at_least(x: int, limit: int, n: int) -> bool:
    """Whether some lane of x is >= limit; every lane and limit below 2**63
    (a lane plus 2**63 - limit reaches bit 63 exactly when lane >= limit)."""
    return bool((x + spread(HIGH - limit, n)) & repeat(HIGH, n))


def widen(flags: int) -> int:
    """Lanes holding 0 or 1 become 0 or all ones (each 1 times 2**64 - 1
    fills exactly its own lane)."""
    return flags * LANE_ONES
