# The floor of nbdkit's Python plugin path, for bench/nbd_bench.py: a plugin that
# serves a raw file with nothing but one os.preadv per read, in vdisk's default
# thread model. What it reaches, no Python plugin can beat on this machine.
#
#   nbdkit -r -U SOCK python bench/floor_plugin.py file=RAW
import os

import nbdkit

API_VERSION = 2
_file = None


def config(key, value):
    global _file
    if key != "file":
        raise ValueError(f"unknown parameter {key!r}")
    _file = value


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return os.open(_file, os.O_RDONLY | os.O_CLOEXEC)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def pread(h, buf, offset, flags):
    os.preadv(h, [buf], offset)
