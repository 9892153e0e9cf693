"""One way for the CLI to run an operation on a store, served or not.

    with open_backend("/srv/store") as b:
        b.call("volume.list")

If a server runs for the store (its pid file names a live nbdkit, or its control socket
answers), the backend is a control Client and the operation runs in the server, beside the
volumes it serves.  Otherwise it is a LocalBackend: this process opens the store itself
(Engine.open takes the store's exclusive flock, so a second writer, local or server, gets
errors.StoreLocked) and runs the same op through control.ops.dispatch.  Either way results are
plain JSON values and failures the same snapdisk errors.

Long operations can run as jobs either way (`start_job`): a RemoteJob on the server, or a
jobs.Job in a thread of this process; both report progress events and take a cancel.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from .. import errors
from ..engine import Engine
from . import jobs, ops
from .client import DEFAULT_TIMEOUT, Client

__all__ = ["Backend", "JobHandle", "LocalBackend", "open_backend"]


class JobHandle(Protocol):
    """A job as start_job returns it: client.RemoteJob or jobs.Job."""

    id: int
    op: str

    def events(self) -> Iterator[dict[str, Any]]:
        """Progress events, then the job.finished event."""
        ...

    def wait(self, timeout: float | None = None) -> dict[str, Any]: ...

    def cancel(self) -> Any: ...

    def outcome(self) -> Any:
        """Wait for the end: the op's result, or its error raised."""
        ...


@runtime_checkable
class Backend(Protocol):
    """What open_backend returns: a Client (remote = True) or a LocalBackend."""

    remote: bool

    def call(self, op: str, **args: Any) -> Any: ...

    def start_job(self, op: str, **args: Any) -> JobHandle: ...

    def close(self) -> None: ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class LocalBackend:
    """The store opened by this process; the same ops as the server, minus `stop`."""

    remote = False

    def __init__(self, store_path: str):
        self.store = os.path.abspath(store_path)
        try:
            self.engine: Engine | None = Engine.open(self.store)
        except errors.StoreLocked:
            raise errors.StoreLocked(
                f"{self.store} is in use by another process: another snapdisk command is "
                "working on it (one writer at a time), or a server is starting; try again") from None
        self.capabilities = ops.capabilities(server=False)
        self.jobs = jobs.Jobs()
        self.ctx = ops.Context(jobs=self.jobs)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise errors.InvalidArgument("the local backend is closed")
        return self.engine

    def call(self, op: str, **args: Any) -> Any:
        result = ops.dispatch(self._engine(), op, args, self.ctx)
        return _as_json(result)

    def start_job(self, op: str, **args: Any) -> jobs.Job:
        """Run op in a thread of this process; the same events and cancel as a server's job."""
        return ops.start_job(self._engine(), op, args, self.ctx, wrap=_as_json)

    def close(self) -> None:
        if self.engine is not None:
            self.jobs.close()  # cancel and wait: nothing may use the Engine once it is closed
            self.engine.close()
            self.engine = None

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _as_json(result: Any) -> Any:
    # What a server would send: JSON values only (tuples become lists, and so on).
    return json.loads(json.dumps(result))


def open_backend(store_path: str, timeout: float = DEFAULT_TIMEOUT,
                 start_wait: float = 10.0) -> Backend:
    """A Client if a server runs for the store, else a LocalBackend on it.

    A server whose pid is alive but whose control socket does not answer yet (it is starting)
    is waited for up to start_wait seconds."""
    from ..daemon import check_store, paths, running_pid  # late: daemon imports control.client

    p = paths(check_store(store_path))  # EACCES is "permission denied", not "no store"
    deadline = time.monotonic() + start_wait
    while True:
        if os.path.exists(p["control_socket"]):
            try:
                return Client(p["control_socket"], timeout=timeout)
            except errors.NotRunning:
                pass  # a stale socket, or not listening yet
        pid = running_pid(p["store"])
        if pid is None:
            return LocalBackend(p["store"])
        if time.monotonic() > deadline:
            raise errors.ServerError(
                f"the snapdisk server of {p['store']} (pid {pid}) does not answer on "
                f"{p['control_socket']}; see {p['log']}")
        time.sleep(0.05)
