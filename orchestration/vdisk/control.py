"""Client of a control socket (docs/control.md): a served datastore's
supervisor, or one disk's worker. ``routing.open_service`` picks which.

The protocol is QMP-like: a greeting, then one JSON object per line; the
client tags each command with an ``id``, skips the events that arrive between
replies (keeping them in :attr:`ControlClient.events`) and raises
:class:`ControlError` with the server's one-line ``desc`` on an error reply.
Every read has a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

from . import blockpath  # noqa: F401  (makes vdisk_block importable)
from .errors import Error

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 120.0


# --- errors ------------------------------------------------------------------------


class ControlError(Error):
    """The server answered a command with an error; ``desc`` is its one-line reason."""

    msg = "{self.desc}"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(command, error_class, desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class ControlUnavailable(Error):
    """The control socket cannot be reached (or is not the datastore's)."""

    msg = "control socket {self.path}: {self.reason}"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


class ControlProtocolError(Error):
    """The server sent something that is not a control-protocol message, or went away."""

    msg = "control socket {self.path}: {self.reason}"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


class ControlTimeout(ControlProtocolError):
    """The server did not answer in time: it may still be running the command."""


# --- the client --------------------------------------------------------------------


class Service(Protocol):
    """What a ControlClient, a routing.DatastoreClient and the block engine's
    in-process services offer."""

    def execute(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...


class ControlClient:
    """A connection to a control socket, past its greeting."""

    def __init__(self, sock: socket.socket, path: str,
                 command_timeout: float = COMMAND_TIMEOUT) -> None:
        self._sock = sock
        self.path = path
        self.command_timeout = command_timeout
        self._buffer = b""
        self._next_id = 0
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = CONNECT_TIMEOUT,
                command_timeout: float = COMMAND_TIMEOUT) -> ControlClient:
        """Connect and read the greeting; ControlUnavailable if nobody answers."""
        path = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise ControlUnavailable(path, e.strerror or str(e)) from None
        client = cls(sock, path, command_timeout)
        try:
            greeting = client._read(time.monotonic() + timeout, "the greeting")
            if not isinstance(greeting.get("vdisk"), dict):
                raise ControlProtocolError(path, f"expected a vdisk greeting, got {greeting}")
        except BaseException:
            client.close()
            raise
        client.greeting = greeting["vdisk"]
        log.debug("Connected to %s: %s", path, client.greeting)
        return client

    @property
    def datastore(self) -> str | None:
        value = self.greeting.get("datastore")
        return str(value) if value is not None else None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlTimeout(self.path, f"no answer ({what}) in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise ControlProtocolError(self.path, f"connection lost waiting for {what}: "
                                           f"{e}") from e
            if not chunk:
                raise ControlProtocolError(self.path, f"the server closed the connection "
                                           f"before {what}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise ControlProtocolError(self.path, f"not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise ControlProtocolError(self.path, f"not a JSON object: {line[:200]!r}")
        return message

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> dict[str, Any]:
        """Run a command; return its ``return`` object or raise ControlError."""
        self._next_id += 1
        request_id = self._next_id
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = dict(arguments)
        log.debug("control -> %s", request)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise ControlProtocolError(self.path, f"cannot send {command}: {e}") from e
        deadline = time.monotonic() + (self.command_timeout if timeout is None else timeout)
        what = f"the reply to {command}"
        while True:
            reply = self._read(deadline, what)
            if "event" in reply:
                log.debug("control event %s", reply)
                self.events.append(reply)
                continue
            if reply.get("id") != request_id:
                log.debug("control: ignoring %s", reply)
                continue
            log.debug("control <- %s", reply)
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise ControlError(command, str(error.get("class", "GenericError")),
                                   str(error.get("desc", reply["error"])))
            result = reply.get("return")
            if not isinstance(result, dict):
                raise ControlProtocolError(self.path, f"{command}: no return object in "
                                           f"{reply}")
            return result
