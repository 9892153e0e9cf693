"""Where a snapshot create's time goes, in process (no NBD, no control socket): one writer thread
doing unthrottled random 4 KiB writes over a 512 MiB volume (redirected after each snapshot), a
snapshot every PERIOD seconds, and timers around each phase (the SnapshotInfo fields, plus
env_sync and punch wrapped here).  Used for docs/design.md "Group commit".

    python benchmarks/snapshot_tail.py [SECONDS] [PERIOD]
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from snapdisk.native import BLOCK_SIZE as BS
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

VOLB = 512 << 20


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    period = float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
    d = tempfile.mkdtemp(prefix="snapdisk-tail-", dir="/var/tmp")
    e = Engine.create(d, StoreConfig(pool_bytes=2 << 30))
    try:
        vol = e.create_volume("v", VOLB).id
        chunk = os.urandom(BS) * 256
        for off in range(0, VOLB, len(chunk)):
            e.write(vol, off, chunk)
        e.native.sync()
        stop = threading.Event()
        nw = [0]

        def writer() -> None:
            rng, buf = random.Random(1), os.urandom(BS)
            while not stop.is_set():
                e.write(vol, rng.randrange(VOLB // BS) * BS, buf)
                nw[0] += 1

        timers: dict[str, float] = {}
        native: Any = e.native
        sync0 = native.env_sync

        def env_sync() -> None:
            t = time.perf_counter()
            sync0()
            timers["env_sync"] = time.perf_counter() - t

        native.env_sync = env_sync
        th = threading.Thread(target=writer)
        th.start()
        rows: list[tuple[float, ...]] = []
        try:
            time.sleep(0.5)
            w0, t_start = nw[0], time.perf_counter()
            while time.perf_counter() - t_start < secs:
                time.sleep(period)
                t0 = time.perf_counter()
                info = e.create_snapshot("v")
                total = (time.perf_counter() - t0) * 1000
                rows.append((total, info.batch_wait_ms or 0.0, info.gate_wait_ms or 0.0,
                             info.commit_ms or 0.0, timers.get("env_sync", 0.0) * 1000))
            rate = (nw[0] - w0) / (time.perf_counter() - t_start)
        finally:
            stop.set()
            th.join()
    finally:
        e.close()
        shutil.rmtree(d)
    print(f"{len(rows)} snapshots, writer {rate:.0f} writes/s (ms: p50 / p90 / p99 / max)")
    names = ["total", "batch_wait", "gate_wait", "transaction", "env_sync"]
    for i, name in enumerate(names):
        col = [r[i] for r in rows]
        print(f"  {name:12s} {pct(col, 50):8.2f} {pct(col, 90):8.2f} {pct(col, 99):8.2f} {max(col):8.2f}")


if __name__ == "__main__":
    main()
