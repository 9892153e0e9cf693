"""One error hierarchy for the whole of snapdisk.

Each class carries the errno it becomes at the NBD boundary (nbd_plugin) and the exit code it
becomes at the CLI, and a stable `code` string used by the control protocol.  The docstring of
each class is what a user is told it means (docs/cli.md lists the exit codes).
"""

from __future__ import annotations

import errno as _errno


class SnapdiskError(Exception):
    """Something went wrong in snapdisk."""

    errno: int = _errno.EIO
    exit_code: int = 1
    code: str = "error"

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or self.code).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


def _error(name: str, doc: str, code: str, errno: int, exit_code: int,
           base: type[SnapdiskError] = SnapdiskError) -> type[SnapdiskError]:
    return type(name, (base,), {"__doc__": doc, "code": code, "errno": errno,
                                "exit_code": exit_code})


# Declared as a table, the way py-lmdb declares its errors: name, meaning, code, errno, exit code.
InvalidArgument = _error("InvalidArgument", "Invalid argument.", "invalid-argument",
                         _errno.EINVAL, 2)
InvalidName = _error("InvalidName", "Invalid name.", "invalid-name", _errno.EINVAL, 2,
                     InvalidArgument)
InvalidSize = _error("InvalidSize", "Invalid size.", "invalid-size", _errno.EINVAL, 2,
                     InvalidArgument)
OutOfRange = _error("OutOfRange", "I/O past the end of the volume.", "out-of-range",
                    _errno.EINVAL, 2, InvalidArgument)
NotFound = _error("NotFound", "No such object.", "not-found", _errno.ENOENT, 3)
VolumeNotFound = _error("VolumeNotFound", "No such volume.", "volume-not-found",
                        _errno.ENOENT, 3, NotFound)
SnapshotNotFound = _error("SnapshotNotFound", "No such snapshot.", "snapshot-not-found",
                          _errno.ENOENT, 3, NotFound)
AlreadyExists = _error("AlreadyExists", "The name is already taken.", "already-exists",
                       _errno.EEXIST, 4)
PoolFull = _error("PoolFull", "The data pool is full.", "pool-full", _errno.ENOSPC, 5)
QuotaExceeded = _error("QuotaExceeded", "Snapshot quota reached.", "quota-exceeded",
                       _errno.EDQUOT, 5)
ReadOnly = _error("ReadOnly", "Read-only: snapshots cannot be written.", "read-only",
                  _errno.EROFS, 6)
Busy = _error("Busy", "The object is in use.", "busy", _errno.EBUSY, 7)
StoreLocked = _error("StoreLocked", "Another process holds the store.", "store-locked",
                     _errno.EBUSY, 7, Busy)
StoreNotFound = _error("StoreNotFound", "No snapdisk store in that directory.",
                       "store-not-found", _errno.ENOENT, 8)
FormatError = _error("FormatError", "The store's on-disk format is not one this version reads.",
                     "format", _errno.EIO, 9)
Corrupt = _error("Corrupt", "The store failed an integrity check.", "corrupt", _errno.EIO, 10)
ServerError = _error("ServerError", "The snapdisk server failed.", "server", _errno.EIO, 11)
NotRunning = _error("NotRunning", "No snapdisk server is running for this store.", "not-running",
                    _errno.ENOTCONN, 12)
Unsupported = _error("Unsupported", "Not supported.", "unsupported", _errno.EOPNOTSUPP, 13)
KeyError_ = _error("KeyError_", "Wrong key or passphrase.", "bad-key", _errno.EACCES, 14)

_CLASSES: list[type[SnapdiskError]] = [
    SnapdiskError, InvalidArgument, InvalidName, InvalidSize, OutOfRange, NotFound,
    VolumeNotFound, SnapshotNotFound, AlreadyExists, PoolFull, QuotaExceeded, ReadOnly, Busy,
    StoreLocked, StoreNotFound, FormatError, Corrupt, ServerError, NotRunning, Unsupported,
    KeyError_]
ALL: dict[str, type[SnapdiskError]] = {cls.code: cls for cls in _CLASSES}


def from_code(code: str, message: str) -> SnapdiskError:
    """The exception a control-protocol error reply stands for."""
    return ALL.get(code, SnapdiskError)(message)
