"""nbdkit plugin: every snapdisk volume of one store as an NBD export.  A shim.

    nbdkit --unix STORE/nbd.sock python /path/to/snapdisk/nbd_plugin.py store=STORE \\
        [log=FILE] [listen=DESCRIPTION]

(snapdisk.server builds this command line; nbdkit's embedded Python needs snapdisk and the
venv's packages on PYTHONPATH.)  Exports:

    VOLUME            the live volume, read-write
    VOLUME@SNAPSHOT   a snapshot (by name, or by id), read-only
    ""                the only volume, when the store has exactly one

Each callback is one delegation to the Engine (snapdisk.volume); exceptions become an errno in
one place (`_failure`) and are logged once, by nbdkit.  Parameters: `store` (required); `log`: a
file that stderr is sent to after nbdkit forks into the background (nbdkit would otherwise send
it to /dev/null); `listen`: how nbdkit listens, for the status op only.

nbdkit forks (into the background) after loading this module and before serving, so the Engine
(LMDB environment, flock on STORE/lock, the C core's thread pool) and the control server's
threads start in after_fork, never at import or in config.

Threads: `threads=serialized` (the default; nbdkit's SERIALIZE_REQUESTS: one request at a time
on each connection, connections side by side) or `threads=parallel`.  The Engine is thread-safe
either way (live reads and in-place writes are one C call each that releases the GIL; map
changes serialize in LMDB's write transaction), so this is a speed choice, made by measurement
(fio --ioengine=nbd, 4 KiB random at QD16 on a 2-core machine, page-cache-resident pool;
benchmarks/report.md has the current run):
    serialized: randread 30k IOPS (0.87-0.95x the bare Python passthrough plugin), randwrite 0.98x
    parallel:   randread 12k IOPS: nbdkit's 16 worker threads per connection take turns at the
                GIL, and every request then pays a GIL hand-over between threads (a futex
                wake and a context switch); the bare passthrough plugin loses the same way.
Not SERIALIZE_ALL_REQUESTS, though it measures the same for one connection: nbdkit 1.32 holds
its all-requests lock through each client's handshake, so one client stalled in its handshake
would stop every other connection.  What serialized costs: a slow request (a FLUSH's
fdatasync, a read that misses the page cache on a slow disk) holds up the others behind it.
`snapdisk serve --threads parallel` is there for a pool on slow storage with a working set
larger than memory.

The hot path (pread, pwrite) is written flat, with the Engine's callables bound per connection at
open(): in process it costs 3.0 us a 4 KiB read (os.preadv alone: 1.0 us), of which 0.5 us is the
C core's map lookup and 0.3 us cffi's from_buffer.
"""

from __future__ import annotations

import builtins
import errno
import functools
import os
import socket
import stat
import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

import nbdkit  # provided by nbdkit's python plugin at run time

from snapdisk import errors
from snapdisk.control.server import Connection, Connections, ControlServer, StaleConnection
from snapdisk.server import DEFAULT_THREADS, THREAD_MODELS
from snapdisk.volume import Engine

API_VERSION = 2

_params: dict[str, str] = {}
_engine: Engine | None = None
_control: ControlServer | None = None
_connections = Connections(on_revoke=lambda hs: _disconnect(hs))

BLOCK_SIZE = (512, 4096, 32 << 20)  # minimum, preferred, maximum request (bytes)
_FUA = nbdkit.FLAG_FUA
_NBDKIT_THREAD_MODELS = {"parallel": nbdkit.THREAD_MODEL_PARALLEL,
                         "serialized": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS}

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
        if isinstance(exc, StaleConnection) and hasattr(nbdkit, "disconnect"):
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
            _connections.enter(h)
            try:
                return fn(h, *args)
            finally:
                _connections.leave(h)
        except Exception as e:
            raise _failure(fn.__name__, e) from None
    return call  # type: ignore[return-value]


def _eng() -> Engine:
    if _engine is None:
        raise errors.ServerError("the store is not open (after_fork did not run or failed)")
    return _engine


# ---- life cycle ---------------------------------------------------------------------------

@_guarded
def config(key: str, value: str) -> None:
    if key not in ("store", "log", "listen", "threads"):
        raise errors.InvalidArgument(
            f"unknown parameter {key!r} (takes store=, log=, listen=, threads=)")
    if key == "threads" and value not in THREAD_MODELS:
        raise errors.InvalidArgument(f"threads={value!r}: one of {', '.join(THREAD_MODELS)}")
    _params[key] = os.path.abspath(value) if key in ("store", "log") else value


@_guarded
def config_complete() -> None:
    # Checked before the fork, so that `snapdisk serve` can report it from nbdkit's exit status.
    store = _params.get("store")
    if store is None:
        raise errors.InvalidArgument("store=DIR is required")
    if not os.path.exists(os.path.join(store, "meta", "data.mdb")):
        raise errors.StoreNotFound(f"no snapdisk store in {store}")


def thread_model() -> int:
    return int(_NBDKIT_THREAD_MODELS[_params.get("threads", DEFAULT_THREADS)])


@_guarded
def after_fork() -> None:
    global _engine, _control
    if "log" in _params:
        fd = os.open(_params["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 2)  # dup2 leaves fd 2 inheritable, as stderr should be
        os.close(fd)
    store = _params["store"]
    _engine = Engine.open(store)
    info = {"nbd_socket": _params.get("listen", "").removeprefix("unix:") or None,
            "listen": _params.get("listen")}
    _control = ControlServer(_engine, os.path.join(store, "control.sock"),
                             connections=_connections, info=info, on_stop=_stop)
    _control.start()
    sys.stderr.write(f"snapdisk: serving {store} (pid {os.getpid()})\n")
    sys.stderr.flush()


# ---- the NBD clients' sockets --------------------------------------------------------------
#
# nbdkit 1.32 gives a Python plugin no way to end a connection: nbdkit.disconnect() came later,
# and on shutdown (SIGTERM or nbdkit.shutdown()) nbdkit does not end idle connections either (a
# connection thread stays blocked reading the client's next request, so the server would wait
# for every client to leave).  The plugin finds its clients' sockets itself, in /proc/self/fd:
# connected sockets whose local address is the NBD listener's (the listener, the control
# socket and nbdkit's pipes are not), and shuts them down; nbdkit then sees the client gone and
# closes the connection the usual way.  open() records which socket a handle is on when that is
# unambiguous (exactly one client socket not yet claimed: true unless several clients are in
# their handshake at the same moment), so that a forced rollback can disconnect exactly its
# clients; a handle without a known socket still fails every request (ESHUTDOWN).

_claims: dict[int, Connection] = {}  # socket inode -> the handle on that connection
_claims_lock = threading.Lock()


def _client_sockets() -> dict[int, int]:
    """{socket inode: fd} of this process's NBD client connections."""
    kind, _, where = _params.get("listen", "").partition(":")
    port = where.rpartition(":")[2]
    out: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):
            continue
        try:
            addr = sock.getsockname()
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            if (kind == "unix" and addr == where) or (
                    kind == "tcp" and isinstance(addr, tuple) and str(addr[1]) == port):
                out[st.st_ino] = fd
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays nbdkit's
    return out


def _cut(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def _claim_socket(h: Connection) -> None:
    with _claims_lock:
        free = [ino for ino in _client_sockets() if ino not in _claims]
        if len(free) == 1:
            h.socket_inode = free[0]
            _claims[free[0]] = h


def _disconnect(revoked: list[Connection]) -> None:
    """Connections.reserve(force=True) calls this once they are revoked and drained."""
    with _claims_lock:
        socks = _client_sockets()
        for h in revoked:
            if h.socket_inode is not None and _claims.get(h.socket_inode) is h \
                    and h.socket_inode in socks:
                _cut(socks[h.socket_inode])


def _stop() -> None:
    """The control op `stop`: nbdkit's shutdown, then every NBD client's socket shut down."""
    nbdkit.shutdown()
    for fd in _client_sockets().values():
        _cut(fd)


def cleanup() -> None:
    # nbdkit calls this once every connection is closed: stop the control server (it waits for
    # requests in progress), then flush and close the store (LMDB, the flock).
    global _engine, _control
    if _control is not None:
        _control.close()
        _control = None
    if _engine is not None:
        _engine.close()
        _engine = None
        sys.stderr.write("snapdisk: store closed\n")
        sys.stderr.flush()
    # nbdkit removes neither its pid file nor its unix socket.
    store = _params.get("store")
    kind, _, where = _params.get("listen", "").partition(":")
    if kind == "unix":
        with suppress(OSError):
            os.unlink(where)
    if store:
        pidfile = os.path.join(store, "server.pid")
        mine = False
        with suppress(OSError), builtins.open(pidfile) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            with suppress(OSError):
                os.unlink(pidfile)


# ---- exports ------------------------------------------------------------------------------

def _resolve(export: str) -> tuple[int, int | None, int]:
    """(volume id, snapshot id or None, size in bytes) of an export name."""
    e = _eng()
    volume, at, snap = export.partition("@")
    vol = e.volume_id(volume)
    if not at:
        return vol, None, e.volume_size(vol)
    epoch = e.snapshot_id(volume, snap)
    return vol, epoch, e.snapshot_size(vol, epoch)


@_guarded
def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    # Read from the store at each call: volumes created or deleted while serving show up or
    # disappear for the next client.
    e = _eng()
    out = []
    for v in e.list_volumes():
        out.append((v.name, f"volume, {v.size_bytes} bytes"))
        for s in e.list_snapshots(v.name, with_usage=False):
            out.append((f"{v.name}@{s.name}",
                        f"snapshot {s.id} of {v.name} ({s.kind}), {s.size_bytes} bytes, read-only"))
    return out


@_guarded
def default_export(readonly: bool, is_tls: bool) -> str:
    names = [v.name for v in _eng().list_volumes()]
    if len(names) != 1:
        raise errors.InvalidArgument(
            f"the store has {len(names)} volumes: name the export (VOLUME or VOLUME@SNAPSHOT)")
    return names[0]


@_guarded
def open(readonly: bool) -> Connection:
    export = nbdkit.export_name()  # after default_export: the canonical name
    h = Connection(export, *_resolve(export), readonly)
    _connections.register(h)  # waits while a rollback or delete holds the volume
    try:
        if _resolve(export)[:2] != (h.vol, h.epoch):  # deleted or re-made meanwhile
            raise errors.NotFound(f"export {export!r} went away while connecting")
        if h.epoch is None:
            h.read, h.write = _eng().live_io(h.vol)
        else:
            h.read = _eng().snapshot_reader(h.vol, h.epoch)
        _claim_socket(h)
    except BaseException:
        _connections.unregister(h)
        raise
    return h


def close(h: Connection) -> None:
    _connections.unregister(h)
    if h.socket_inode is not None:
        with _claims_lock:
            if _claims.get(h.socket_inode) is h:
                del _claims[h.socket_inode]


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


def can_flush(h: Connection) -> bool:
    return h.epoch is None


def can_trim(h: Connection) -> bool:
    return not h.readonly


def can_zero(h: Connection) -> bool:
    return not h.readonly


def can_fast_zero(h: Connection) -> bool:
    # Zeroing unmaps whole blocks (a map change) and writes at most two partial edge blocks:
    # never slower than the write it replaces.
    return not h.readonly


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
# bound at open) because every Python call is ~0.1 us of a per-request budget of a few us.

_enter = _connections.enter
_leave = _connections.leave


def pread(h: Connection, buf: Any, offset: int, flags: int) -> None:
    try:
        _enter(h)
        try:
            h.read(offset, buf)  # type: ignore[misc]
        finally:
            _leave(h)
    except Exception as e:
        raise _failure("pread", e) from None


def pwrite(h: Connection, buf: Any, offset: int, flags: int) -> None:
    try:
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
    _eng().flush()


@_io
def trim(h: Connection, count: int, offset: int, flags: int) -> None:
    _eng().trim(_writable(h), offset, count, fua=bool(flags & nbdkit.FLAG_FUA))


@_io
def zero(h: Connection, count: int, offset: int, flags: int) -> None:
    # FLAG_MAY_TRIM is moot (zeroed whole blocks are always unmapped) and FLAG_FAST_ZERO is
    # always met (see can_fast_zero).
    _eng().zero(_writable(h), offset, count, fua=bool(flags & nbdkit.FLAG_FUA))


_HOLE = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


@_io
def extents(h: Connection, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    # Runs come block-aligned outwards; nbdkit clips them to [offset, offset+count).
    runs = (_eng().block_status(h.vol, offset, count) if h.epoch is None
            else _eng().snapshot_block_status(h.vol, h.epoch, offset, count))
    if flags & nbdkit.FLAG_REQ_ONE:
        runs = runs[:1]
    return [(o, n, 0 if allocated else _HOLE) for o, n, allocated in runs]
