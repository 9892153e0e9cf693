"""The child of tests/test_crash.py: a seeded workload on the engine that logs what it does.

Log lines (JSON, appended with one write each, so a kill leaves whole lines): an op's intent
before it starts and its `done` after it returns (a write's `done` says how many redirected
blocks wait in the group-commit overlay).  A flush's `done` is a durability point; every
metadata op is followed by a flush before its `done`.  Block content: a header (magic, lba, seq,
crc32 of the rest) and filler derived from seq, so a torn or misplaced block is recognisable.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import zlib
from collections.abc import Callable
from typing import Any

from snapdisk import native
from snapdisk.native import BLOCK_SIZE
from snapdisk.volume import Engine

HEADER = struct.Struct("<IQQI")
MAGIC = 0x5DD15C00
NBLOCKS = 64


def block(lba: int, seq: int) -> bytes:
    fill = (struct.pack("<Q", seq * 2654435761 % (1 << 64)) * (BLOCK_SIZE // 8))[HEADER.size:]
    return HEADER.pack(MAGIC, lba, seq, zlib.crc32(fill)) + fill


def decode(data: bytes) -> tuple[int, int] | None:
    """(lba, seq) of a block, (0, 0) for zeros, None if torn or garbage."""
    if data == bytes(BLOCK_SIZE):
        return 0, 0
    magic, lba, seq, crc = HEADER.unpack_from(data)
    if magic != MAGIC or zlib.crc32(data[HEADER.size:]) != crc:
        return None
    return lba, seq


def main() -> None:
    store, log_path, seed, seq0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def log(**rec: object) -> None:
        os.write(fd, (json.dumps(rec) + "\n").encode())

    e = Engine.open(store)
    # group commit: how often the committer applies the overlay (argv[5], microseconds; 0: only
    # when something else does), so that kills land both with redirected writes still in the
    # overlay and with batches committed but not flushed
    if len(sys.argv) > 5:
        native.batch_config(e.native, int(sys.argv[5]), 16384)
    seq = seq0
    vols: list[str] = []
    ids: dict[str, int] = {}
    while True:
        if not vols:  # looked up again after each metadata op only: a Python read transaction
            vols = [v.name for v in e.list_volumes()]  # applies the group-commit overlay
            ids = {v: e.volume_id(v) for v in vols}
        vol = rng.choice(vols)
        vid = ids[vol]
        r = rng.random()
        if r < 0.55:
            lba = rng.randrange(NBLOCKS)
            n = rng.randint(1, min(4, NBLOCKS - lba))
            seqs = list(range(seq + 1, seq + n + 1))
            seq += n
            log(op="w", v=vol, lba=lba, seqs=seqs)
            e.write(vid, lba * BLOCK_SIZE, b"".join(block(lba + i, s) for i, s in enumerate(seqs)))
            if rng.random() < 0.5:  # what the committer does on its own: a batch, no FLUSH (so
                native.batch_commit(e.native)  # kills after one do not hang on its timing)
            log(op="done", pend=native.batch_pending(e.native))  # blocks not yet in LMDB
        elif r < 0.65:
            lba = rng.randrange(NBLOCKS)
            n = rng.randint(1, NBLOCKS - lba)
            log(op="t", v=vol, lba=lba, n=n)
            e.trim(vid, lba * BLOCK_SIZE, n * BLOCK_SIZE)
            log(op="done")
        elif r < 0.8:
            log(op="f")
            e.flush()
            log(op="done")
        else:
            if not metadata_op(e, rng, vol, vols, seq, log, max_snaps=40, max_vols=5):
                continue
            e.flush()
            log(op="done")
            vols = []


def metadata_op(e: Any, rng: random.Random, vol: str, vols: list[str], seq: int,
                log: Callable[..., None], max_snaps: int, max_vols: int) -> bool:
    """One random metadata operation on vol, logged before it starts: a snapshot, a rollback,
    a clone, a snapshot delete or a clone's delete (shared with tests/powercut_worker.py).
    False if it chose nothing to do."""
    snaps = [s.name for s in e.list_snapshots(vol, with_usage=False)]
    m = rng.random()
    if not snaps or (m < 0.4 and len(snaps) < max_snaps):
        name = f"s{seq}-{rng.randrange(10**6)}"
        log(op="snap", v=vol, name=name)
        e.create_snapshot(vol, name)
    elif m < 0.6:
        name = rng.choice(snaps)
        log(op="rollback", v=vol, name=name)
        e.rollback(vol, name)
    elif m < 0.75 and len(vols) < max_vols:
        name, new = rng.choice(snaps), f"c{seq}-{rng.randrange(10**6)}"
        log(op="clone", v=vol, name=name, new=new)
        e.clone(vol, name, new)
    elif m < 0.9 or len(vols) <= 2:
        name = rng.choice(snaps)
        log(op="delsnap", v=vol, name=name)
        e.delete_snapshot(vol, name)
    else:
        victim = rng.choice([v for v in vols if v.startswith("c")] or [vol])
        if victim == vol and not vol.startswith("c"):
            return False
        log(op="delvol", v=victim)
        e.delete_volume(victim)
    return True


if __name__ == "__main__":
    main()
