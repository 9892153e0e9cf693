"""The control client: what the CLI and the tests use to talk to a running server.

    with Client("/srv/store/control.sock") as c:
        c.call("volume.create", name="vm1", size_bytes=10 << 30)
        c.call("snapshot.list", volume="vm1")
        job = c.start_job("rollback", volume="vm1", snapshot="s1")
        for event in job.events():          # job.progress ..., then job.finished
            print(event)
        result = job.outcome()              # the op's result, or its error raised

`call` returns the reply's result or raises the snapdisk error class its code names
(errors.from_code), so code written against the local backend behaves the same remotely.
Requests on one Client are sent one at a time (a lock), each waiting for its reply; event
lines (only sent while a `job.wait` with events runs) come before that reply.
"""

from __future__ import annotations

import errno
import itertools
import socket
import threading
import time
from collections.abc import Generator, Iterator
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
        sock = _connect(socket_path, timeout)
        self._sock: socket.socket | None = sock
        self._reader = protocol.LineReader(sock, limit=protocol.MAX_REPLY_BYTES, what="reply")
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
        except protocol.Oversized as e:
            self.close()
            raise errors.ServerError(f"oversized line from the server: {e.message}") from None
        except OSError as e:
            self.close()
            raise errors.ServerError(f"control connection lost: {e}") from None
        if line is None:
            self.close()
            raise errors.NotRunning(f"the server closed the control connection ({self.socket_path})")
        return line

    def _exchange(self, op: str, args: dict[str, Any], job: bool = False
                  ) -> Generator[dict[str, Any], None, Any]:
        """Send one request; yield the event lines that come before its reply; return the
        reply's result (or raise its error).  Abandoned before the reply (Ctrl-C, or the
        caller stops iterating), the connection cannot be reused and is closed."""
        with self._lock:
            if self._sock is None:
                raise errors.NotRunning("the control connection is closed")
            req_id = next(self._ids)
            msg: dict[str, Any] = {"id": req_id, "op": op, "args": args}
            if job:
                msg["job"] = True
            data = protocol.encode(msg)
            try:
                self._sock.sendall(data)
            except OSError as e:
                self.close()
                raise errors.ServerError(f"control connection lost: {e}") from None
            complete = False
            try:
                while True:
                    reply = protocol.parse_reply(self._readline())
                    if not protocol.is_event(reply):
                        break
                    yield reply
                complete = True
            finally:
                if not complete:
                    self.close()
        if reply.get("id") != req_id and not (reply.get("id") is None and not reply["ok"]):
            # (an error with no id answers a request the server could not read: oversized)
            raise errors.ServerError(f"reply to request {reply.get('id')!r}, expected {req_id}")
        if reply["ok"]:
            return reply.get("result")
        _raise(reply)

    def call(self, op: str, **args: Any) -> Any:
        """Run op on the server; its result, or the snapdisk error it raised."""
        return _run(self._exchange(op, args))

    def start_job(self, op: str, **args: Any) -> RemoteJob:
        """Start op as a job on the server (see ops.job_ops()); returns at once."""
        result = _run(self._exchange(op, args, job=True))
        return RemoteJob(self, int(result["job"]), op)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def busy(self) -> bool:
        """A request is waiting for its reply (e.g. a job's events are being iterated)."""
        return self._lock.locked()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RemoteJob:
    """A job on the server, as Client.start_job returns it (the local backend's jobs.Job has
    the same methods: id, op, events, wait, cancel, outcome)."""

    def __init__(self, client: Client, job_id: int, op: str):
        self.client = client
        self.id = job_id
        self.op = op
        self._final: dict[str, Any] | None = None  # the job object once it has finished

    def _live_client(self) -> Client:
        """The client, reconnected if an interrupted wait closed it."""
        if self.client.closed:
            self.client = Client(self.client.socket_path, self.client.timeout)
        return self.client

    def _slice(self) -> float | None:
        # Each job.wait asks the server to answer before this client's socket timeout would
        # give up on it (a job may report no progress for a long time).
        t = self.client.timeout
        return None if t is None else max(0.1, min(30.0, t / 2))

    def events(self) -> Iterator[dict[str, Any]]:
        """The job's progress events, then its job.finished event."""
        last: dict[str, Any] | None = None
        while self._final is None:
            stream = self._live_client()._exchange(
                "job.wait", {"job": self.id, "events": True, "timeout": self._slice()})
            try:
                while True:
                    try:
                        event = next(stream)
                    except StopIteration as stop:
                        if stop.value.get("state") == "finished":
                            self._final = stop.value
                        break
                    if event != last:  # each wait starts with the current progress again
                        last = event
                        yield event
            finally:
                stream.close()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The job object, once the job has finished or after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._final is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            slice_ = self._slice()
            wait = left if slice_ is None else slice_ if left is None else min(left, slice_)
            job = self._live_client().call("job.wait", job=self.id, timeout=wait)
            if job["state"] == "finished":
                self._final = job
            elif left is not None and left <= 0:
                return dict(job)
        return dict(self._final)

    def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel the job (events(), wait() or outcome() for its end).
        Callable while events() is being iterated: the request then goes on a connection of
        its own (the job's is busy with its job.wait)."""
        client = self._live_client()
        if client.busy:
            with Client(client.socket_path, client.timeout) as other:
                job: dict[str, Any] = other.call("job.cancel", job=self.id)
                return job
        job = client.call("job.cancel", job=self.id)
        return job

    def outcome(self) -> Any:
        """Wait for the end; the op's result, or the snapdisk error it ended with."""
        job = self.wait()
        if job.get("ok"):
            return job.get("result")
        _raise(job)


def _run(exchange: Generator[dict[str, Any], None, Any]) -> Any:
    """Run an exchange to its reply, dropping event lines."""
    while True:
        try:
            next(exchange)
        except StopIteration as stop:
            return stop.value


def _connect(path: str, timeout: float | None) -> socket.socket:
    """A connected socket.  A unix socket's connect with a timeout is non-blocking, and when
    the server's listen backlog is full it fails at once with EAGAIN instead of waiting: retry
    that, with a short backoff, within the timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise errors.NotRunning(f"no snapdisk server answers on {path} ({e.strerror})"
                                    ) from None
        except OSError as e:
            sock.close()
            busy = e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
            if not busy or (deadline is not None and time.monotonic() + delay > deadline):
                why = "the server is too busy to accept (listen backlog full)" if busy else e
                raise errors.ServerError(f"cannot connect to {path}: {why}") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _raise(reply: dict[str, Any]) -> NoReturn:
    err = reply.get("error") or {}
    raise errors.from_code(str(err.get("code", "error")), str(err.get("message", "")))
