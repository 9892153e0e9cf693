"""Threads writing while snapshots are taken: each snapshot holds every write acknowledged
before it began and no write that began after it returned (the I/O gate at work), and the
store stays consistent.  Writes go through the real hot path (C, GIL released)."""

from __future__ import annotations

import itertools
import struct
import threading
from pathlib import Path

from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
THREADS = 4
BLOCKS_PER_THREAD = 8
RUN = 64  # blocks per write: long pwrites widen the window a missing gate would leave open


def test_snapshots_are_points_in_time_under_concurrent_writes(tmp_path: Path) -> None:
    e = Engine.create(str(tmp_path), StoreConfig(pool_bytes=1 << 30))
    vol = e.create_volume("v", THREADS * BLOCKS_PER_THREAD * RUN * BS).id
    clock = itertools.count()  # next() is atomic under the GIL: a global order of events
    events: list[list[tuple[int, str, int]]] = [[] for _ in range(THREADS)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                block = (t * BLOCKS_PER_THREAD + i % BLOCKS_PER_THREAD) * RUN
                data = struct.pack("<QQ", t, i) * (RUN * BS // 16)
                events[t].append((next(clock), "start", i))
                e.write(vol, block * BS, data)
                events[t].append((next(clock), "ack", i))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    snaps = []
    try:
        for n in range(60):
            before = next(clock)
            s = e.create_snapshot("v", f"s{n}")
            after = next(clock)
            # read at once, while the writers go on: a snapshot must never change afterwards
            first = e.read_snapshot(vol, s.id, 0, THREADS * BLOCKS_PER_THREAD * RUN * BS)
            snaps.append((s.id, before, after, first))
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors
    for sid, before, after, first in snaps:
        content = e.read_snapshot(vol, sid, 0, THREADS * BLOCKS_PER_THREAD * RUN * BS)
        assert content == first, f"snapshot {sid} changed after it was taken"
        for t in range(THREADS):
            seen = {}
            for b in range(BLOCKS_PER_THREAD * RUN):
                off = (t * BLOCKS_PER_THREAD * RUN + b) * BS
                tt, i = struct.unpack_from("<QQ", content, off)
                assert content[off:off + BS] == content[off:off + 16] * (BS // 16), "torn block"
                if i:
                    assert tt == t
                    seen[b // RUN] = i
            newest = max(seen.values(), default=0)
            acked_before = max((i for c, k, i in events[t] if k == "ack" and c < before), default=0)
            started_after = min((i for c, k, i in events[t] if k == "start" and c > after),
                                default=None)
            assert newest >= acked_before, (sid, t, newest, acked_before)
            if started_after is not None:
                assert newest < started_after, (sid, t, newest, started_after)
    assert e.native.stats()["redirected_writes"] > 0  # the C redirect path ran concurrently too
    report = e.check()
    assert report.ok, report.problems
    e.close()
