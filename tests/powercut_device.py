"""nbdkit Python plugin for tests/powercut.py: a disk that records every request.

    nbdkit -f -U SOCK python tests/powercut_device.py image=DISK.img log=REC.log size=BYTES

It serves DISK.img as it would be with every write applied (what the filesystem above reads
back, like a disk's cache), and appends every write, zero, trim and FLUSH to REC.log with its
FUA flag and the CLOCK_MONOTONIC time at which it was taken up.  The plugin models no loss
itself: the harness replays the log afterwards and decides, per cut, which of the writes after
the last FLUSH reached the medium (see powercut.py and docs/powercut.md).

Requests are serialized across connections (THREAD_MODEL_SERIALIZE_ALL_REQUESTS), so the log
order is the order in which the device completed them, and a FLUSH covers every write logged
before it: NBD requires no more ("all write requests that the server has completed (replied
to) prior to processing this command", NBD protocol, NBD_CMD_FLUSH).

Record: REC header (kind, flags, offset, length, time), then `length` bytes for a write.
"""

from __future__ import annotations

import os
import struct
import time

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plugin

API_VERSION = 2
REC = struct.Struct("<BBxxxxxxQQd")
WRITE, FLUSH, ZERO = 1, 2, 3
FUA = 1

_cfg: dict[str, str] = {}
_fds: dict[str, int] = {}


def config(key: str, value: str) -> None:
    _cfg[key] = value


def config_complete() -> None:
    for key in ("image", "log", "size"):
        if key not in _cfg:
            raise RuntimeError(f"powercut_device: {key}= is required")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)


def open(readonly: bool) -> int:  # noqa: A001 - the name nbdkit calls
    if not _fds:
        _fds["image"] = os.open(_cfg["image"], os.O_RDWR)
        _fds["log"] = os.open(_cfg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return 1


def get_size(h: int) -> int:
    return int(_cfg["size"])


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_fua(h: int) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_multi_conn(h: int) -> bool:
    return False


def _log(kind: int, flags: int, offset: int, length: int, data: bytes = b"") -> None:
    fua = FUA if flags & nbdkit.FLAG_FUA else 0
    # one write(2) per record: a killed nbdkit leaves whole records (O_APPEND)
    os.write(_fds["log"], REC.pack(kind, fua, offset, length, time.monotonic()) + data)


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    data = os.pread(_fds["image"], len(buf), offset)
    buf[:len(data)] = data
    buf[len(data):] = bytes(len(buf) - len(data))


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    _log(WRITE, flags, offset, len(buf), bytes(buf))
    os.pwrite(_fds["image"], buf, offset)


def _zero(count: int, offset: int, flags: int) -> None:
    _log(ZERO, flags, offset, count)
    pos = 0
    while pos < count:
        n = min(count - pos, 1 << 20)
        os.pwrite(_fds["image"], bytes(n), offset + pos)
        pos += n


def zero(h: int, count: int, offset: int, flags: int) -> None:
    _zero(count, offset, flags)


def trim(h: int, count: int, offset: int, flags: int) -> None:
    # a trimmed range reads back as zeros here (the disk may do so; ext4 never relies on it)
    _zero(count, offset, flags)


def flush(h: int, flags: int) -> None:
    _log(FLUSH, 0, 0, 0)
