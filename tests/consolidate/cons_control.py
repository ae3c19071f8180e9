"""A small client of the control socket (docs/control.md), for tests only.

Deliberately independent of ``orchestration/vdisk/control.py``: these tests
check the server side of the protocol, so they speak it themselves. Every
read has a deadline; events that arrive between replies are kept in
``events``.
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Any

REPLY_DEADLINE = 60.0    # seconds for one reply (job-complete drains and pivots)
FINAL = ("done", "cancelled", "failed", "interrupted")


class ControlError(Exception):
    """The server answered with {"error": ...}."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.cls = error.get("class")
        self.desc = error.get("desc", "")
        super().__init__(f"{command}: {self.cls}: {self.desc}")


class ControlClient:
    def __init__(self, path: str | Path, deadline: float = 10.0) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(deadline)
        self.sock.connect(self.path)
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read_obj(time.monotonic() + deadline)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lines --------------------------------------------------------------------

    def _read_line(self, deadline: float) -> bytes | None:
        """One line, or None when the deadline passes first; EOFError if closed."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"control socket {self.path} closed by the server")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _read_obj(self, deadline: float) -> dict[str, Any]:
        line = self._read_line(deadline)
        if line is None:
            raise TimeoutError(f"no line from {self.path} before the deadline")
        obj = json.loads(line)
        assert isinstance(obj, dict), f"not a JSON object: {line!r}"
        return obj

    def reply(self, deadline: float = REPLY_DEADLINE) -> dict[str, Any]:
        """The next reply line, keeping events aside."""
        end = time.monotonic() + deadline
        while True:
            obj = self._read_obj(end)
            if "event" in obj:
                self.events.append(obj)
                continue
            return obj

    def send_raw(self, data: bytes, deadline: float = REPLY_DEADLINE) -> dict[str, Any]:
        self.sock.sendall(data)
        return self.reply(deadline)

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             deadline: float = REPLY_DEADLINE, **extra: Any) -> dict[str, Any]:
        """Send one command; return the whole reply ({"return"} or {"error"})."""
        req: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            req["arguments"] = arguments
        return self.send_raw((json.dumps(req) + "\n").encode(), deadline)

    def execute(self, command: str, deadline: float = REPLY_DEADLINE,
                **arguments: Any) -> dict[str, Any]:
        """Send one command; its "return" value, or ControlError."""
        rep = self.call(command, arguments, deadline)
        if "error" in rep:
            raise ControlError(command, rep["error"])
        assert "return" in rep, f"{command}: neither return nor error: {rep}"
        return rep["return"]

    def send_only(self, command: str, **arguments: Any) -> None:
        """Send a command without reading its reply (crash tests kill right after)."""
        req = {"execute": command, "arguments": arguments}
        self.sock.sendall((json.dumps(req) + "\n").encode())

    def pump(self, timeout: float) -> None:
        """Collect events for up to timeout seconds (returns at the first line)."""
        line = self._read_line(time.monotonic() + timeout)
        if line is not None:
            obj = json.loads(line)
            if "event" in obj:
                self.events.append(obj)
            else:
                raise AssertionError(f"unexpected reply without a request: {obj}")

    # -- jobs ---------------------------------------------------------------------

    def job(self, job_id: int) -> dict[str, Any]:
        jobs = self.execute("query-jobs", id=job_id)["jobs"]
        assert len(jobs) == 1, jobs
        return jobs[0]

    def wait_job(self, job_id: int, states: tuple[str, ...], deadline: float = 60.0,
                 ) -> dict[str, Any]:
        """Wait (on events, with a deadline) until the job is in one of states or final."""
        end = time.monotonic() + deadline
        while True:
            job = self.job(job_id)
            if job["state"] in states or job["state"] in FINAL:
                return job
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} still {job['state']} after {deadline} s, "
                                   f"waiting for {states}")
            self.pump(min(left, 0.2))

    def disk(self, name: str) -> dict[str, Any]:
        """The disk this worker serves (its name must be ``name``)."""
        return self.execute("query-disk", disk=name)
