"""The states of a mirror job and the figures it reports (see mirror.py)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    COPYING = "copying"
    READY = "ready"
    PIVOTING = "pivoting"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


ACTIVE = (State.COPYING, State.READY)
ENDED = (State.DONE, State.CANCELLED, State.FAILED)


@dataclass
class Stats:
    copy_set_bytes: int = 0
    bytes_copied: int = 0
    bytes_mirrored: int = 0             # guest bytes written to the target
    bytes_direct: int = 0               # of which to the target alone
    bytes_handed_down: int = 0          # copied bytes the top let go of before the pivot
    passes: int = 0
    time_to_ready_s: float = 0.0
    duration_s: float = 0.0
    pivot_pause_ms: float = 0.0
