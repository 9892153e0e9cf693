"""The thinnest nbdkit Python plugin there is: every request goes straight to a file.

    nbdkit --unix SOCK -f python benchmarks/passthrough_plugin.py file=FILE
           [mode=serialized|requests|parallel]

It does no work of its own (no map, no copy, no lock), so what it measures is the cost of the
Python plugin layer: nbdkit's embedded interpreter, the GIL, one callback per request.  Any
plugin written in Python, snapdisk's included, is at best this fast.

mode=serialized (the default) makes nbdkit run one request at a time
(THREAD_MODEL_SERIALIZE_ALL_REQUESTS, the Python plugin's own default); mode=parallel lets
nbdkit's worker threads call in concurrently (THREAD_MODEL_PARALLEL): the GIL still runs one
callback's Python at a time, but it is released around each preadv/pwritev.  mode=requests
(THREAD_MODEL_SERIALIZE_REQUESTS, snapdisk's model) runs one request at a time per connection,
connections in parallel: the ceiling for snapdisk with several connections.
"""

import errno
import os

import nbdkit

API_VERSION = 2

_path = None
_mode = "serialized"
_MODES = {
    "serialized": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}


def config(key, value):
    global _path, _mode
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "mode":
        if value not in _MODES:
            raise RuntimeError(f"mode must be one of {sorted(_MODES)}, not {value!r}")
        _mode = value
    else:
        raise RuntimeError(f"unknown parameter {key!r} (file=FILE, mode=serialized|requests|parallel)")


def config_complete():
    if _path is None:
        raise RuntimeError("file=FILE is required")


def thread_model():
    return _MODES[_mode]


def open(readonly):
    flags = os.O_RDONLY if readonly else os.O_RDWR
    return {"fd": os.open(_path, flags)}


def close(h):
    os.close(h["fd"])


def get_size(h):
    return os.fstat(h["fd"]).st_size


def can_multi_conn(h):
    return True  # one file, one page cache: every connection sees every other's writes


def can_fua(h):
    return nbdkit.FUA_NATIVE  # pwrite syncs itself when asked


def pread(h, buf, offset, flags):
    fd = h["fd"]
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            nbdkit.set_error(errno.EIO)
            raise OSError(errno.EIO, f"short read at {offset + done}")
        done += n


def pwrite(h, buf, offset, flags):
    fd = h["fd"]
    view = memoryview(buf)
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def flush(h, flags):
    os.fdatasync(h["fd"])
