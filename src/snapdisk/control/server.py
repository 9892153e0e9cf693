"""The control server: a thread in the nbdkit process serving STORE/control.sock.

It shares the plugin's Engine (one store, one LMDB environment per process) and its registry of
NBD connections, so that an operation that would pull data from under connected clients
(rollback, volume or snapshot delete) can see them:

  * `Connections` (snapdisk.connections) is that registry: `reserve(vol, ...)` holds off new
    connections to a volume while an operation runs, refuses (errors.Busy) when matching
    clients are connected, or with force revokes and disconnects them.
  * `ControlServer` accepts on the unix socket (mode 0600, peers checked with SO_PEERCRED: the
    store owner's uid or root), one thread per client, speaking control/protocol.py, and runs
    each request through control/ops.py, or as a job (control/jobs.py) when it asks to.
    close() stops accepting, cancels jobs and waits for them and for requests in progress (so
    the Engine can be closed safely afterwards) and removes the socket file.

nbdkit 1.32 has no way for a Python plugin to drop one connection (nbdkit.disconnect came in a
later release); the service shuts the client's socket down itself where it knows which socket
that is (see snapdisk.connections), and a revoked client it could not disconnect has every
request fail.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from typing import Any

from .. import errors
from ..connections import Connection, Connections
from ..engine import Engine
from . import jobs, ops, protocol

__all__ = ["Connection", "Connections", "ControlServer"]


def _log(msg: str) -> None:
    # stderr is nbdkit's: STORE/server.log when serving in the background, the journal under
    # systemd.
    sys.stderr.write(f"snapdisk control: {msg}\n")
    sys.stderr.flush()


def _discard_input(sock: socket.socket, max_bytes: int = 64 << 20, seconds: float = 5.0) -> None:
    """Before closing after an oversized line: read (and drop) what the client is still
    sending, so the close does not reset the connection and lose the error reply."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(0.5)
    deadline = time.monotonic() + seconds
    with suppress(OSError):
        while max_bytes > 0 and time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            max_bytes -= len(chunk)


class _ClientGone(Exception):
    """Sending an event line failed: the client is gone; end its connection."""


class ControlServer:
    """Serves the control protocol on `path` for `engine`, in daemon threads."""

    def __init__(self, engine: Engine, path: str, *, connections: Connections | None = None,
                 info: dict[str, Any] | None = None, on_stop: Callable[[], None] | None = None):
        self.engine = engine
        self.path = path
        self.connections = connections
        self.info = dict(info or {})
        self.on_stop = on_stop
        self.started = time.time()
        self.owner_uid = os.stat(os.path.dirname(path) or ".").st_uid
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._cond = threading.Condition()
        self._active = 0
        self._closing = False
        self._stop_requested = False
        self.jobs = jobs.Jobs(log=_log)
        self.ctx = ops.Context(connections=connections, status=self.status,
                               stop=self._request_stop if on_stop else None, jobs=self.jobs)
        self.capabilities = ops.capabilities(server=on_stop is not None)

    def start(self) -> None:
        # Bind under a temporary name, restrict it, then rename: the socket is never reachable
        # with the umask's permissions, and no process-wide umask change is needed.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        for p in (tmp, self.path):
            if os.path.lexists(p):
                os.unlink(p)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            # The kernel's largest backlog: a burst of clients (200 at once in the tests) waits
            # in the queue instead of failing with EAGAIN (the client also retries that).
            sock.listen(socket.SOMAXCONN)
            os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        self._listener = sock
        threading.Thread(target=self._accept_loop, name="snapdisk-control", daemon=True).start()

    def status(self) -> dict[str, Any]:
        with self._cond:
            clients = len(self._clients)
        return {"running": True, "pid": os.getpid(), "version": protocol.package_version(),
                "store": self.engine.path, "started": self.started,
                "uptime_seconds": round(time.time() - self.started, 3),
                **self.info, "control_socket": self.path, "control_clients": clients,
                "exports": self.connections.by_export() if self.connections else {}}

    def _request_stop(self) -> None:
        self._stop_requested = True

    # ---- connections ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing:
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._closing:
                    return
                time.sleep(0.05)  # EMFILE and friends: back off, keep serving
                continue
            threading.Thread(target=self._client, args=(sock,), name="snapdisk-control-client",
                             daemon=True).start()

    def _peer_allowed(self, sock: socket.socket) -> tuple[bool, int, int]:
        fmt = "3i"
        pid, uid, _ = struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize(fmt)))
        return uid in (0, self.owner_uid), pid, uid

    def _client(self, sock: socket.socket) -> None:
        with self._cond:
            if self._closing:
                sock.close()
                return
            self._clients.add(sock)
        try:
            allowed, pid, uid = self._peer_allowed(sock)
            if not allowed:
                _log(f"refused a client: pid {pid}, uid {uid} (store owner {self.owner_uid})")
                sock.sendall(protocol.encode(protocol.error_reply(None, errors.SnapdiskError(
                    f"permission denied: uid {uid} is neither root nor the store's owner "
                    f"({self.owner_uid})"))))
                return
            sock.sendall(protocol.encode(protocol.greeting(self.capabilities)))
            reader = protocol.LineReader(sock)

            def emit(event: dict[str, Any]) -> None:
                try:
                    sock.sendall(protocol.encode(event))
                except OSError as e:
                    raise _ClientGone() from e

            ctx = replace(self.ctx, emit=emit)
            while not self._closing:
                try:
                    line = reader.readline()
                except protocol.Oversized as e:
                    sock.sendall(protocol.encode(protocol.error_reply(None, e)))
                    _discard_input(sock)
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                sock.sendall(self._handle(line, ctx))
                if self._stop_requested and self.on_stop is not None:
                    _log("stop requested over the control socket")
                    self.on_stop()
                    return
        except (OSError, _ClientGone):
            pass  # the client went away, or close() shut the socket down
        finally:
            with self._cond:
                self._clients.discard(sock)
            sock.close()

    def _handle(self, line: bytes, ctx: ops.Context) -> bytes:
        """The one reply line to a request line (an op whose request is invalid never runs)."""
        try:
            req = protocol.parse_request(line)
        except protocol.BadRequest as e:
            return protocol.encode(protocol.error_reply(e.req_id, e))
        with self._cond:
            if self._closing:
                return protocol.encode(protocol.error_reply(
                    req.id, errors.NotRunning("the server is stopping")))
            self._active += 1
        try:
            if req.job:
                job = ops.start_job(self.engine, req.op, req.args, ctx)
                reply = protocol.ok_reply(req.id, {"job": job.id})
            else:
                reply = protocol.ok_reply(req.id, ops.dispatch(self.engine, req.op, req.args, ctx))
        except errors.SnapdiskError as e:
            reply = protocol.error_reply(req.id, e)
        except _ClientGone:
            raise
        except Exception as e:
            _log(f"{req.op} failed unexpectedly:\n{traceback.format_exc()}")
            reply = protocol.error_reply(req.id, errors.ServerError(f"{req.op}: internal error: {e!r}"))
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
        return _encode_reply(req, reply)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop accepting, cut idle clients off, cancel jobs, wait for them and for requests
        in progress (True if none is left), remove the socket file."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            clients = list(self._clients)
        if self._listener is not None:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for sock in clients:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # wakes a reader; a reply being sent still goes
        jobs_done = self.jobs.close(timeout)  # (job.wait requests end with their jobs)
        with self._cond:
            done = self._cond.wait_for(lambda: self._active == 0,
                                       max(0.0, deadline - time.monotonic()))
        with suppress(FileNotFoundError):
            os.unlink(self.path)
        return done and jobs_done


def _encode_reply(req: protocol.Request, reply: dict[str, Any]) -> bytes:
    """reply as a line; a result that cannot be sent (not JSON, or longer than the protocol's
    reply limit) becomes an error reply, so every request still gets exactly one."""
    try:
        data = protocol.encode(reply)
    except (TypeError, ValueError) as e:
        _log(f"{req.op}: unencodable reply: {e!r}")
        return protocol.encode(protocol.error_reply(
            req.id, errors.ServerError(f"{req.op}: internal error: the result is not JSON ({e})")))
    if len(data) > protocol.MAX_REPLY_BYTES:
        return protocol.encode(protocol.error_reply(req.id, errors.ServerError(
            f"{req.op}: the reply would be {len(data)} bytes, more than the protocol's "
            f"{protocol.MAX_REPLY_BYTES}: ask for less (e.g. usage VOLUME)")))
    return data
