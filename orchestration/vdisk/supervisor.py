"""The supervisor of ``vdisk serve``: one nbdkit worker per disk (docs/serve.md).

The supervisor holds the datastore's server lock, binds every disk's
endpoint (endpoint.py), records it in the catalog, and runs one worker per
disk (worker.py), each its own process and interpreter: the disk's owner.
It restarts a worker that dies (the endpoint stays; connections wait),
starts one for a disk created while it serves, stops one whose disk is
removed, and answers the datastore-level commands on its control socket:
query-disks, query-jobs, server-status, disk-added, disk-remove, flush.
A disk's own commands go to its worker's control socket.

Every worker is started and stopped on the thread that runs ``serve()``
(nbdkit dies with the thread that started it); the control socket's threads
hand such requests to it and wait for the answer, within a deadline.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from . import blockpath  # noqa: F401  (vdisk_block importable)
from .endpoint import Endpoint, EndpointError, free_ports
from .errors import Error
from .worker import Worker

log = logging.getLogger(__name__)

TICK_S = 0.05
RESCAN_S = 2.0
REQUEST_TIMEOUT_S = 60.0


class SupervisorError(Error):
    msg = "{self.reason}"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Options:
    rundir: str
    ports: tuple[int, int] | None = None        # TCP; else Unix sockets in rundir
    address: str = "127.0.0.1"
    tls_psk: str | None = None
    socket_mode: int = 0o600
    socket_gid: int | None = None
    threads: str | None = None
    readonly: bool = False
    stop_timeout: float = 10.0
    start_timeout: float = 30.0
    say: Callable[[str], None] = field(default=lambda line: None)


class Supervisor:
    def __init__(self, datastore: str, options: Options) -> None:
        from vdisk_block.catalog import Catalog
        from vdisk_block.endpoints import SERVER_LOCK
        from vdisk_block.owner import Lock

        self.dir = os.path.abspath(datastore)
        self.opts = options
        self.control = os.path.join(options.rundir, "vdisk.ctl")
        self.workers: dict[str, Worker] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = \
            queue.SimpleQueue()
        self._stop = threading.Event()
        self._control_server: Any = None
        self._server_lock = Lock(self.dir, SERVER_LOCK, "vdisk serve",
                                 f"datastore {self.dir} is already served by {{holder}}")
        try:
            self.catalog = Catalog(self.dir)
            os.makedirs(options.rundir, mode=0o755, exist_ok=True)
        except BaseException:
            self._server_lock.close()
            raise

    # -- start and the main loop ----------------------------------------------------------

    def start(self) -> None:
        """Bind every disk's endpoint (all or none), start the workers in
        parallel, wait until each serves or says why not (bounded), and open
        the control socket."""
        from vdisk_block.control import ControlServer

        names = [r["name"] for r in self.catalog.disks()]
        workers = [self._add_worker(ep) for ep in self._bind(names)]
        self._wait_started(workers)
        self._control_server = ControlServer(self.control, self)
        self.catalog.set_meta("control", os.path.relpath(self.control, self.dir))
        self.catalog.set_meta("server_pid", str(os.getpid()))

    def _wait_started(self, workers: list[Worker]) -> None:
        """Step the workers until none is still starting: each serves, has failed
        or died at its start (and says why), or waits for the disk's owner."""
        deadline = time.monotonic() + self.opts.start_timeout
        while time.monotonic() < deadline:
            self._tick()
            if not any(w.state == "starting" or (w.state == "waiting" and w.error is None)
                       for w in workers):
                return
            time.sleep(TICK_S)

    def serve(self) -> None:
        """Run until stop(): watch the workers, run the requests of the control
        threads, pick up disks added or removed behind our back."""
        next_scan = time.monotonic() + RESCAN_S
        while not self._stop.is_set():
            self._tick()
            self._run_requests()
            if time.monotonic() >= next_scan:
                self._rescan()
                next_scan = time.monotonic() + RESCAN_S
            self._stop.wait(TICK_S)

    def stop(self) -> None:
        self._stop.set()

    def _tick(self) -> None:
        from vdisk_block.owner import disk_owner

        now = time.monotonic()
        for w in list(self.workers.values()):
            holder = disk_owner(self.dir, w.disk) if w.state in ("waiting", "restarting") \
                else None
            line = w.step(now, holder)
            if line:
                self.opts.say(line)

    def _run_requests(self) -> None:
        while True:
            try:
                fn, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:      # noqa: BLE001 - handed to the requester
                    fut.set_exception(e)

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the serving thread (from a control thread) and return its result."""
        fut: Future[Any] = Future()
        self._requests.put((fn, fut))
        return fut.result(REQUEST_TIMEOUT_S)

    # -- endpoints and workers ------------------------------------------------------------

    def _bind(self, names: list[str]) -> list[Endpoint]:
        """Endpoints for these disks, all bound, or none (a one-line error naming
        the socket or port that failed)."""
        bound: list[Endpoint] = []
        tls = self.opts.tls_psk is not None
        try:
            if self.opts.ports is None:
                for n in names:
                    bound.append(Endpoint.unix(n, os.path.join(self.opts.rundir, f"{n}.sock"),
                                               mode=self.opts.socket_mode,
                                               gid=self.opts.socket_gid, tls=tls))
            else:
                taken = {w.endpoint.port for w in self.workers.values() if w.endpoint.port}
                lo, hi = self.opts.ports
                for n, port in zip(names, free_ports(self.opts.address, lo, hi, taken,
                                                      len(names)), strict=True):
                    bound.append(Endpoint.tcp(n, self.opts.address, port, tls=tls))
        except BaseException:
            for ep in bound:
                ep.close()
            raise
        return bound

    def _add_worker(self, ep: Endpoint) -> Worker:
        from vdisk_block import endpoints

        w = Worker(self.dir, ep, self.opts.rundir, tls_psk=self.opts.tls_psk,
                   threads=self.opts.threads, readonly=self.opts.readonly)
        endpoints.record(self.catalog, ep.disk, **ep.record(), control=w.control)
        self.workers[ep.disk] = w
        return w

    def _start_disk(self, name: str) -> dict[str, Any]:
        """On the main thread: serve a disk added to the catalog (or start again one
        whose worker gave up); wait until it serves or says why not."""
        w = self.workers.get(name)
        if w is not None and w.state == "failed":
            self.workers.pop(name).reap()
            w = None
        if w is None:
            self.catalog.disk(name)
            w = self._add_worker(self._bind([name])[0])
        self._wait_started([w])
        return w.info()

    def _stop_disk(self, name: str) -> None:
        """On the main thread: stop a disk's worker and close its endpoint."""
        from vdisk_block import endpoints

        w = self.workers.pop(name, None)
        if w is None:
            return
        self._stop_workers([w])
        w.endpoint.close()
        endpoints.forget(self.catalog, name)

    def _rescan(self) -> None:
        for w in list(self.workers.values()):
            if w.state == "broken":                 # mended meanwhile?
                line = w.probe()
                if line:
                    self.opts.say(line)
        names = {r["name"] for r in self.catalog.disks()}
        for name in sorted(names - set(self.workers)):
            try:
                self._start_disk(name)
            except (Error, OSError) as e:
                self.opts.say(f"disk {name}: cannot serve it: {e}")
        for name in sorted(set(self.workers) - names):
            self._stop_disk(name)

    def _stop_workers(self, workers: list[Worker]) -> None:
        """SIGTERM all; who has not exited after stop_timeout (clients attached)
        is flushed through its control socket and killed."""
        for w in workers:
            w.terminate()
        deadline = time.monotonic() + self.opts.stop_timeout
        while not all(w.exited() for w in workers) and time.monotonic() < deadline:
            time.sleep(TICK_S)
        for w in workers:
            if not w.exited():
                why = w.stop_now()
                self.opts.say(f"disk {w.disk}: clients still attached {self.opts.stop_timeout:g}"
                              f" s after the stop request; "
                              f"{'flushed' if why is None else f'could not flush ({why})'}"
                              " and stopped the worker")
            w.reap()

    def close(self) -> None:
        """Stop every worker, close every endpoint, forget them, release the lock."""
        from vdisk_block import endpoints

        try:
            if self._control_server is not None:
                self._control_server.close()
                self._control_server = None
            self._stop_workers(list(self.workers.values()))
            for w in self.workers.values():
                w.endpoint.close()
            self.workers.clear()
            try:        # (the records are dead without the server lock anyway)
                endpoints.forget(self.catalog)
                self.catalog.set_meta("control", None)
                self.catalog.set_meta("server_pid", None)
            except sqlite3.Error as e:
                self.opts.say(f"could not clear the endpoints from the catalog: {e}")
        finally:
            self.catalog.close()
            self._server_lock.close()

    # -- the control socket's commands --------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        from vdisk_block.commands import run

        return run(_COMMANDS, self, command, arguments)

    def greeting(self) -> dict[str, Any]:
        from vdisk_block import __version__

        return {"version": __version__, "datastore": self.dir, "server": "supervisor"}

    def query_disks(self, disk: str | None = None) -> dict[str, Any]:
        from vdisk_block.datastore import DatastoreView

        with DatastoreView(self.dir) as view:
            disks = view.query_disks(disk)["disks"]
        for d in disks:
            w = self.workers.get(d["name"])
            d["worker"] = w.info() if w is not None else None
            d["uri"] = w.endpoint.uri if w is not None else None
        return {"disks": disks}

    def query_jobs(self, disk: str | None = None, id: int | None = None) -> dict[str, Any]:  # noqa: A002
        from vdisk_block.datastore import DatastoreView

        with DatastoreView(self.dir) as view:
            return view.query_jobs(disk, id)

    def server_status(self) -> dict[str, Any]:
        return {"datastore": self.dir, "pid": os.getpid(), "control": self.control,
                "rundir": self.opts.rundir, "tls": self.opts.tls_psk is not None,
                "workers": [w.info() for _, w in sorted(self.workers.items())]}

    def disk_added(self, disk: str) -> dict[str, Any]:
        return {"worker": self._on_main(lambda: self._start_disk(disk))}

    def disk_remove(self, disk: str, keep_images: bool = False) -> dict[str, Any]:
        from vdisk_block.datastore import DatastoreView

        def remove() -> dict[str, Any]:
            with DatastoreView(self.dir) as view:
                return view.disk_remove(disk, keep_images)

        return self._without_worker(disk, remove, "disconnect them first")

    def disk_rename(self, disk: str, new: str) -> dict[str, Any]:
        """Rename a served disk: its worker stops (refused while clients are
        attached), and a worker for the new name serves on the new name's endpoint."""
        from vdisk_block.datastore import DatastoreView

        def rename() -> dict[str, Any]:
            with DatastoreView(self.dir) as view:
                return view.disk_rename(disk, new)

        out = self._without_worker(disk, rename, "disconnect them first (its export name "
                                   "changes)")
        return {**out, "worker": self._on_main(lambda: self._start_disk(new))}

    def _without_worker(self, disk: str, change: Callable[[], dict[str, Any]],
                        hint: str) -> dict[str, Any]:
        """Stop the disk's worker, make the change, or start the worker again if
        the change is refused. Refused first, with the worker untouched, while
        clients are attached or the disk has a job (stopping the worker would
        cancel it)."""
        from vdisk_block.datastore import DatastoreView

        with DatastoreView(self.dir) as view:
            job = next((j for j in view.query_jobs(disk)["jobs"]
                        if j["state"] not in ("done", "cancelled", "failed")), None)
        if job is not None:
            raise SupervisorError(f"disk {disk!r} has a job: {job['kind']} job {job['id']} "
                                  f"({job['state']})")
        w = self.workers.get(disk)
        if w is not None and w.state in ("running", "broken"):
            clients = _clients(w)
            if clients:
                raise SupervisorError(f"disk {disk!r} has {clients} client(s) attached; {hint}")
        self._on_main(lambda: self._stop_disk(disk))
        try:
            return change()
        except BaseException:
            self._on_main(lambda: self._start_disk(disk))
            raise

    def flush(self, disk: str | None = None) -> dict[str, Any]:
        from .control import ControlClient

        flushed = 0
        for w in list(self.workers.values()):
            if (disk is None or w.disk == disk) and w.state == "running":
                with ControlClient.connect(w.control) as client:
                    flushed += int(client.execute("flush", {})["flushed"])
        return {"flushed": flushed}


def _clients(w: Worker) -> int:
    from .control import ControlClient

    try:
        with ControlClient.connect(w.control, timeout=5.0) as client:
            return int(client.execute("query-disk", {})["clients"])
    except (Error, OSError):
        return 0


def _commands() -> dict[str, Any]:
    from vdisk_block.commands import Arg, Command

    s = Arg(str)
    return {
        "query-disks": Command(Supervisor.query_disks, {"disk": s}),
        "query-jobs": Command(Supervisor.query_jobs, {"disk": s, "id": Arg(int)}),
        "server-status": Command(Supervisor.server_status, {}),
        "disk-added": Command(Supervisor.disk_added, {"disk": Arg(str, True)}),
        "disk-remove": Command(Supervisor.disk_remove, {"disk": Arg(str, True),
                                                        "keep_images": Arg(bool)}),
        "disk-rename": Command(Supervisor.disk_rename, {"disk": Arg(str, True),
                                                        "new": Arg(str, True)}),
        "flush": Command(Supervisor.flush, {"disk": s}),
    }


_COMMANDS = _commands()
__all__ = ["EndpointError", "Options", "Supervisor", "SupervisorError"]
