# Serve a qcow2 chain (top image and its backing files) over NBD:
#
#   nbdkit [-r] (-U SOCK | -p PORT -i 127.0.0.1) python plugin/vdisk_nbdkit.py image=TOP.qcow2
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
from vdisk_block.nbdkit_args import process_argv, readonly_from_argv  # noqa: E402

API_VERSION = 2
sys.tracebacklimit = 0       # errors reach the log as one line: "Type: image: reason"

_config: dict[str, str] = {}
_disk = None
_KEYS = {
    "image": "path of the top image of the chain to serve",
    "threads": "thread model: serialize (default) or parallel",
}
_THREAD_MODELS = {
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
    "serialize": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
}
MAX_REQUEST = 32 << 20


def _errors(fn):
    """Report our exceptions to the client with their errno, never as a crash."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except ImageError as e:
            nbdkit.set_error(e.errno)
            raise
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
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
    global _disk
    if "image" not in _config:
        raise ValueError("image=PATH is required")
    _disk = open_disk(_config["image"], readonly=readonly_from_argv(process_argv()))


def cleanup():
    if _disk is not None:
        _disk.close()


def open(readonly):
    return {"readonly": readonly or _disk.readonly}


def get_size(h):
    return _disk.size


def block_size(h):
    return (1, min(max(_disk.cluster_size, 4096), MAX_REQUEST), MAX_REQUEST)


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


@_errors
def pread(h, buf, offset, flags):
    _disk.pread_into(buf, offset)


@_errors
def pwrite(h, buf, offset, flags):
    _disk.write(buf, offset)


@_errors
def zero(h, count, offset, flags):
    _disk.zero(count, offset, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
               fast=bool(flags & nbdkit.FLAG_FAST_ZERO))


@_errors
def trim(h, count, offset, flags):
    _disk.trim(count, offset)


@_errors
def flush(h, flags):
    _disk.flush()


@_errors
def extents(h, count, offset, flags):
    return _disk.extents(count, offset)
