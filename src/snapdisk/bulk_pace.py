"""Pacing of the bulk walks (bulk.py) while foreground I/O runs.

A walk's chunks cost CPU (LMDB's page edits), not locks: the I/O gate is not held and readers
never wait for LMDB's writer lock.  Yet on two cores 4 KiB random reads served while a snapshot
delete ran fell to 0.6x of those before it (benchmarks/report.md), because the walk took one of
the cores from nbdkit and the client.  ZFS meets the same problem by limiting how much of an
async destroy each transaction group may do; here the walk measures whether requests were
served while a chunk ran (the C core's read and write counters moved) and, if so, sleeps
(1 - DUTY) / DUTY times as long as the chunk took before the next one.  Idle, it never sleeps.
So a walk under load takes at most 1 / DUTY times its CPU time plus what the requests leave
it, and `Pacer.slept` says how much of a walk was pacing.  SNAPDISK_BULK_DUTY (0 < DUTY <= 1,
default 0.2; 1 turns pacing off) sets it.  Measured (scripts/bench --only rollback-delete, two
runs one after the other): reads during a delete kept 0.67x [0.63-0.79] of their rate at 0.5
and 0.89x [0.87-1.01] at 0.2, while the delete under reads took 2.5x longer (4.3 s per changed
GiB); a delete is background work, the client's reads are not.  Simplification: one duty for
every walk and every load; no feedback on the requests' latency.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .native import NativeStore

DUTY = float(os.environ.get("SNAPDISK_BULK_DUTY", "0.2"))


class Pacer:
    """Runs one walk's chunks: pacer(chunk) runs chunk() and, if requests were served
    meanwhile, sleeps its share (module docstring)."""

    def __init__(self, ns: NativeStore, duty: float | None = None):
        self.native = ns
        self.duty = DUTY if duty is None else duty
        self.slept = 0.0

    def _io(self) -> int:
        s = self.native.stats()
        return s["fast_reads"] + s["fast_writes"] + s["slow_writes"] + s["redirected_writes"]

    def __call__(self, chunk: Callable[[], int]) -> int:
        if not 0 < self.duty < 1:
            return chunk()
        io, t0 = self._io(), time.monotonic()
        n = chunk()
        if self._io() != io:
            pause = (time.monotonic() - t0) * (1 - self.duty) / self.duty
            time.sleep(pause)
            self.slept += pause
        return n
