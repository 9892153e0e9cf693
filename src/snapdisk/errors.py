"""One error hierarchy for the whole of snapdisk.

Every error snapdisk raises is a class here.  Each carries the errno it becomes at the NBD
boundary (the plugin), the exit code it becomes at the CLI, and a stable `code` string used by
the control protocol; those three mappings are made here and nowhere else.  The docstring of
each class is what a user is told it means when no message is given (docs/cli.md lists the
exit codes, docs/control.md the codes).

A lower-level cause (an OSError, an LMDB return code) is chained with `raise ... from exc`; the
CLI prints it only under SNAPDISK_DEBUG=1 (see `debug`).
"""

from __future__ import annotations

import errno as _errno
import os


def debug() -> bool:
    """SNAPDISK_DEBUG=1: show causes and tracebacks, not only the one-line message."""
    return os.environ.get("SNAPDISK_DEBUG", "") not in ("", "0")


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


# ---- bad input (exit 2) ------------------------------------------------------------------

class InvalidArgument(SnapdiskError):
    """Invalid argument."""

    code, errno, exit_code = "invalid-argument", _errno.EINVAL, 2


class InvalidName(InvalidArgument):
    """Invalid name."""

    code = "invalid-name"


class InvalidSize(InvalidArgument):
    """Invalid size."""

    code = "invalid-size"


class OutOfRange(InvalidArgument):
    """I/O past the end of the volume."""

    code = "out-of-range"


class BadRequest(InvalidArgument):
    """The request is not a valid control-protocol message."""

    # Replies carry invalid-argument: clients raise InvalidArgument for it.
    code = "invalid-argument"

    def __init__(self, message: str, req_id: str | int | float | bool | None = None):
        super().__init__(message)
        self.req_id = req_id


class Oversized(BadRequest):
    """A request line is longer than the protocol allows; the connection is closed after."""


# ---- missing things (exit 3, 8, 12) -------------------------------------------------------

class NotFound(SnapdiskError):
    """No such object."""

    code, errno, exit_code = "not-found", _errno.ENOENT, 3


class VolumeNotFound(NotFound):
    """No such volume."""

    code = "volume-not-found"


class SnapshotNotFound(NotFound):
    """No such snapshot."""

    code = "snapshot-not-found"


class StoreNotFound(SnapdiskError):
    """No snapdisk store in that directory."""

    code, errno, exit_code = "store-not-found", _errno.ENOENT, 8


class NotRunning(SnapdiskError):
    """No snapdisk server is running for this store."""

    code, errno, exit_code = "not-running", _errno.ENOTCONN, 12


# ---- conflicts (exit 4, 6, 7) -------------------------------------------------------------

class AlreadyExists(SnapdiskError):
    """The name is already taken."""

    code, errno, exit_code = "already-exists", _errno.EEXIST, 4


class ReadOnly(SnapdiskError):
    """Read-only: snapshots cannot be written."""

    code, errno, exit_code = "read-only", _errno.EROFS, 6


class Busy(SnapdiskError):
    """The object is in use."""

    code, errno, exit_code = "busy", _errno.EBUSY, 7


class StoreLocked(Busy):
    """Another process holds the store."""

    code = "store-locked"


class StaleConnection(SnapdiskError):
    """This NBD connection was revoked (the volume was rolled back with force); reconnect."""

    code, errno = "stale-connection", _errno.ESHUTDOWN


# ---- space (exit 5) -----------------------------------------------------------------------

class PoolFull(SnapdiskError):
    """The data pool is full: delete snapshots or volumes to free space."""

    code, errno, exit_code = "pool-full", _errno.ENOSPC, 5


class MetadataFull(PoolFull):
    """The store's metadata map is full (LMDB MDB_MAP_FULL): delete snapshots or volumes, or
    give the store a larger map (`snapdisk init --map-size`)."""

    code = "metadata-full"


class QuotaExceeded(SnapdiskError):
    """Snapshot quota reached."""

    code, errno, exit_code = "quota-exceeded", _errno.EDQUOT, 5


# ---- the store itself (exit 9, 10) --------------------------------------------------------

class FormatError(SnapdiskError):
    """The store's on-disk format is not one this version reads."""

    code, errno, exit_code = "format", _errno.EIO, 9


class Corrupt(SnapdiskError):
    """The store failed an integrity check."""

    code, errno, exit_code = "corrupt", _errno.EIO, 10


# ---- the server and the system (exit 1, 11, 13, 14, 15, 130) ------------------------------

class ServerError(SnapdiskError):
    """The snapdisk server failed."""

    code, errno, exit_code = "server", _errno.EIO, 11


class NativeError(SnapdiskError):
    """The C core or LMDB failed."""

    def __init__(self, message: str | None = None, rc: int = 0):
        super().__init__(message)
        self.rc = rc


class Unsupported(SnapdiskError):
    """Not supported."""

    code, errno, exit_code = "unsupported", _errno.EOPNOTSUPP, 13


class BadKey(SnapdiskError):
    """Wrong key or passphrase."""

    code, errno, exit_code = "bad-key", _errno.EACCES, 14


class PermissionDenied(SnapdiskError):
    """Permission denied: run as the store's owner (usually root)."""

    code, errno, exit_code = "permission-denied", _errno.EACCES, 15


class Cancelled(SnapdiskError):
    """The operation was cancelled."""

    code, errno, exit_code = "cancelled", _errno.ECANCELED, 130


def _all(cls: type[SnapdiskError]) -> list[type[SnapdiskError]]:
    return [cls] + [d for sub in cls.__subclasses__() for d in _all(sub)]


# code -> class, for the client side of the control protocol.  BadRequest and Oversized share
# InvalidArgument's code on the wire, so the first class declared with a code wins.
ALL: dict[str, type[SnapdiskError]] = {}
for _cls in _all(SnapdiskError):
    ALL.setdefault(_cls.code, _cls)


def from_code(code: str, message: str) -> SnapdiskError:
    """The exception a control-protocol error reply stands for."""
    return ALL.get(code, SnapdiskError)(message)
