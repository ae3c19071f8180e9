"""One small client for the two JSON-line monitors the consolidation benchmark
drives: QEMU's QMP (qemu-storage-daemon ``--monitor``) and vdisk's control
socket (docs/control.md), which is modelled on it.

    with MonitorClient.connect(path, deadline, qmp=True) as mon:
        mon.execute("block-commit", {"job-id": "c0", "device": "top"})
        event = mon.wait_event(lambda e: e["event"] == "BLOCK_JOB_READY", deadline)

Both protocols: a greeting, then one JSON object per line; the client tags
each command with an ``id`` and keeps the events that arrive meanwhile in
:attr:`MonitorClient.events`. Every read has a deadline (``time.monotonic()``
values); a command that gets an ``error`` raises :class:`MonitorError`.
Driving both sides with the same client keeps their timings comparable.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

Event = dict[str, Any]


class MonitorError(Exception):
    """The monitor answered a command with an error, or went away, or was too slow."""

    template = "{path}: {command}: {reason}"

    def __init__(self, path: str, command: str, reason: str) -> None:
        self.path = path
        self.command = command
        self.reason = reason
        super().__init__(self.template.format(path=path, command=command, reason=reason))


def event_time(event: Event) -> float:
    """The event's own timestamp (``time.time()`` scale) for QMP and vdisk events."""
    ts = event.get("timestamp")
    if isinstance(ts, dict):                       # QMP: {"seconds", "microseconds"}
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    if isinstance(ts, (int, float)):               # vdisk: a float
        return float(ts)
    return float(event["_received"])


class MonitorClient:
    """A connected monitor, past its greeting (and ``qmp_capabilities`` for QMP)."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self.path = path
        self._buffer = b""
        self._next_id = 0
        self.greeting: Event = {}
        self.events: list[Event] = []

    @classmethod
    def connect(cls, path: str, deadline: float, *, qmp: bool) -> MonitorClient:
        """Connect (retrying until ``deadline``: the socket may not exist yet)."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise MonitorError(path, "connect", str(e)) from None
                time.sleep(0.01)
        client = cls(sock, path)
        try:
            client.greeting = client._read(deadline, "greeting")
            if ("QMP" if qmp else "vdisk") not in client.greeting:
                raise MonitorError(path, "greeting", f"unexpected {client.greeting}")
            if qmp:
                client.execute("qmp_capabilities", timeout=deadline - time.monotonic())
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _read(self, deadline: float, what: str) -> Event:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.path}: no {what} in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise MonitorError(self.path, what, f"connection lost: {e}") from e
            if not chunk:
                raise MonitorError(self.path, what, "the server closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise MonitorError(self.path, what, f"not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise MonitorError(self.path, what, f"not an object: {line[:200]!r}")
        if "event" in message:
            message["_received"] = time.time()
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = 30.0) -> Any:
        """Run ``command``; return its ``return`` value (MonitorError on an error reply)."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        log.debug("%s -> %s", self.path, request)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise MonitorError(self.path, command, f"cannot send: {e}") from e
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._read(deadline, f"reply to {command}")
            except TimeoutError as e:
                raise MonitorError(self.path, command, str(e)) from None
            if "event" in reply:
                log.debug("%s event %s", self.path, reply)
                self.events.append(reply)
                continue
            if reply.get("id") != self._next_id:
                continue
            if "error" in reply:
                err = reply["error"]
                raise MonitorError(self.path, command, f"{err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def wait_event(self, match: Callable[[Event], bool], deadline: float) -> Event | None:
        """The first event (kept or new) for which ``match`` is true; None at ``deadline``.

        Events that do not match stay in :attr:`events` (in arrival order) for the record.
        """
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            try:
                message = self._read(deadline, "event")
            except TimeoutError:
                return None
            if "event" in message:
                log.debug("%s event %s", self.path, message)
                self.events.append(message)
