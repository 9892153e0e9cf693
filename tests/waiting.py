"""`wait_until`: the one way a test waits for something to happen.

A fixed `time.sleep(N)` before an assertion is either too short on a loaded machine (a flaky
failure) or too long everywhere else (a slow suite).  Poll the condition instead, with a generous
timeout that only a real failure reaches, and say on failure what was awaited and what was seen
last.  Import it as `from waiting import wait_until` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               what: str = "the condition",
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call predicate every `interval` seconds until it returns a truthy value, and return that
    value.  After `timeout` seconds raise AssertionError naming `what` and the last value (or
    the last exception of a type in `ignore`, which count as "not yet").  Any other exception
    from predicate propagates at once: use that to stop waiting for something that cannot
    happen any more (a child process that exited, say)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            last: object = value
            if value:
                return value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)
