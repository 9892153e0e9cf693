"""The NBD connections of a server: the registry the plugin and the control ops share, and
the one way (in nbdkit 1.32) to cut a client off.

  * `Connection` is one NBD connection's handle (what the plugin's open() returns), with the
    hot path's callables bound at open.
  * `Connections` is the registry.  The plugin registers each handle in open() and brackets
    every I/O with enter()/leave().  `reserve(vol, ...)` holds off new connections to a volume
    while an operation runs, refuses (errors.Busy) when matching clients are connected, or with
    force revokes them: it bumps the generation of the export's (volume, snapshot) key, so their
    later I/O fails with ESHUTDOWN (StaleConnection), waits until their in-flight I/O is done
    (no request that started before the revocation lands after it), then asks its owner to
    disconnect them (on_revoke).
  * A live export's reads and writes skip enter()/leave(): the plugin binds them
    (`bind_counted`) to one C call each, xm_conn_read and xm_conn_write, that counts the
    request in flight on the connection's `cconn` and refuses it once revoked, with the same
    ordering argument as enter() (issue 9 item 4: a 4 KiB read or write is one C call, no
    Python bookkeeping).  A write the C call declines (XM_ESLOW, nothing written) goes the
    Python way, bracketed by enter()/leave().  reserve() revokes and waits for both counts.
  * `ClientSockets` finds the NBD clients' sockets of this process and shuts them down.

nbdkit 1.32 gives a Python plugin no way to end a connection: nbdkit.disconnect() came later,
and on shutdown (SIGTERM or nbdkit.shutdown()) nbdkit does not end idle connections either (a
connection thread stays blocked reading the client's next request, so the server would wait
for every client to leave).  So the server finds its clients' sockets itself, in
/proc/self/fd: connected sockets whose local address is the NBD listener's (the listener, the
control socket and nbdkit's pipes are not), and shuts them down; nbdkit then sees the client
gone and closes the connection the usual way.  claim() records which socket a handle is on
when that is unambiguous (exactly one client socket not yet claimed: true unless several
clients are in their handshake at the same moment), so that a forced rollback can disconnect
exactly its clients; a handle without a known socket still fails every request (ESHUTDOWN).
The listener is always a unix socket: TCP clients come through the TLS forwarder (see
snapdisk.service), which is one more client of that socket.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from . import errors
from ._xm import ffi, lib


class Connection:
    """One NBD connection's handle (what the plugin's open() returns)."""

    __slots__ = ("export", "vol", "epoch", "key", "size_bytes", "readonly", "generation",
                 "inflight", "opened", "socket_inode", "read", "write", "cconn", "counted",
                 "cstore", "row", "pinned")

    def __init__(self, export: str, vol: int, epoch: int | None, size_bytes: int, readonly: bool):
        self.export = export
        self.vol = vol
        self.epoch = epoch  # None: the live volume; else the snapshot's id
        self.size_bytes = size_bytes
        self.readonly = readonly or epoch is not None
        self.key = (vol, epoch)  # what a forced rollback revokes: see Connections.reserve
        self.generation = 0
        # One item per request in flight.  A deque because append and pop are atomic (the
        # documented thread-safe deque operations), so the hot path takes no lock.
        self.inflight: deque[None] = deque()
        self.opened = time.time()
        self.socket_inode: int | None = None  # which client socket, if known (ClientSockets)
        # The plugin's hot path, bound at open (Engine.live_io / snapshot_reader).
        self.read: Callable[[int, Any], None] | None = None
        self.write: Callable[[int, Any, bool], None] | None = None
        # The C twin of inflight and of the generation check (xm_conn), and whether reads and
        # writes are counted there (bind_counted: xm_conn_read/xm_conn_write on cstore, the
        # store's xm_store *) instead of by enter()/leave().  row: xm_conn_write's flag (0:
        # redirected writes take the Python twin, SNAPDISK_WRITE_PATH=python).
        self.cconn: Any = ffi.new("xm_conn *")
        self.counted = False
        self.cstore: Any = None
        self.row = 1
        # The plugin's: (thread, PyGILState) of the connection thread's pinned thread state.
        self.pinned: tuple[int, int] | None = None

    def bind_counted(self, cstore: Any, row: bool) -> None:
        """Reads and writes of this (live) export are xm_conn_read / xm_conn_write(cstore,
        self.cconn, ...): the plugin's pread and pwrite make that one C call themselves, which
        counts the request in flight on cconn and refuses it once revoked."""
        self.cstore = cstore
        self.row = 1 if row else 0
        self.counted = True

    def busy(self) -> bool:
        """Requests in flight, counted in Python (enter) or in C (xm_conn_read/write)."""
        return bool(self.inflight) or lib.xm_conn_inflight(self.cconn) > 0


class Connections:
    """The NBD connections of this server, shared by the plugin and the control ops."""

    def __init__(self, wait_seconds: float = 60.0,
                 on_revoke: Callable[[list[Connection]], None] | None = None):
        self.on_revoke = on_revoke  # the service's: disconnect them, where it can
        self._cond = threading.Condition()
        self._open: set[Connection] = set()
        self._generation: dict[tuple[int, int | None], int] = {}
        self._reserved: dict[int, str] = {}  # volume -> what holds it
        self.wait_seconds = wait_seconds

    # ---- the plugin's side ----------------------------------------------------------------

    def register(self, c: Connection) -> None:
        """Add c; waits while an operation holds its volume (the caller then re-checks that
        the export still exists)."""
        with self._cond:
            if not self._cond.wait_for(lambda: c.vol not in self._reserved, self.wait_seconds):
                raise errors.Busy(f"export {c.export!r}: {self._reserved.get(c.vol)} is in progress")
            c.generation = self._generation.get((c.vol, c.epoch), 0)
            self._open.add(c)

    def unregister(self, c: Connection) -> None:
        with self._cond:
            self._open.discard(c)

    def enter(self, c: Connection) -> None:
        """Before each I/O: count the request in flight, then refuse a revoked connection.

        No lock: the count comes first and the check second, and reserve() bumps the
        generation first and reads the count second, so either reserve() sees this request
        in flight (and waits for it) or this request sees the new generation (and fails)."""
        c.inflight.append(None)
        if c.generation != self._generation.get(c.key, 0):
            c.inflight.pop()
            raise errors.StaleConnection(
                f"export {c.export!r} was rolled back with force while this client was "
                "connected: what it has cached is stale; reconnect")

    def leave(self, c: Connection) -> None:
        c.inflight.pop()

    # ---- the ops' side --------------------------------------------------------------------

    def _current(self, c: Connection) -> bool:
        return c.generation == self._generation.get((c.vol, c.epoch), 0)

    def count(self, vol: int) -> int:
        """Connections (not revoked) to vol or its snapshots."""
        with self._cond:
            return sum(1 for c in self._open if c.vol == vol and self._current(c))

    def by_export(self) -> dict[str, dict[str, int]]:
        with self._cond:
            live: Counter[str] = Counter(c.export for c in self._open if self._current(c))
            stale: Counter[str] = Counter(c.export for c in self._open if not self._current(c))
        return {e: {"connections": live[e], "revoked": stale[e]} for e in sorted(live | stale)}

    @contextmanager
    def reserve(self, vol: int, what: str, *, live_only: bool = False, epoch: int | None = None,
                force: bool = False) -> Iterator[int]:
        deadline = time.monotonic() + self.wait_seconds
        with self._cond:
            if not self._cond.wait_for(lambda: vol not in self._reserved, self.wait_seconds):
                raise errors.Busy(f"cannot {what}: {self._reserved.get(vol)} is in progress")
            hit = [c for c in self._open if c.vol == vol and self._current(c)
                   and (c.epoch is None if live_only else epoch is None or c.epoch == epoch)]
            if hit and not force:
                exports = ", ".join(sorted({c.export for c in hit}))
                n = len(hit)
                raise errors.Busy(
                    f"cannot {what}: {n} NBD client{'s are' if n > 1 else ' is'} connected "
                    f"({exports}); disconnect {'them' if n > 1 else 'it'} first"
                    + (", or force it (connected clients are cut off)" if live_only else ""))
            self._reserved[vol] = what
            for key in {(c.vol, c.epoch) for c in hit}:
                self._generation[key] = self._generation.get(key, 0) + 1
            for c in hit:  # every connection of those keys is in hit: the same set, in C
                lib.xm_conn_revoke(c.cconn)
        try:
            for c in hit:
                self._wait_idle(c, deadline)
            if hit and self.on_revoke is not None:
                self.on_revoke(hit)
            yield len(hit)
        finally:
            with self._cond:
                del self._reserved[vol]
                self._cond.notify_all()

    @staticmethod
    def _wait_idle(c: Connection, deadline: float) -> None:
        """Wait for the requests c started before its revocation."""
        while True:
            if not c.busy():
                return
            if time.monotonic() > deadline:
                raise errors.Busy(f"export {c.export!r}: requests still in flight after revocation")
            time.sleep(0.001)


class ClientSockets:
    """The connected client sockets of the unix listener at `path`, in this process."""

    def __init__(self, path: str):
        self.path = path
        self._claims: dict[int, Connection] = {}  # socket inode -> the handle on it
        self._lock = threading.Lock()

    def _find(self) -> dict[int, int]:
        """{socket inode: fd} of this process's NBD client connections."""
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
                if (sock.getsockname() == self.path
                        and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    out[st.st_ino] = fd
            except OSError:
                pass
            finally:
                sock.detach()  # the fd stays nbdkit's
        return out

    @staticmethod
    def _cut(fd: int) -> None:
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()

    def claim(self, h: Connection) -> None:
        """Record h's socket, when exactly one client socket is not claimed yet."""
        with self._lock:
            free = [ino for ino in self._find() if ino not in self._claims]
            if len(free) == 1:
                h.socket_inode = free[0]
                self._claims[free[0]] = h

    def release(self, h: Connection) -> None:
        if h.socket_inode is not None:
            with self._lock:
                if self._claims.get(h.socket_inode) is h:
                    del self._claims[h.socket_inode]

    def disconnect(self, revoked: list[Connection]) -> None:
        """Shut down the sockets of these handles, where known (Connections' on_revoke)."""
        with self._lock:
            socks = self._find()
            for h in revoked:
                ino = h.socket_inode
                if ino is not None and self._claims.get(ino) is h and ino in socks:
                    self._cut(socks[ino])

    def disconnect_all(self) -> None:
        for fd in self._find().values():
            with suppress(OSError):
                self._cut(fd)
