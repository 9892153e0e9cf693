"""The shared wait helper (tests/waiting.py): returns the first truthy value, fails on timeout
naming what it waited for and what it saw last."""

from __future__ import annotations

import itertools
import time

import pytest
from waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: next(calls) >= 3 and "ready", 5, 0.001, "three calls") == "ready"
    assert next(calls) == 4  # stopped polling at once


def test_timeout_names_what_and_the_last_value() -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"waiting for the door.*last: \[\]"):
        wait_until(lambda: [], 0.1, 0.01, "the door")
    assert 0.1 <= time.monotonic() - t0 < 5


def test_ignored_exceptions_mean_not_yet_others_propagate() -> None:
    calls = itertools.count(1)

    def flaky() -> int:
        n = next(calls)
        if n < 3:
            raise ConnectionRefusedError(n)
        return n

    assert wait_until(flaky, 5, 0.001, "a listener", ignore=(ConnectionRefusedError,)) == 3

    def refused() -> bool:
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(AssertionError, match="last: ConnectionRefusedError"):
        wait_until(refused, 0.05, 0.01, "never", ignore=(ConnectionRefusedError,))
    with pytest.raises(KeyError):
        wait_until(lambda: {}["x"], 5, 0.01, "a key")
