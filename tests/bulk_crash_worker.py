"""The child of tests/test_bulk_crash.py: snapshot deletes, rollbacks and volume deletes big
enough to take many chunks (SNAPDISK_BULK_CHUNK is small), with writes in between; it logs
what each volume must hold, and is killed with SIGKILL at random moments.

Log lines (JSON, one write each, so a kill leaves whole lines):
    {"ok": {name: sha256}}          every volume's content after an op and a flush
    {"intent": {name: sha|null|"*"}}  before an op: what the named volumes hold once it is done
                                    (null: the volume is gone; "*": anything, a write phase)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE

SIZE = 4 << 20
NBLOCKS = SIZE // BLOCK_SIZE


def digest(e: Engine, name: str) -> str:
    return hashlib.sha256(e.read(e.volume_id(name), 0, SIZE)).hexdigest()


def slow(done: int, total: int) -> None:
    """Progress callback between chunks: a pause, so that kills often land in a walk."""
    time.sleep(0.001)


def main() -> None:
    store, log_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def log(**rec: object) -> None:
        os.write(fd, (json.dumps(rec) + "\n").encode())

    e = Engine.open(store)

    def ok() -> None:
        e.flush()
        log(ok={v.name: digest(e, v.name) for v in e.list_volumes()})

    ok()
    n = 0
    while True:
        n += 1
        names = sorted(v.name for v in e.list_volumes())
        name = rng.choice(names)
        snaps = [s.name for s in e.list_snapshots(name, with_usage=False)]
        r = rng.random()
        if r < 0.35 or not snaps:
            log(intent={name: "*"})
            vol = e.volume_id(name)
            for b in rng.sample(range(NBLOCKS), 300):
                e.write(vol, b * BLOCK_SIZE, rng.randbytes(16) * (BLOCK_SIZE // 16))
            e.create_snapshot(name, f"s{seed}-{n}")
        elif r < 0.6:
            log(intent={name: digest(e, name)})
            e.delete_snapshot(name, rng.choice(snaps), progress=slow)
        elif r < 0.85:
            snap = rng.choice(snaps)
            want = e.read_snapshot(e.volume_id(name), e.snapshot_id(name, snap), 0, SIZE)
            log(intent={name: hashlib.sha256(want).hexdigest()})
            e.rollback(name, snap, progress=slow)
        elif len(names) > 1:
            log(intent={name: None})
            e.delete_volume(name, progress=slow)
        else:
            snap = rng.choice(snaps)
            want = e.read_snapshot(e.volume_id(name), e.snapshot_id(name, snap), 0, SIZE)
            new = f"c{seed}-{n}"
            log(intent={new: hashlib.sha256(want).hexdigest()})
            e.clone(name, snap, new)
        ok()


if __name__ == "__main__":
    main()
