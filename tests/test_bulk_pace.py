"""Pacing of the bulk walks (bulk_pace.py): a chunk that overlapped requests is followed by a
pause of its share; an idle walk never waits, and its chunks grow."""

from __future__ import annotations

import time
from typing import Any

import pytest

from snapdisk import bulk_pace


class FakeStore:
    """stats() as NativeStore's: a read counter the test moves."""

    def __init__(self) -> None:
        self.reads = 0

    def stats(self) -> dict[str, int]:
        return {"fast_reads": self.reads, "fast_writes": 0, "slow_writes": 0,
                "redirected_writes": 0}


def busy_chunk(store: FakeStore, seconds: float, io: bool, ran: list[float] | None = None) -> Any:
    def chunk(limit: int) -> int:
        start = time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            pass
        if ran is not None:
            ran.append(time.monotonic() - start)
        if io:
            store.reads += 5  # requests were served while the chunk ran
        return 7
    return chunk


@pytest.mark.parametrize("duty", [0.5, 0.25])
def test_a_chunk_beside_requests_is_followed_by_its_share_of_sleep(duty: float) -> None:
    store = FakeStore()
    pace = bulk_pace.Pacer(store, 100, duty)  # type: ignore[arg-type]
    ran: list[float] = []
    t0 = time.monotonic()
    assert pace(busy_chunk(store, 0.02, io=True, ran=ran)) == 7
    took = time.monotonic() - t0
    want = ran[0] * (1 - duty) / duty  # its share of the time the chunk took (load included)
    assert want * 0.99 <= pace.slept <= want * 1.5 + 0.01
    assert took >= ran[0] + pace.slept * 0.99


def test_an_idle_walk_and_duty_one_never_sleep() -> None:
    store = FakeStore()
    idle = bulk_pace.Pacer(store, 100, 0.5)  # type: ignore[arg-type]
    for _ in range(3):
        idle(busy_chunk(store, 0.005, io=False))
    assert idle.slept == 0.0
    off = bulk_pace.Pacer(store, 100, 1.0)  # type: ignore[arg-type]
    off(busy_chunk(store, 0.005, io=True))
    assert off.slept == 0.0


def test_idle_chunks_double_up_to_the_growth_and_requests_bring_them_back() -> None:
    store = FakeStore()
    pace = bulk_pace.Pacer(store, 100, 0.99, growth=4)  # type: ignore[arg-type]
    given: list[int] = []

    def chunk(io: bool) -> Any:
        def run(limit: int) -> int:
            given.append(limit)
            if io:
                store.reads += 1
            return limit
        return run

    for io in (False, False, False, False, True, False, True, True):
        assert pace(chunk(io)) == pace.last
    assert given == [100, 200, 400, 400, 400, 100, 200, 100]
    # duty 1 (no pacing) still sizes the chunks by what they served
    off = bulk_pace.Pacer(store, 10, 1.0, growth=2)  # type: ignore[arg-type]
    given.clear()
    for io in (False, False, True, False):
        off(chunk(io))
    assert given == [10, 20, 20, 10]
    assert off.slept == 0.0
