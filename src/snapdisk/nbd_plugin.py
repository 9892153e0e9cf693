"""nbdkit plugin: every snapdisk volume of one store as an NBD export.  Callbacks only.

    nbdkit --unix STORE/nbd.sock python /path/to/snapdisk/nbd_plugin.py store=STORE \\
        listen=unix:STORE/nbd.sock [log=FILE] [tcp=tcp:HOST:PORT [tls-psk=FILE]]
        [clock=FILE]   (tests: the policy scheduler's time from FILE, see scheduler.py)

(snapdisk.daemon builds this command line; nbdkit's embedded Python needs snapdisk and the
venv's packages on PYTHONPATH.)  Exports (snapdisk.exportspec):

    VOLUME            the live volume, read-write
    VOLUME@SNAPSHOT   a snapshot (by name, or by id), read-only
    ""                the only volume, when the store has exactly one

The server process is a snapdisk.service.Service (the Engine, the NBD connection registry, the
control server, the TCP forwarder), built in after_fork: nbdkit forks into the background after
loading this module and before serving, so nothing of it may start at import or in config.
Each callback is one delegation into the Service or the Engine; exceptions become an errno in
one place (`_failure`) and are logged once, by nbdkit.  Parameters: `store` (required); `log`:
a file that stderr is sent to after the fork (nbdkit would send it to /dev/null); `listen`: the
unix socket, as nbdkit's --unix; `tcp` and `tls-psk`: what the Service's TCP listener serves
with (no tls-psk: plain text, only when asked for by name).

Threads: nbdkit's SERIALIZE_REQUESTS (one request at a time on each connection, connections
side by side), the only model: PARALLEL was slower for a Python plugin (a GIL hand-over per
request) and nbdkit 1.32.5 can abort under it when a client disconnects with pipelined writes in
flight, so `threads=parallel` is refused (docs/design.md, "Concurrency", has the measurements).

Each connection thread keeps its Python thread state from open() to close() (see "the
connection thread's Python thread state" below): without that, nbdkit's embedding made and
destroyed one per callback, most of a request's CPU.

The hot path (pread, pwrite) is written flat, with the Engine's callables bound per connection at
open().  A live export's pread is one C call (xm_conn_read: it counts the request in flight and
checks the revocation, the registry's enter/leave in C), so no Python bookkeeping is left per
read (issue 9 item 4): in process 2.5 us a 4 KiB read (os.preadv alone: 1.2 us), of which
~0.95 us the C core's map lookup and 0.1 us cffi's from_buffer (docs/design.md, "The read hot
path").  Its pwrite is one C call too (xm_conn_write: in place, else redirect-on-write); only
a write that call declines, with nothing written, takes the Python path.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import nbdkit  # provided by nbdkit's python plugin at run time
from snapdisk._xm import ffi, lib

from snapdisk import errors, startup_error
from snapdisk.connections import Connection
from snapdisk.daemon import THREAD_MODELS, UNSAFE_THREAD_MODELS
from snapdisk.native import check
from snapdisk.service import Service, open_log

API_VERSION = 2
PARAMS = ("store", "log", "listen", "tcp", "tls-psk", "threads", "clock")

_params: dict[str, str] = {}
_svc: Service | None = None
_enter: Callable[[Connection], None]  # the registry's, bound in after_fork
_leave: Callable[[Connection], None]

BLOCK_SIZE = (512, 4096, 32 << 20)  # minimum, preferred, maximum request (bytes)
_FUA = nbdkit.FLAG_FUA
_HOLE = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO

F = TypeVar("F", bound=Callable[..., Any])


class PluginError(Exception):
    """What nbdkit logs: one line naming the callback and the snapdisk error."""


def _failure(where: str, exc: BaseException) -> PluginError:
    """The one place an exception becomes an errno for the client (nbdkit turns the errno into
    an NBD error: EROFS and EPERM reach the client as EPERM, ENOSPC and EDQUOT as ENOSPC,
    ESHUTDOWN as ESHUTDOWN, EINVAL and anything it has no code for as EINVAL)."""
    if isinstance(exc, errors.SnapdiskError):
        nbdkit.set_error(exc.errno)
        message = f"{type(exc).__name__}: {exc.message}"
        if isinstance(exc, errors.StaleConnection) and hasattr(nbdkit, "disconnect"):
            nbdkit.disconnect(True)  # nbdkit >= 1.34: drop the client now
    else:  # a bug or an OS error: EIO, with the traceback (logged once, by nbdkit)
        nbdkit.set_error(errno.EIO)
        message = "".join(traceback.format_exception(exc)).rstrip()
    return PluginError(f"{where}: {message}")


def _guarded(fn: F) -> F:
    """Non-I/O callbacks: errors through _failure."""
    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            raise _failure(fn.__name__, e) from None
    return call  # type: ignore[return-value]


def _io(fn: F) -> F:
    """I/O callbacks: counted in flight for the connection registry (a revoked handle fails
    here), errors through _failure."""
    @functools.wraps(fn)
    def call(h: Connection, *args: Any) -> Any:
        try:
            _enter(h)
            try:
                return fn(h, *args)
            finally:
                _leave(h)
        except Exception as e:
            raise _failure(fn.__name__, e) from None
    return call  # type: ignore[return-value]


def _service() -> Service:
    if _svc is None:
        raise errors.ServerError("the store is not open (after_fork did not run or failed)")
    return _svc


# ---- life cycle ---------------------------------------------------------------------------

@_guarded
def config(key: str, value: str) -> None:
    if key not in PARAMS:
        raise errors.InvalidArgument(f"unknown parameter {key!r} (takes "
                                     f"{', '.join(p + '=' for p in PARAMS)})")
    if key == "threads" and value in UNSAFE_THREAD_MODELS:
        raise errors.Unsupported(f"threads={value}: {UNSAFE_THREAD_MODELS[value]}")
    if key == "threads" and value not in THREAD_MODELS:
        raise errors.InvalidArgument(f"threads={value!r}: one of {', '.join(THREAD_MODELS)}")
    _params[key] = os.path.abspath(value) if key in ("store", "log", "tls-psk", "clock") else value


@_guarded
def config_complete() -> None:
    # Checked before the fork, so that `snapdisk serve` can report it from nbdkit's exit status.
    if "store" not in _params:
        raise errors.InvalidArgument("store=DIR is required")
    from snapdisk.daemon import check_store
    check_store(_params["store"])


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS)


@_guarded
def after_fork() -> None:
    global _svc, _enter, _leave
    if "log" in _params:
        open_log(_params["log"])
    store = _params["store"]
    sock = _params.get("listen", "").removeprefix("unix:") or os.path.join(store, "nbd.sock")
    try:
        svc = Service(store, socket_path=sock, tcp=_params.get("tcp"),
                      tls_psk=_params.get("tls-psk"), on_stop=nbdkit.shutdown,
                      clock=_params.get("clock"))
        _enter, _leave = svc.connections.enter, svc.connections.leave
        _svc = svc
        svc.start()
    except errors.SnapdiskError as e:
        startup_error.write(store, e)  # for `snapdisk serve`: the error's own code and exit
        raise


def cleanup() -> None:
    # nbdkit calls this once every connection is closed.
    global _svc
    if _svc is not None:
        _svc.close()
        _svc = None


# ---- exports ------------------------------------------------------------------------------

@_guarded
def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    return _service().list_exports()


@_guarded
def default_export(readonly: bool, is_tls: bool) -> str:
    return _service().default_export()


@_guarded
def open(readonly: bool) -> Connection:
    svc = _service()
    h = svc.open_export(nbdkit.export_name(), readonly)  # the canonical name
    if h.epoch is None:  # a live export's I/O: one C call, counted there (issue 9 item 4)
        e = svc.require_engine()
        h.bind_counted(e.native.ptr, e.io.c_redirect)
    h.pinned = _pin_thread_state()
    return h


def close(h: Connection) -> None:
    _unpin_thread_state(h.pinned)
    if _svc is not None:
        _svc.close_export(h)


# ---- the connection thread's Python thread state -------------------------------------------
#
# nbdkit's Python plugin wraps every callback in PyGILState_Ensure/Release, and nbdkit's
# connection threads are not Python's: with no thread state of its own, each Ensure creates one
# and each Release destroys it (PyThreadState_New, its frame stack mmapped and munmapped: page
# faults and a TLB shootdown).  Measured (docs/design.md, "The read hot path"): about 13 us of
# server CPU per request, two thirds of a 4 KiB read's.  So open(), which nbdkit calls on the
# connection's own thread (under SERIALIZE_REQUESTS every request of the connection runs there
# too: nbdkit starts worker threads only for PARALLEL), takes one more Ensure and keeps it:
# Python's GILState count then never drops to zero between callbacks, and the thread state
# lives until close() releases it.  The GIL itself is still released after every callback
# (nbdkit's Release restores the UNLOCKED state it found).  PyGILState_Release on a thread
# that did not Ensure is fatal, so close() releases only on the thread that pinned; elsewhere
# (not seen with nbdkit 1.32) it leaves the thread state to be freed when Python finalizes.

_ensure: Any = None
_release: Any = None
try:
    _ensure = ctypes.pythonapi.PyGILState_Ensure
    _ensure.restype = ctypes.c_int
    _release = ctypes.pythonapi.PyGILState_Release
    _release.argtypes = (ctypes.c_int,)
    _release.restype = None
except (AttributeError, OSError):  # a Python without its C API in reach: no pinning
    _ensure = _release = None


def _pin_thread_state() -> tuple[int, int] | None:
    """(this thread, the Ensure state to release) or None."""
    if _ensure is None:
        return None
    return threading.get_ident(), int(_ensure())


def _unpin_thread_state(pinned: tuple[int, int] | None) -> None:
    if pinned is not None and _release is not None and pinned[0] == threading.get_ident():
        _release(pinned[1])


@_guarded
def export_description(h: Connection) -> str:
    return "snapdisk snapshot (read-only)" if h.epoch is not None else "snapdisk volume"


def get_size(h: Connection) -> int:
    return h.size_bytes


def block_size(h: Connection) -> tuple[int, int, int]:
    return BLOCK_SIZE


def is_rotational(h: Connection) -> bool:
    return False


def can_write(h: Connection) -> bool:
    return not h.readonly


can_trim = can_zero = can_write
# Zeroing unmaps whole blocks (a map change) and writes at most two partial edge blocks: never
# slower than the write it replaces.
can_fast_zero = can_write


def can_flush(h: Connection) -> bool:
    return h.epoch is None


def can_fua(h: Connection) -> int:
    return int(nbdkit.FUA_NATIVE if not h.readonly else nbdkit.FUA_NONE)


def can_extents(h: Connection) -> bool:
    return True


def can_cache(h: Connection) -> int:
    return int(nbdkit.CACHE_NONE)


def can_multi_conn(h: Connection) -> bool:
    # NBD's multi-conn promise: a FLUSH on any connection makes durable every write completed
    # on all of them, and every connection reads what any other completed.  True here because
    # all connections to the export share this process's one Engine (one LMDB environment, one
    # pool file, no per-connection cache), and flush syncs the whole store (fdatasync(pool),
    # then the LMDB environment), not one connection's writes.  Snapshot exports never change.
    return True


# ---- I/O: one delegation each -------------------------------------------------------------
#
# pread and pwrite are the hot path: written out flat (no decorator, the engine's callables
# bound at open, the registry's enter/leave module globals) because every Python call is
# ~0.1 us of a per-request budget of a few us.  A live export's pread and pwrite call
# xm_conn_read / xm_conn_write themselves (no bound callable: one Python frame less), and
# from_buffer's positional form
# (the keyword require_writable=True alone cost ~0.15 us of argument parsing); nbdkit's buffer
# is a writable memoryview over its own request buffer, so C reads straight into it: no copy.

_conn_read = lib.xm_conn_read
_conn_write = lib.xm_conn_write
_ESLOW = lib.XM_ESLOW
_from_buffer = ffi.from_buffer
_U8 = "uint8_t[]"


def pread(h: Connection, buf: Any, offset: int, flags: int) -> None:
    try:
        if h.counted:  # xm_conn_read counts it in flight and checks the revocation
            rc = _conn_read(h.cstore, h.cconn, h.vol, offset, len(buf), _from_buffer(_U8, buf, True))
            if rc:
                check(rc, f"export {h.export!r}")
            return
        _enter(h)
        try:
            h.read(offset, buf)  # type: ignore[misc]
        finally:
            _leave(h)
    except Exception as e:
        raise _failure("pread", e) from None


def pwrite(h: Connection, buf: Any, offset: int, flags: int) -> None:
    try:
        if h.counted:  # xm_conn_write: in place, else redirected, counted like a read
            rc = _conn_write(h.cstore, h.cconn, h.vol, offset, len(buf), _from_buffer(_U8, buf), h.row)
            if not rc:
                if flags & _FUA:
                    _service().require_engine().flush()
                return
            if rc != _ESLOW:
                check(rc, f"export {h.export!r}")
            # Declined with nothing written (a huge request, a full pool, ...): the general
            # path below, which redoes the in-place attempt first (cheap; rare here).
        _enter(h)
        try:
            if h.write is None:
                _writable(h)
            h.write(offset, buf, flags & _FUA)  # type: ignore[misc]
        finally:
            _leave(h)
    except Exception as e:
        raise _failure("pwrite", e) from None


def _writable(h: Connection) -> int:
    if h.epoch is not None:
        raise errors.ReadOnly(f"export {h.export!r} is a snapshot: read-only")
    return h.vol


@_io
def flush(h: Connection, flags: int) -> None:
    _service().require_engine().flush()


@_io
def trim(h: Connection, count: int, offset: int, flags: int) -> None:
    _service().require_engine().trim(_writable(h), offset, count, fua=bool(flags & _FUA))


@_io
def zero(h: Connection, count: int, offset: int, flags: int) -> None:
    # FLAG_MAY_TRIM is moot (zeroed whole blocks are always unmapped) and FLAG_FAST_ZERO is
    # always met (see can_fast_zero).
    _service().require_engine().zero(_writable(h), offset, count, fua=bool(flags & _FUA))


@_io
def extents(h: Connection, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    # Runs come block-aligned outwards; nbdkit clips them to [offset, offset+count).
    e = _service().require_engine()
    runs = (e.block_status(h.vol, offset, count) if h.epoch is None
            else e.snapshot_block_status(h.vol, h.epoch, offset, count))
    if flags & nbdkit.FLAG_REQ_ONE:
        runs = runs[:1]
    return [(o, n, 0 if allocated else _HOLE) for o, n, allocated in runs]
