# Serve a qcow2 chain (top image and its backing files) over NBD:
#
#   nbdkit [-r] (-U SOCK | -p PORT -i 127.0.0.1) python plugin/vdisk_nbdkit.py image=TOP.qcow2
#
# or one disk of a datastore (a worker of `vdisk serve`), as the export of its
# name, with the disk's control socket of docs/control.md:
#
#   nbdkit -U SOCK python plugin/vdisk_nbdkit.py datastore=DIR disk=NAME [control=CTL.sock]
#
# A thin adapter: every decision lives in the vdisk_block package beside this
# file. Note that nbdkit requires a top-level `open`, which shadows the builtin
# in this module.
from __future__ import annotations

import errno
import functools
import os
import sys
import threading
import time

import nbdkit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vdisk_block import ImageError, open_disk  # noqa: E402
from vdisk_block.control import ControlServer  # noqa: E402
from vdisk_block.diskservice import DiskService  # noqa: E402
from vdisk_block.errors import RequestError  # noqa: E402
from vdisk_block.nbdkit_args import process_argv, readonly_from_argv  # noqa: E402

API_VERSION = 2
sys.tracebacklimit = 0       # errors reach the log as one line: "Type: image: reason"

_config: dict[str, str] = {}
_disk = None                  # image= mode: the one disk
_service = None               # datastore= mode: the disk's service (its owner)
_control = None
_KEYS = {
    "image": "path of the top image of the chain to serve",
    "datastore": "the vdisk datastore of disk=",
    "disk": "with datastore=: the disk to serve, as the export of its name",
    "control": "with datastore=: path of the disk's control socket to listen on",
    "supervisor": "with datastore=: the pid of the vdisk serve that runs this worker; "
                  "when it is gone, the worker flushes the disk and exits",
    "threads": "thread model: serialize (default) or parallel",
}
_THREAD_MODELS = {
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
    "serialize": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
}
MAX_REQUEST = 32 << 20


def _set_error(e):
    """Report one of our exceptions to the client with its errno."""
    if isinstance(e, ImageError):
        nbdkit.set_error(e.errno)
    else:
        nbdkit.set_error(e.errno or errno.EIO)


def _errors(fn):
    """Report our exceptions to the client with their errno, never as a crash."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except (ImageError, OSError) as e:
            _set_error(e)
            raise
    return wrapper


def thread_model():
    # measured in docs/benchmarks.md; the engine takes its own lock either way
    return _THREAD_MODELS[_config.get("threads", "serialize")]


def config(key, value):
    if key not in _KEYS:
        raise ValueError(f"unknown parameter {key!r}; known: {', '.join(sorted(_KEYS))}")
    if key in _config:
        raise ValueError(f"parameter {key!r} given twice")
    if key == "supervisor" and not value.isdigit():
        raise ValueError(f"supervisor={value!r}: expected a pid")
    if key == "threads" and value not in _THREAD_MODELS:
        raise ValueError(f"threads={value!r}: expected one of {', '.join(_THREAD_MODELS)}")
    _config[key] = value


def config_complete():
    global _disk, _service
    readonly = readonly_from_argv(process_argv())
    if ("image" in _config) == ("datastore" in _config):
        raise ValueError("give exactly one of image=PATH or datastore=DIR disk=NAME")
    if ("datastore" in _config) != ("disk" in _config):
        raise ValueError("datastore=DIR goes with disk=NAME (one worker serves one disk)")
    if "control" in _config and "datastore" not in _config:
        raise ValueError("control= needs datastore=")
    parallel = _config.get("threads") == "parallel"
    if "image" in _config:
        _disk = open_disk(_config["image"], readonly=readonly)
        _disk.concurrent_reads = parallel
        return
    # the disk's owner from here on: settles what a dead owner left, and a disk
    # an offline command owns, or whose chain cannot open, fails the start
    _service = DiskService(os.path.abspath(_config["datastore"]), _config["disk"],
                           readonly=readonly, concurrent_reads=parallel,
                           what="nbdkit serving it")
    try:
        _service.disk()
    except (ImageError, OSError) as e:
        # a chain that cannot open: every connection is refused with the reason,
        # and opening is tried again at each (the chain may be mended meanwhile)
        print(f"nbdkit: vdisk: disk {_service.name!r} cannot be served: {e}",
              file=sys.stderr, flush=True)
    except BaseException:
        _service.close()
        raise


def after_fork():
    # threads must start in the process that serves (nbdkit may have forked)
    global _control
    if _service is not None and "control" in _config:
        _control = ControlServer(os.path.abspath(_config["control"]), _service)
    if _service is not None and "supervisor" in _config:
        threading.Thread(target=_watch_supervisor, args=(int(_config["supervisor"]),),
                         name="vdisk-supervisor-watch", daemon=True).start()


def _watch_supervisor(pid):
    """The worker's life is its supervisor's: nbdkit stops on the SIGTERM that
    --exit-with-parent sends only once its clients leave, and would keep the
    disk (its lock, its endpoint) from the next `vdisk serve`. When the
    supervisor is gone, what the disk acknowledged is flushed and the worker
    exits at once; clients reconnect to the next server's worker."""
    while os.getppid() == pid:
        time.sleep(0.5)
    try:
        _service.flush()
    finally:
        os._exit(0)


def cleanup():
    if _control is not None:
        _control.close()
    if _service is not None:
        _service.close()
    if _disk is not None:
        _disk.close()


def list_exports(readonly, is_tls):
    if _service is None:
        return [""]
    return [(_service.name, f"vdisk disk {_service.name}")]


def default_export(readonly, is_tls):
    return "" if _service is None else _service.name


@_errors
def _open_export(readonly):
    if _service is None:
        return _disk
    name = nbdkit.export_name()
    if name not in ("", _service.name):
        raise RequestError(_service.dir, f"this server serves disk {_service.name!r}, "
                           f"not {name!r}", errno=errno.ENOENT)
    return _service.disk()


def open(readonly):
    disk = _open_export(readonly)
    if _service is not None:
        _service.clients += 1
    return {"disk": disk, "readonly": readonly or disk.readonly, "wrote": False}


def close(h):
    if _service is not None:
        _service.clients -= 1
        _service.writers -= h["wrote"]


def _wrote(h):
    """The connection changes the disk: counted once, until it closes."""
    h["wrote"] = True
    if _service is not None:
        _service.writers += 1


def get_size(h):
    return h["disk"].size


def block_size(h):
    return (1, min(max(h["disk"].cluster_size, 4096), MAX_REQUEST), MAX_REQUEST)


def can_write(h):
    return not h["readonly"]


def can_flush(h):
    return True


def can_trim(h):
    return not h["readonly"]


def can_zero(h):
    return not h["readonly"]


def can_fast_zero(h):
    return not h["readonly"]


def can_fua(h):
    return nbdkit.FUA_EMULATE


def can_multi_conn(h):
    # every connection shares one Disk: a flush on any of them flushes all
    return True


def can_extents(h):
    return True


def is_rotational(h):
    return False


def pread(h, buf, offset, flags):
    # not wrapped in _errors: one Python frame less on the hottest path
    try:
        h["disk"].pread_into(buf, offset)
    except (ImageError, OSError) as e:
        _set_error(e)
        raise


@_errors
def pwrite(h, buf, offset, flags):
    if not h["wrote"]:
        _wrote(h)
    h["disk"].write(buf, offset)


@_errors
def zero(h, count, offset, flags):
    if not h["wrote"]:
        _wrote(h)
    h["disk"].zero(count, offset, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
               fast=bool(flags & nbdkit.FLAG_FAST_ZERO))


@_errors
def trim(h, count, offset, flags):
    if not h["wrote"]:
        _wrote(h)
    h["disk"].trim(count, offset)


@_errors
def flush(h, flags):
    h["disk"].flush()


@_errors
def extents(h, count, offset, flags):
    return h["disk"].extents(count, offset)
