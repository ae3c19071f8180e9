"""One disk's nbdkit worker, as the supervisor of ``vdisk serve`` runs it.

    nbdkit [--tls=require --tls-psk=FILE] --exit-with-parent \\
        python plugin/vdisk_nbdkit.py datastore=DIR disk=NAME control=RUNDIR/NAME.ctl

serving the endpoint the supervisor bound (socket activation), with its own
interpreter: the disk's owner (its lock, its jobs, its recovery) for as long
as it runs. States:

    waiting --(the disk is free)--> starting --(control answers)--> running <--> broken
       ^                                |                               |           |
       |                                +-------(exits)--------+--------+-----------+
       +---- another process owns the disk                     v
                                                      restarting --(backoff)--> starting
                                                               |
                                   (died MAX_QUICK_DEATHS times, each within
                                    QUICK_S of its start) --> failed
    stop() from any state --> stopped

A worker whose disk's chain cannot open is ``broken``: it runs, refuses
every connection with the reason (and retries the chain at each one), and
becomes ``running`` once the chain opens. A worker that has ``failed``
stops listening on the endpoint, so clients are refused at once instead of
waiting in the queue for a worker that will not come.

A worker that dies is restarted at once the first time, then after a backoff
that doubles (BACKOFF_S..MAX_BACKOFF_S) while it keeps dying soon after its
start; running for QUICK_S resets that. Every method runs on the
supervisor's main thread: nbdkit dies with the thread that started it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

from . import blockpath  # noqa: F401  (vdisk_block importable)
from .control import ControlClient
from .endpoint import Endpoint
from .errors import Error
from .nbdkit import NbdkitServer

log = logging.getLogger(__name__)

BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
QUICK_S = 10.0
MAX_QUICK_DEATHS = 5
START_TIMEOUT_S = 30.0


class Worker:
    def __init__(self, datastore: str, endpoint: Endpoint, rundir: str, *,
                 tls_psk: str | None = None, threads: str | None = None,
                 readonly: bool = False) -> None:
        self.datastore = datastore
        self.disk = endpoint.disk
        self.endpoint = endpoint
        self.rundir = rundir
        self.control = os.path.join(rundir, f"{self.disk}.ctl")
        self.tls_psk = tls_psk
        self.threads = threads
        self.readonly = readonly
        self.state = "waiting"
        self.error: str | None = None
        self.restarts = 0
        self.server: NbdkitServer | None = None
        self.started_at: float | None = None          # monotonic, of the running process
        self.started_wall: float | None = None
        self._quick_deaths = 0
        self._retry_at = 0.0

    # -- what the supervisor asks --------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None and self.state in (
            "starting", "running", "broken") else None

    def info(self) -> dict[str, Any]:
        uptime = time.monotonic() - self.started_at if self.started_at and \
            self.state in ("running", "broken") else None
        return {"disk": self.disk, "state": self.state, "pid": self.pid,
                "uptime_s": uptime, "restarts": self.restarts, "error": self.error,
                "control": self.control, **self.endpoint.record()}

    def _ready(self) -> bool:
        try:
            ControlClient.connect(self.control, timeout=0.5).close()
        except (Error, OSError):
            return False
        return True

    # -- the state machine ----------------------------------------------------------------

    def step(self, now: float, owner: Any) -> str | None:
        """Advance the worker; returns a line to log when something happened.
        ``owner`` is who else owns the disk (vdisk_block.owner.Holder) or None."""
        if self.state in ("failed", "stopped"):
            return None
        if self.state in ("waiting", "restarting"):
            if now < self._retry_at:
                return None
            if owner is not None:
                first = self.state != "waiting" or self.error is None
                self.state, self.error = "waiting", f"disk {self.disk!r} is in use by {owner}"
                self._retry_at = now + 1.0
                return f"disk {self.disk}: waiting: {self.error}" if first else None
            return self._spawn(now)
        assert self.server is not None
        if self.state == "starting":
            try:
                if self.server.poll_ready():
                    self.state, self.error = "running", None
                    return self.probe()
            except Error as e:
                return self._died(now, _reason(e, self.server))
            return None
        if self.server.returncode is not None:          # running, then exited
            return self._died(now, _exit_reason(self.server))
        if self._quick_deaths and now - (self.started_at or now) >= QUICK_S:
            self._quick_deaths = 0
        return None

    def probe(self) -> str | None:
        """Ask a running worker whether its disk's chain opens: running or broken."""
        if self.state not in ("running", "broken"):
            return None
        try:
            with ControlClient.connect(self.control, timeout=5.0) as client:
                error = client.execute("query-disk", {}, timeout=30.0)["error"]
        except (Error, OSError):
            return None                         # dying: step() sees it exit
        was = self.state
        self.state, self.error = ("broken", error) if error else ("running", None)
        if self.state != was or (error and was == "running"):
            return f"disk {self.disk} is not served: {error}" if error else \
                f"disk {self.disk}: its chain opens now; served"
        return None

    def _spawn(self, now: float) -> str | None:
        args = [f"datastore={self.datastore}", f"disk={self.disk}", f"control={self.control}",
                f"supervisor={os.getpid()}"]
        if self.threads:
            args.append(f"threads={self.threads}")
        extra = ["--tls=require", f"--tls-psk={self.tls_psk}"] if self.tls_psk else []
        self.server = NbdkitServer(args, self.rundir, name=self.disk, extra_args=extra,
                                   readonly=self.readonly, listen=self.endpoint.sock,
                                   uri=self.endpoint.uri, ready=self._ready,
                                   start_timeout=START_TIMEOUT_S)
        try:
            self.server.spawn()
        except Error as e:
            return self._died(now, str(e))
        self.state = "starting"
        self.started_at, self.started_wall = now, time.time()
        return None

    def _died(self, now: float, reason: str) -> str:
        self.error = reason
        quick = self.started_at is not None and now - self.started_at < QUICK_S
        self._quick_deaths = self._quick_deaths + 1 if quick else 1
        if self._quick_deaths >= MAX_QUICK_DEATHS:
            self.state = "failed"
            self.endpoint.close()               # refuse clients rather than queue them
            return (f"disk {self.disk}: the worker died {self._quick_deaths} times, each "
                    f"within {QUICK_S:g} s of its start; giving up: {reason}")
        delay = 0.0 if self._quick_deaths == 1 else \
            min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (self._quick_deaths - 2))
        self.state, self._retry_at = "restarting", now + delay
        self.restarts += 1
        return f"disk {self.disk}: worker {reason}; restarting in {delay:g} s"

    # -- stopping ---------------------------------------------------------------------------

    def terminate(self) -> None:
        """Ask the worker to exit (SIGTERM); see stop_now for what stays attached."""
        if self.server is not None and self.server.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server.pid or 0, signal.SIGTERM)

    def exited(self) -> bool:
        return self.server is None or self.server.returncode is not None

    def stop_now(self) -> str | None:
        """Flush what the disk acknowledged, then kill the worker (nbdkit with a
        Python plugin does not exit on SIGTERM while a client stays attached).
        Returns why the flush failed, if it did."""
        why = None
        if self.server is not None and self.server.returncode is None:
            try:
                with ControlClient.connect(self.control, timeout=5.0) as client:
                    client.execute("flush", {}, timeout=30.0)
            except (Error, OSError) as e:
                why = str(e)
            self.server.kill()
        self.state = "stopped"
        return why

    def reap(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=5.0)
        self.state = "stopped"


def _exit_reason(server: NbdkitServer) -> str:
    code = server.returncode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else \
        f"exited with code {code}"
    last = _last_error(server.stderr_text())
    return f"pid {server.pid} {how}" + (f": {last}" if last else "")


def _reason(e: Error, server: NbdkitServer) -> str:
    last = _last_error(server.stderr_text())
    return f"did not start: {last or e}"


def _last_error(text: str) -> str:
    """The line of an nbdkit log that says why it stopped."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower():
            # nbdkit: python[1]: error: /x/vdisk_nbdkit.py: config_complete: Busy: REASON
            return ln.split(": ", 2)[-1] if ln.startswith("nbdkit:") else ln
    return lines[-1] if lines else ""
