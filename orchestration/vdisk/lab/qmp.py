"""A small synchronous client of the QEMU Machine Protocol (QMP).

    qmp = QmpClient(sock)            # a connected stream socket
    qmp.handshake(timeout=10)        # reads the greeting, sends qmp_capabilities
    qmp.execute("query-status")      # -> {"running": False, "status": "prelaunch", ...}
    qmp.execute("stop")
    qmp.wait_event("STOP", timeout=10)

QMP speaks JSON objects, one per line. ``execute`` tags each command with an
``id`` and reads until the response with that id, keeping every event that
arrives meanwhile in :attr:`QmpClient.events`; ``wait_event`` takes events
from there first. Every read has a deadline. A command that QEMU answers with
an ``error`` raises :class:`QmpCommandError` (``.error_class``, ``.desc``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..errors import Error

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class QmpError(Error):
    """Base class of QMP failures."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error."""

    msg = "QMP command {self.command} failed: {self.error_class}: {self.desc}"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(command, error_class, desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpTimeout(QmpError):
    """Nothing (or not the expected message) arrived before the deadline."""

    msg = "QMP: no {self.what} within {self.timeout:g} s"

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(what, timeout)
        self.what = what
        self.timeout = timeout


class QmpClosed(QmpError):
    """QEMU closed the QMP connection (it exited)."""

    msg = "QMP connection closed while waiting for {self.what}"

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class QmpProtocolError(QmpError):
    """QEMU sent something that is not a QMP message."""

    msg = "QMP protocol error: {self.reason}"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QmpClient:
    """QMP over a connected stream socket (the client owns and closes it)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._next_id = 0
        self._lock = threading.Lock()
        self.greeting: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect_unix(cls, path: str, timeout: float = DEFAULT_TIMEOUT) -> QmpClient:
        """Connect to a QMP server socket (``-qmp unix:PATH,server=on,wait=off``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- protocol -------------------------------------------------------------

    def _read_message(self, deadline: float, what: str, timeout: float) -> dict[str, Any]:
        """The next message; QmpTimeout(what, timeout) once ``deadline`` has passed."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeout(what, timeout)
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue  # the loop raises QmpTimeout
            except OSError as e:
                raise QmpClosed(what) from e
            if not chunk:
                raise QmpClosed(what)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except json.JSONDecodeError as e:
            raise QmpProtocolError(f"not JSON: {line[:200]!r}") from e
        if not isinstance(message, dict):
            raise QmpProtocolError(f"not a JSON object: {line[:200]!r}")
        return message

    def _send(self, message: Mapping[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise QmpClosed(f"sending {message.get('execute')}") from e

    def handshake(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Read QEMU's greeting and leave capabilities negotiation mode; return the greeting."""
        deadline = time.monotonic() + timeout
        with self._lock:
            greeting = self._read_message(deadline, "QMP greeting", timeout)
        if "QMP" not in greeting:
            raise QmpProtocolError(f"expected the QMP greeting, got {greeting}")
        self.greeting = greeting
        self._execute("qmp_capabilities", None, deadline, timeout)
        return greeting

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run a QMP command and return its ``return`` value."""
        return self._execute(command, arguments, time.monotonic() + timeout, timeout)

    def _execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None,
        deadline: float,
        timeout: float,
    ) -> Any:
        with self._lock:
            self._next_id += 1
            request_id = f"vdisk-{self._next_id}"
            message: dict[str, Any] = {"execute": command, "id": request_id}
            if arguments:
                message["arguments"] = dict(arguments)
            log.debug("QMP -> %s", message)
            self._send(message)
            what = f"reply to {command}"
            while True:
                reply = self._read_message(deadline, what, timeout)
                if "event" in reply:
                    log.debug("QMP event %s", reply)
                    self.events.append(reply)
                    continue
                if reply.get("id") != request_id:
                    log.debug("QMP: ignoring reply %s", reply)
                    continue
                log.debug("QMP <- %s", reply)
                if "error" in reply:
                    error = reply["error"]
                    raise QmpCommandError(command, error.get("class", "?"), error.get("desc", ""))
                return reply.get("return")

    def wait_event(
        self, name: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Take the first event named ``name`` (any event if None), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        what = f"event {name or '(any)'}"
        with self._lock:
            while True:
                for i, event in enumerate(self.events):
                    if name is None or event.get("event") == name:
                        return self.events.pop(i)
                message = self._read_message(deadline, what, timeout)
                if "event" in message:
                    log.debug("QMP event %s", message)
                    self.events.append(message)
                else:
                    log.debug("QMP: ignoring unexpected reply %s", message)

    def clear_events(self) -> list[dict[str, Any]]:
        """Return and forget the events received so far."""
        events, self.events = self.events, []
        return events
