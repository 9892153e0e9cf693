"""Jobs: a long operation run in a worker thread, with progress, cooperative cancellation and
events (qemu's QMP jobs are the model; docs/control.md describes the protocol side).

    job = jobs.start("rollback", args, lambda progress: ops_fn(..., progress), cancellable)
    for event in job.events():      # {"event": "job.progress", "done", "total"}, ...,
        ...                         # {"event": "job.finished", "ok", "result" | "error"}
    job.cancel()                    # honoured at the op's next progress report

The same `Jobs` serves the control server (in the nbdkit process; `job.list`, `job.cancel`,
`job.wait`) and the local backend (the CLI on the store, no server), so the CLI shows progress
and cancels the same way on both.

Progress is what the Engine reports: its long methods take an optional
`progress(done, total)` callback.  `call_with_progress` passes it only to a method whose
signature has it (one place to look), else reports 0/1 before and 1/1 after.  Cancellation is
cooperative: `progress` raises errors.Cancelled once a cancel was requested, and the Engine
lets that exception abort its transaction, so a cancelled op leaves nothing half done.  An op
whose Engine method takes no `progress` can only be cancelled before it starts: its job says
`"cancellable": false`.  The final report (done == total) never raises: the work is done.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from .. import errors

Progress = Callable[[int, int], None]

EVENT_INTERVAL = 0.1   # seconds: progress events to one waiter are coalesced to this pace
KEEP_FINISHED = 64     # finished jobs job.list still shows (the oldest are forgotten first)


def accepts_progress(fn: Callable[..., Any]) -> bool:
    """Whether fn takes a `progress` keyword argument."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params


def call_with_progress(fn: Callable[..., Any], *args: Any, progress: Progress | None = None,
                       **kw: Any) -> Any:
    """fn(*args, **kw), reporting progress: through fn itself when it takes `progress`,
    else 0/1 before (where a cancel requested so far is honoured) and 1/1 after."""
    if progress is None:
        return fn(*args, **kw)
    if accepts_progress(fn):
        last = [0, 0]

        def report(done: int, total: int) -> None:
            progress(done, total)
            last[:] = [done, total]

        result = fn(*args, progress=report, **kw)
        if last[0] < last[1] or last[1] == 0:  # always end on a complete report (a bar at 100 %)
            whole = max(last[1], 1)
            progress(whole, whole)
        return result
    progress(0, 1)
    result = fn(*args, **kw)
    progress(1, 1)
    return result


class Job:
    """One operation running (or run) in a worker thread."""

    def __init__(self, job_id: int, op: str, args: dict[str, Any], cancellable: bool):
        self.id = job_id
        self.op = op
        self.args = args
        self.cancellable = cancellable  # midway; every job can be cancelled before it starts
        self.started = time.time()
        self.finished: float | None = None
        self.done = 0
        self.total = 0  # 0: not known yet
        self.cancel_requested = False
        self.ok: bool | None = None
        self.result: Any = None
        self.error: errors.SnapdiskError | None = None
        self._cond = threading.Condition()
        self._version = 0  # bumped on every change; what waiters watch

    # ---- the worker's side --------------------------------------------------------------------

    def progress(self, done: int, total: int) -> None:
        """The op's progress callback: done of total units of work.  Raises errors.Cancelled
        once a cancel was requested, except on the final report (done >= total)."""
        with self._cond:
            if self.cancel_requested and done < total:
                raise errors.Cancelled(f"job {self.id} ({self.op}) was cancelled")
            self.done, self.total = done, total
            self._changed()

    def _finish(self, ok: bool, result: Any, error: errors.SnapdiskError | None) -> None:
        with self._cond:
            self.ok, self.result, self.error = ok, result, error
            self.finished = time.time()
            self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._cond.notify_all()

    # ---- the clients' side --------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the job to stop at its next progress report (no effect once it has finished)."""
        with self._cond:
            if self.finished is None and not self.cancel_requested:
                self.cancel_requested = True
                self._changed()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the job finishes, or for timeout seconds; the job object either way."""
        with self._cond:
            self._cond.wait_for(lambda: self.finished is not None, timeout)
        return self.to_dict()

    def outcome(self) -> Any:
        """Wait for the end; the op's result, or the error it raised."""
        self.wait()
        if self.error is not None:
            raise self.error
        return self.result

    def to_dict(self) -> dict[str, Any]:
        with self._cond:
            d: dict[str, Any] = {
                "job": self.id, "op": self.op, "args": self.args,
                "state": "running" if self.finished is None else "finished",
                "done": self.done, "total": self.total, "cancellable": self.cancellable,
                "cancel_requested": self.cancel_requested, "started": self.started,
                "finished": self.finished, "ok": self.ok}
            d.update(self._outcome())
        return d

    def _outcome(self) -> dict[str, Any]:
        if self.finished is None:
            return {}
        if self.error is not None:
            return {"error": {"code": self.error.code, "message": self.error.message}}
        return {"result": self.result}

    def progress_event(self) -> dict[str, Any]:
        with self._cond:
            return {"event": "job.progress", "job": self.id, "done": self.done,
                    "total": self.total}

    def finished_event(self) -> dict[str, Any]:
        with self._cond:
            return {"event": "job.finished", "job": self.id, "ok": self.ok, **self._outcome()}

    def events(self, timeout: float | None = None,
               interval: float = EVENT_INTERVAL) -> Iterator[dict[str, Any]]:
        """The current progress at once, then each change (coalesced: at most one event per
        interval), then the job.finished event, and the iterator ends.  After timeout seconds
        it ends early, without the finished event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = [-1]  # (a list: the predicate below reads it)
        last: dict[str, Any] | None = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._version != seen[0], _left(deadline))
                if self._version == seen[0]:
                    return  # timed out
                seen[0] = self._version
                finished = self.finished is not None
            event = self.progress_event()
            if event != last:
                yield event
                last = event
            if finished:
                yield self.finished_event()
                return
            with self._cond:  # let progress accumulate, but wake at once for the end
                pause = interval if deadline is None else min(interval, deadline - time.monotonic())
                self._cond.wait_for(lambda: self.finished is not None, max(0.0, pause))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Jobs:
    """The jobs of one server (or one local backend): start, find, list, cancel, close."""

    def __init__(self, log: Callable[[str], None] | None = None, keep: int = KEEP_FINISHED):
        self.log = log
        self.keep = keep
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._closing = False

    def start(self, op: str, args: dict[str, Any], fn: Callable[[Progress], Any],
              cancellable: bool) -> Job:
        """Run fn(progress) in a new thread as job `op`; returns at once."""
        with self._lock:
            if self._closing:
                raise errors.NotRunning("the server is stopping: no new jobs")
            job = Job(next(self._ids), op, args, cancellable)
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.finished is not None]
            for old in finished[:max(0, len(finished) - self.keep)]:
                del self._jobs[old.id]
        threading.Thread(target=self._run, args=(job, fn), name=f"snapdisk-job-{job.id}",
                         daemon=True).start()
        return job

    def _run(self, job: Job, fn: Callable[[Progress], Any]) -> None:
        try:
            result = fn(job.progress)
        except errors.SnapdiskError as e:
            job._finish(False, None, e)
        except Exception as e:
            if self.log is not None:
                self.log(f"job {job.id} ({job.op}) failed unexpectedly:\n{traceback.format_exc()}")
            job._finish(False, None, errors.ServerError(f"{job.op}: internal error: {e!r}"))
        else:
            job._finish(True, result, None)

    def get(self, job_id: int) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise errors.NotFound(f"no job {job_id} (finished jobs are kept for a while, the "
                                  f"last {self.keep})")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def running(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.finished is None)

    def close(self, timeout: float = 30.0) -> bool:
        """No new jobs; cancel the running ones and wait for them (True if none is left), so
        that the Engine can be closed safely afterwards."""
        with self._lock:
            self._closing = True
            jobs = list(self._jobs.values())
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.cancel()
        for job in jobs:
            job.wait(_left(deadline))
        return all(job.finished is not None for job in jobs)
