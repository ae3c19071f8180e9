"""The control socket: JSON lines in the style of QMP (docs/control.md).

Serves any service that answers ``execute(command, arguments)``, says who it
is with ``greeting()`` and keeps ``listeners`` for its events: a disk's
service inside its nbdkit worker (threads started from after_fork, so they
live in the serving process) or the supervisor of a served datastore. Every
line gets exactly one reply; a malformed line, an unknown command or a
failing one gets an error reply, and the connection and the server carry on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from .commands import CommandNotFound
from .errors import ImageError


class Service(Protocol):
    listeners: list[Callable[[dict[str, Any]], None]]

    def execute(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]: ...

    def greeting(self) -> dict[str, Any]: ...

MAX_LINE = 1 << 20


class ControlServer:
    def __init__(self, path: str, service: Service, mode: int = 0o600) -> None:
        self.path = path
        self.service = service
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)            # stale socket of a server that died
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~mode)
        try:
            self.sock.bind(path)           # 0600 by default: only our user may drive the disks
        finally:
            os.umask(old)
        self.sock.listen(16)
        service.listeners.append(self._broadcast)
        self._thread = threading.Thread(target=self._accept, name="vdisk-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.service.listeners.remove(self._broadcast)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._lock:
            for c in list(self._clients):
                c.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return                     # closed
            client = _Client(conn, self)
            with self._lock:
                self._clients.add(client)
            threading.Thread(target=client.run, name="vdisk-control-client",
                             daemon=True).start()

    def _broadcast(self, event: dict[str, Any]) -> None:
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.send(event)

    def forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)


class _Client:
    def __init__(self, conn: socket.socket, server: ControlServer) -> None:
        self.conn = conn
        self.server = server
        self._wlock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        with self._wlock:
            try:
                self.conn.sendall(data)
            except OSError:
                pass                       # the reader notices and cleans up

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()

    def run(self) -> None:
        try:
            self.send({"vdisk": self.server.service.greeting()})
            buf = b""
            while True:
                chunk = self.conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self.send(self._handle(line))
                if len(buf) > MAX_LINE:
                    self.send(_error("ParseError", "line too long"))
                    return
        except OSError:
            return
        finally:
            self.server.forget(self)
            self.close()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError as e:
            return _error("ParseError", f"invalid JSON: {e}")
        if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
            return _error("ParseError", 'expected an object with "execute"')
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            return _error("GenericError", '"arguments" must be an object', req)
        try:
            ret = self.server.service.execute(req["execute"], args)
        except CommandNotFound as e:
            return _error("CommandNotFound", e.reason, req)
        except ImageError as e:
            return _error("GenericError", str(e), req)
        except OSError as e:
            return _error("GenericError", f"{req['execute']}: {e}", req)
        except Exception as e:      # noqa: BLE001 - a bug: report it, keep serving
            traceback.print_exc()
            return _error("InternalError", f"{type(e).__name__}: {e}", req)
        reply: dict[str, Any] = {"return": ret}
        if "id" in req:
            reply["id"] = req["id"]
        return reply


def _error(cls: str, desc: str, req: dict[str, Any] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if req is not None and "id" in req:
        reply["id"] = req["id"]
    return reply
