"""The state one command runs with: the store path, the backend (opened on first use), and
how job progress shows.  Every command is `(args, ctx) -> (result for --json, text)`."""

from __future__ import annotations

from typing import Any

from .. import errors
from .progress import ProgressView


class Context:
    def __init__(self, store: str, progress: str = "none"):
        self.store = store
        self.progress = progress  # a ProgressView mode
        self._backend: Any = None

    def backend(self) -> Any:
        if self._backend is None:
            from ..control.backend import open_backend
            self._backend = open_backend(self.store)
        return self._backend

    def call(self, op: str, **args: Any) -> Any:
        return self.backend().call(op, **args)

    def run_job(self, desc: str, op: str, **args: Any) -> Any:
        """Run op as a job (in the server, or in this process), showing its progress; its
        result, or its error raised.  Ctrl-C cancels it and waits for its end: Cancelled
        (exit 130), also when it had finished before the cancel could take effect."""
        job = self.backend().start_job(op, **args)
        view = ProgressView(self.progress, desc)
        try:
            try:
                for event in job.events():
                    view.event(event)
            except KeyboardInterrupt:
                view.note("cancelling")
                job.cancel()
                final = job.wait()
                if final.get("ok"):
                    raise errors.Cancelled(f"interrupted, but {desc} had already completed "
                                           "before the cancel could take effect") from None
                code = (final.get("error") or {}).get("code")
                if code == errors.Cancelled.code:
                    raise errors.Cancelled(f"interrupted: {desc} was cancelled") from None
                # It ended with an error of its own: report that one.
        finally:
            view.close()
        return job.outcome()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


Result = tuple[Any, str]
