"""Client of a served datastore's control socket (docs/control.md), and the way in.

    with open_service(datastore) as service:          # served or not
        top = service.execute("snapshot", {"disk": "vm1"})["top"]

:func:`open_service` returns a :class:`ControlClient` connected to the
server's control socket when the datastore is served (the socket given with
``--control``, or the one the server recorded in the catalog), and otherwise
the block engine's own ``DatastoreService`` running in this process on the
files directly. Both have ``execute(command, arguments) -> dict`` and
``close()``; the commands and replies are the same. A served datastore must
never get a second, in-process service (it would take the running jobs for
dead ones), so a datastore whose server is alive but whose control socket
does not answer is an error, not "offline".

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
from pathlib import Path
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


# --- the client --------------------------------------------------------------------


class Service(Protocol):
    """What both a ControlClient and an in-process DatastoreService offer."""

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
                raise ControlProtocolError(self.path, f"no answer ({what}) in time")
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


# --- served or offline ---------------------------------------------------------------


def _server_alive(pid_text: str | None) -> int | None:
    """The pid of a live nbdkit recorded as the datastore's server, else None."""
    try:
        pid = int(pid_text or "")
    except ValueError:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state == "Z":
        return None
    if not any(arg.startswith(b"datastore=") for arg in cmdline):
        return None                             # the pid has been reused since
    return pid


def _check_datastore(client: ControlClient, directory: str) -> None:
    served = client.datastore
    if served is not None and os.path.realpath(served) != os.path.realpath(directory):
        client.close()
        raise ControlUnavailable(client.path, f"serves datastore {served}, not {directory}")


def open_service(datastore_dir: str | os.PathLike[str],
                 control_sock: str | os.PathLike[str] | None = None) -> Service:
    """A ControlClient if the datastore is served, else an in-process DatastoreService."""
    from vdisk_block.catalog import Catalog
    from vdisk_block.service import DatastoreService

    directory = os.path.abspath(datastore_dir)
    if control_sock is not None:
        client = ControlClient.connect(control_sock)
        _check_datastore(client, directory)
        return client
    catalog = Catalog(directory)
    try:
        recorded = catalog.get_meta("control")
        server_pid = catalog.get_meta("server_pid")
    finally:
        catalog.close()
    if recorded:
        path = os.path.join(directory, recorded)
        try:
            client = ControlClient.connect(path)
        except ControlUnavailable as e:
            log.debug("Recorded control socket is stale: %s", e)
        else:
            _check_datastore(client, directory)
            return client
    pid = _server_alive(server_pid)
    if pid is not None:
        raise ControlUnavailable(
            os.path.join(directory, recorded or "?"),
            f"the datastore is served by nbdkit pid {pid} but its control socket does "
            "not answer")
    log.debug("Datastore %s is not served: running commands in this process", directory)
    service: Service = DatastoreService(directory)
    return service


def is_served(service: Service) -> bool:
    return isinstance(service, ControlClient)
