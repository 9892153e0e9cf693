"""The control client: what the CLI and the tests use to talk to a running server.

    with Client("/srv/store/control.sock") as c:
        c.call("volume.create", name="vm1", size_bytes=10 << 30)
        c.call("snapshot.list", volume="vm1")

`call` returns the reply's result or raises the snapdisk error class its code names
(errors.from_code), so code written against the local backend behaves the same remotely.
Requests on one Client are sent one at a time (a lock), each waiting for its reply.
"""

from __future__ import annotations

import itertools
import socket
import threading
from types import TracebackType
from typing import Any, NoReturn

from .. import errors
from . import protocol

DEFAULT_TIMEOUT = 60.0


class Client:
    """A connection to a snapdisk server's control socket."""

    remote = True

    def __init__(self, socket_path: str, timeout: float | None = DEFAULT_TIMEOUT):
        self.socket_path = socket_path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise errors.NotRunning(f"no snapdisk server answers on {socket_path} ({e.strerror})"
                                    ) from None
        except OSError as e:
            sock.close()
            raise errors.ServerError(f"cannot connect to {socket_path}: {e}") from None
        self._sock: socket.socket | None = sock
        self._reader = protocol.LineReader(sock)
        try:
            line = self._readline()
            if line.startswith(b'{"id"'):  # a refused peer gets an error instead of the greeting
                _raise(protocol.parse_reply(line))
            self.greeting = protocol.parse_greeting(line)
        except BaseException:
            self.close()
            raise
        self.version: str = self.greeting["version"]
        self.protocol: int = self.greeting["protocol"]
        self.capabilities: list[str] = list(self.greeting["capabilities"])

    def _readline(self) -> bytes:
        try:
            line = self._reader.readline()
        except TimeoutError:
            self.close()
            raise errors.ServerError(
                f"no answer from the server on {self.socket_path} within {self.timeout}s") from None
        except protocol.Oversized:
            self.close()
            raise errors.ServerError("oversized line from the server") from None
        except OSError as e:
            self.close()
            raise errors.ServerError(f"control connection lost: {e}") from None
        if line is None:
            self.close()
            raise errors.NotRunning(f"the server closed the control connection ({self.socket_path})")
        return line

    def call(self, op: str, **args: Any) -> Any:
        """Run op on the server; its result, or the snapdisk error it raised."""
        with self._lock:
            if self._sock is None:
                raise errors.NotRunning("the control connection is closed")
            req_id = next(self._ids)
            data = protocol.encode({"id": req_id, "op": op, "args": args})
            try:
                self._sock.sendall(data)
            except OSError as e:
                self.close()
                raise errors.ServerError(f"control connection lost: {e}") from None
            reply = protocol.parse_reply(self._readline())
        if reply.get("id") != req_id and not (reply.get("id") is None and not reply["ok"]):
            # (an error with no id answers a request the server could not read: oversized)
            raise errors.ServerError(f"reply to request {reply.get('id')!r}, expected {req_id}")
        if reply["ok"]:
            return reply.get("result")
        _raise(reply)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _raise(reply: dict[str, Any]) -> NoReturn:
    err = reply.get("error") or {}
    raise errors.from_code(str(err.get("code", "error")), str(err.get("message", "")))
