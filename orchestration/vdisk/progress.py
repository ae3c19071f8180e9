"""A one-line progress bar for long copies: bytes done, rate, ETA.

    with ProgressBar("copying", total, enabled=not args.json) as bar:
        bar.update(done)

It draws on a terminal only (stderr by default, so stdout stays clean for
what the command prints), and at most every ``interval`` seconds; anywhere
else, or when disabled, it does nothing. The rate is taken over the last few
seconds, so the ETA follows the copy's current speed.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from types import TracebackType
from typing import TextIO

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """75 -> '1:15', 3725 -> '1:02:05'."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    WIDTH = 24
    WINDOW_S = 5.0

    def __init__(self, label: str, total: int, *, enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.label = label
        self.total = max(0, total)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and _isatty(self.stream)
        self.interval = interval
        self.done = 0
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._samples: deque[tuple[float, int]] = deque()
        self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def update(self, done: int, total: int | None = None, *, label: str | None = None,
               force: bool = False) -> None:
        if total is not None:
            self.total = max(0, total)
        if label is not None:
            self.label = label
        finished = bool(self._samples) and self._samples[-1][1] >= self.total
        self.done = max(0, done)
        now = time.monotonic()
        if not finished:                # the rate stays what it was when the copy ended
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW_S:
                self._samples.popleft()
        if self.enabled and (force or now - self._last_draw >= self.interval):
            self._last_draw = now
            self._draw(self.line())

    def rate(self) -> float:
        """Bytes per second over the recent window."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self) -> str:
        total = self.total
        fraction = min(1.0, self.done / total) if total else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "=" * filled + (">" if filled < self.WIDTH else "") + " " * (self.WIDTH - filled - 1)
        rate = self.rate()
        if self.done >= total:
            eta = "done"
        elif rate > 0:
            eta = "ETA " + human_duration((total - self.done) / rate)
        else:
            eta = "ETA --:--"
        return (f"{self.label} [{bar[:self.WIDTH]}] {fraction * 100:3.0f}% "
                f"{human_bytes(self.done)} / {human_bytes(total)}  "
                f"{human_bytes(rate)}/s  {eta}")

    def _draw(self, text: str) -> None:
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Leave the last state on its own line (if anything was drawn)."""
        if self.enabled and self._drawn:
            self._draw(self.line())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
