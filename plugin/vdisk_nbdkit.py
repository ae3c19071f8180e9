# Serve a qcow2 chain (top image and its backing files) over NBD:
#
#   nbdkit [-r] (-U SOCK | -p PORT -i 127.0.0.1) python plugin/vdisk_nbdkit.py image=TOP.qcow2
#
# or every disk of a datastore, each an export of its name, with the control
# socket of docs/control.md:
#
#   nbdkit -U SOCK python plugin/vdisk_nbdkit.py datastore=DIR [control=CONTROL.sock]
#
# A thin adapter: every decision lives in the vdisk_block package beside this
# file. Note that nbdkit requires a top-level `open`, which shadows the builtin
# in this module.
from __future__ import annotations

import errno
import functools
import os
import sys

import nbdkit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vdisk_block import ImageError, open_disk  # noqa: E402
from vdisk_block.control import ControlServer  # noqa: E402
from vdisk_block.nbdkit_args import process_argv, readonly_from_argv  # noqa: E402
from vdisk_block.owner import own_server  # noqa: E402
from vdisk_block.service import DatastoreService  # noqa: E402

API_VERSION = 2
sys.tracebacklimit = 0       # errors reach the log as one line: "Type: image: reason"

_config: dict[str, str] = {}
_disk = None                  # image= mode: the one disk
_service = None               # datastore= mode: every disk of the datastore
_control = None
_server_lock = None           # datastore= mode: owner.own_server's lock
_KEYS = {
    "image": "path of the top image of the chain to serve",
    "datastore": "serve every disk of this vdisk datastore, one export per disk",
    "control": "with datastore=: path of the control socket to listen on",
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
    if key == "threads" and value not in _THREAD_MODELS:
        raise ValueError(f"threads={value!r}: expected one of {', '.join(_THREAD_MODELS)}")
    _config[key] = value


def config_complete():
    global _disk, _service
    readonly = readonly_from_argv(process_argv())
    if ("image" in _config) == ("datastore" in _config):
        raise ValueError("give exactly one of image=PATH or datastore=DIR")
    if "control" in _config and "datastore" not in _config:
        raise ValueError("control= needs datastore=")
    parallel = _config.get("threads") == "parallel"
    if "image" in _config:
        _disk = open_disk(_config["image"], readonly=readonly)
        _disk.concurrent_reads = parallel
    else:
        global _server_lock
        directory = os.path.abspath(_config["datastore"])
        _server_lock = own_server(directory, "nbdkit serving it")
        _service = DatastoreService(directory, readonly=readonly, concurrent_reads=parallel,
                                    what="nbdkit serving the datastore")
        # own every disk now, settling what a dead server left; a disk that a
        # running offline command owns is served once that command is done
        for name, why in _service.own_all().items():
            nbdkit.debug(f"disk {name!r} not owned yet: {why}")


def after_fork():
    # threads must start in the process that serves (nbdkit may have forked)
    global _control
    if _service is not None and "control" in _config:
        _control = ControlServer(os.path.abspath(_config["control"]), _service)
        _service.catalog.set_meta("control", _control.path)
        _service.catalog.set_meta("server_pid", str(os.getpid()))


def cleanup():
    if _control is not None:
        _control.close()
        _service.catalog.set_meta("control", None)
        _service.catalog.set_meta("server_pid", None)
    if _service is not None:
        _service.close()
    if _disk is not None:
        _disk.close()
    if _server_lock is not None:
        _server_lock.close()


def list_exports(readonly, is_tls):
    if _service is None:
        return [""]
    return [(r["name"], f"vdisk disk {r['name']}") for r in _service.catalog.disks()]


def default_export(readonly, is_tls):
    if _service is None:
        return ""
    disks = _service.catalog.disks()
    return disks[0]["name"] if len(disks) == 1 else ""


@_errors
def _open_export(readonly):
    if _service is None:
        return _disk
    name = nbdkit.export_name()
    if not name:
        raise ValueError("this server has several disks: ask for one by export name")
    return _service.disk(name)


def open(readonly):
    disk = _open_export(readonly)
    return {"disk": disk, "readonly": readonly or disk.readonly}


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
    h["disk"].write(buf, offset)


@_errors
def zero(h, count, offset, flags):
    h["disk"].zero(count, offset, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
               fast=bool(flags & nbdkit.FLAG_FAST_ZERO))


@_errors
def trim(h, count, offset, flags):
    h["disk"].trim(count, offset)


@_errors
def flush(h, flags):
    h["disk"].flush()


@_errors
def extents(h, count, offset, flags):
    return h["disk"].extents(count, offset)
