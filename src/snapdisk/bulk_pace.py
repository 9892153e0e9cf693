"""Pacing of the bulk walks (bulk.py): how long each chunk is, and how long to wait after it.

A walk's chunks cost CPU (LMDB's page edits), not locks: the I/O gate is not held and readers
never wait for LMDB's writer lock.  Yet on two cores 4 KiB random reads served while a snapshot
delete ran fell to 0.6x of those before it (benchmarks/report.md), because the walk took one of
the cores from nbdkit and the client.  ZFS meets the same problem by limiting how much of an
async destroy each transaction group may do; here the walk measures whether requests were
served while a chunk ran (the C core's read and write counters moved) and, if so, sleeps
(1 - DUTY) / DUTY times as long as the chunk took before the next one.  Idle, it never sleeps.
So a walk under load takes at most 1 / DUTY times its CPU time plus what the requests leave
it, and `Pacer.slept` says how much of a walk was pacing.  SNAPDISK_BULK_DUTY (0 < DUTY <= 1,
default 0.1; 1 turns pacing off) sets it.  Measured (scripts/bench --only rollback-delete):
reads during a delete kept 0.67x [0.63-0.79] of their rate at 0.5, 0.82-0.89x at 0.2 (full
runs on two machines) and 0.95x [0.87-1.02] at 0.1, while the delete under reads took 7.5 s per
changed GiB at 0.1 (3.2-3.9 at 0.2, 0.46 idle); a delete is background work, the client's
reads are not.

The chunk's size.  A chunk is at most `limit` map records (bulk.CHUNK, 10000, to begin with).
Every chunk has a fixed cost besides its records: its commit msync()s the pages it dirtied, and
the next chunk write-faults them again (MDB_WRITEMAP), and a rollback's chunks, cut by lba,
each touch nearly every REFS leaf page, because the blocks they share again are scattered
over the pool.  Measured (a rollback of 512 MiB of scattered 4 KiB blocks, third round, engine
alone): 1.76 s per changed GiB at 5000 records a chunk, 1.25 at 10000, 0.8 at 20000-40000.
So while a chunk served no request the next one may be twice as large, up to GROWTH times the
first (SNAPDISK_BULK_IDLE_GROWTH, default 4; 1 keeps every chunk at the first's size), and a
chunk beside requests brings it back to the first's size at once.  The growth is counted in
chunks, not timed, so the C walks and their Python twins cut a walk the same way.
Simplification: one duty for every walk and every load, no feedback on the requests' latency,
and an idle walk's larger chunk holds LMDB's writer lock longer (measured 50-100 ms at 40000
records of a rollback here), which a control operation arriving meanwhile waits for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .native import NativeStore

DUTY = float(os.environ.get("SNAPDISK_BULK_DUTY", "0.1"))
GROWTH = max(1, int(os.environ.get("SNAPDISK_BULK_IDLE_GROWTH", "4")))


class Pacer:
    """Runs one walk's chunks: pacer(chunk) runs chunk(limit) and, if requests were served
    meanwhile, sleeps its share; `last` is the limit that chunk was given (module docstring)."""

    def __init__(self, ns: NativeStore, base: int, duty: float | None = None,
                 growth: int | None = None):
        self.native = ns
        self.duty = DUTY if duty is None else duty
        self.base = base
        self.top = base * (GROWTH if growth is None else max(1, growth))
        self.limit = self.last = base
        self.slept = 0.0

    def _io(self) -> int:
        s = self.native.stats()
        return s["fast_reads"] + s["fast_writes"] + s["slow_writes"] + s["redirected_writes"]

    def __call__(self, chunk: Callable[[int], int]) -> int:
        io, t0 = self._io(), time.monotonic()
        self.last = self.limit
        n = chunk(self.last)
        if self._io() == io:
            self.limit = min(self.limit * 2, self.top)
            return n
        self.limit = self.base
        if 0 < self.duty < 1:
            pause = (time.monotonic() - t0) * (1 - self.duty) / self.duty
            time.sleep(pause)
            self.slept += pause
        return n
