"""The two child processes of tests/test_powercut.py.

    powercut_worker.py run STORE LOG SEED MODE SECONDS
        create a store (MODE default; unsafe-nosync: the MDB_NOSYNC opt-in; or sync-data:
        every redirected write's data fdatasync()ed before its map commits, by sending
        redirected writes through the Python write path with a syncing Pool.write: what a
        data-before-map fix would do) and volumes a and b, log {"op": "ready"}, then run a
        seeded workload on the engine for SECONDS: writes (some FUA), trims, FLUSHes,
        snapshots, rollbacks, clones, snapshot and volume deletes.  Unlike crash_worker.py, a
        control operation is NOT followed by a flush: issue 9 requires that an operation that
        returned success survives a power cut by itself.
    powercut_worker.py ref|ref-nosync FILE LOG SEED SECONDS
        the harness's controls: the same writes, FUA writes, trims (zeros) and flushes on one
        plain 64-block file (pwrite, fdatasync), which is power-cut safe by construction (ext4
        orders and flushes it), so the test can pass; ref-nosync "flushes" without
        fdatasync, so the test must fail.
    powercut_worker.py dump STORE | refdump FILE
        open the store as a reboot would, run the integrity check, and print JSON: every
        volume's and snapshot's blocks as [lba, seq] stamps (null: torn or garbage).

Log lines (JSON, one write(2) each, O_APPEND): an op's intent with the CLOCK_MONOTONIC time
before it starts, then {"op": "done", "t": ...} taken after it returned.  The harness compares
these times with the device log's (same clock) to know what was acknowledged before a cut.
Block contents are crash_worker's stamps (magic, lba, seq, crc32): seqs are unique across all
volumes, so a block holding another block's or another volume's data is recognisable.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

from snapdisk.native import BLOCK_SIZE
from snapdisk.pool import Pool
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crash_worker import NBLOCKS, block, decode, metadata_op  # noqa: E402

POOL_BYTES = 32 << 20
MAX_SNAPS = 12
MAX_VOLS = 4


def _sync_pool_writes() -> None:
    os.environ["SNAPDISK_WRITE_PATH"] = "python"  # read by Engine(); no C redirect
    plain = Pool.write

    def write(self: Pool, pbn: int, data: Any, offset_in_block: int = 0, **kw: Any) -> None:
        plain(self, pbn, data, offset_in_block, **kw)
        self._store.sync()  # fdatasync(pool.dat) (then an LMDB sync: harmless here)

    Pool.write = write  # type: ignore[method-assign]


def run(store: str, log_path: str, seed: int, mode: str, seconds: float) -> None:
    rng = random.Random(seed)
    if mode == "sync-data":
        _sync_pool_writes()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def log(**rec: object) -> None:
        os.write(fd, (json.dumps({**rec, "t": time.monotonic()}) + "\n").encode())

    # default: synced commits and group commit (issue 9); unsafe-nosync: the MDB_NOSYNC opt-in
    e = Engine.create(store, StoreConfig(pool_bytes=POOL_BYTES,
                                         unsafe_nosync=mode == "unsafe-nosync"))
    for name in ("a", "b"):
        e.create_volume(name, NBLOCKS * BLOCK_SIZE)
    e.flush()
    log(op="ready")
    seq, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        vols = [v.name for v in e.list_volumes()]
        vol = rng.choice(vols)
        vid = e.volume_id(vol)
        r = rng.random()
        if r < 0.55:
            lba = rng.randrange(NBLOCKS)
            n = rng.randint(1, min(4, NBLOCKS - lba))
            seqs = list(range(seq + 1, seq + n + 1))
            seq += n
            fua = rng.random() < 0.15
            log(op="w", v=vol, lba=lba, seqs=seqs, fua=fua)
            e.write(vid, lba * BLOCK_SIZE, b"".join(block(lba + i, s) for i, s in enumerate(seqs)),
                    fua=fua)
        elif r < 0.62:
            lba = rng.randrange(NBLOCKS)
            n = rng.randint(1, min(8, NBLOCKS - lba))
            log(op="t", v=vol, lba=lba, n=n)
            e.trim(vid, lba * BLOCK_SIZE, n * BLOCK_SIZE)
        elif r < 0.75:
            log(op="f")
            e.flush()
        else:
            if not metadata_op(e, rng, vol, vols, seq, log, MAX_SNAPS, MAX_VOLS):
                continue
        log(op="done")
    e.close()
    log(op="end")


def run_ref(path: str, log_path: str, seed: int, seconds: float, sync: bool) -> None:
    rng = random.Random(seed)
    lfd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def log(**rec: object) -> None:
        os.write(lfd, (json.dumps({**rec, "t": time.monotonic()}) + "\n").encode())

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, NBLOCKS * BLOCK_SIZE)
    os.fsync(fd)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(dfd)  # the file's name too
    os.close(dfd)
    log(op="ready")
    seq, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        r = rng.random()
        lba = rng.randrange(NBLOCKS)
        if r < 0.7:
            n = rng.randint(1, min(4, NBLOCKS - lba))
            seqs = list(range(seq + 1, seq + n + 1))
            seq += n
            fua = rng.random() < 0.15
            log(op="w", v="a", lba=lba, seqs=seqs, fua=fua)
            os.pwrite(fd, b"".join(block(lba + i, s) for i, s in enumerate(seqs)),
                      lba * BLOCK_SIZE)
            if fua and sync:
                os.fdatasync(fd)
        elif r < 0.8:
            n = rng.randint(1, min(8, NBLOCKS - lba))
            log(op="t", v="a", lba=lba, n=n)
            os.pwrite(fd, bytes(n * BLOCK_SIZE), lba * BLOCK_SIZE)
        else:
            log(op="f")
            if sync:
                os.fdatasync(fd)
        log(op="done")
    os.close(fd)
    log(op="end")


def stamps(data: bytes) -> list[list[int] | None]:
    out: list[list[int] | None] = []
    for b in range(NBLOCKS):
        d = decode(data[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])
        out.append(None if d is None else [d[0] if d[1] else b, d[1]])
    return out


def dump(store: str) -> None:
    state: dict[str, Any] = {"problems": [], "vols": {}, "snaps": {}}
    stage = "open"
    try:
        e = Engine.open(store)
        stage = "check"
        state["problems"] = [str(p) for p in e.check().problems][:10]
        stage = "read"
        for v in e.list_volumes():
            state["vols"][v.name] = stamps(e.read(v.id, 0, NBLOCKS * BLOCK_SIZE))
            snaps = state["snaps"][v.name] = {}
            for s in e.list_snapshots(v.name, with_usage=False):
                snaps[s.name] = stamps(e.read_snapshot(v.id, s.id, 0, NBLOCKS * BLOCK_SIZE))
        e.close()
    except Exception as ex:  # a damaged store: say where it failed, and how
        state = {"failed": stage, "error": f"{type(ex).__name__}: {ex}"[:400]}
    print(json.dumps(state))


def refdump(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    print(json.dumps({"problems": [], "vols": {"a": stamps(data)}, "snaps": {"a": {}}}))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
    elif sys.argv[1] in ("ref", "ref-nosync"):
        run_ref(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]),
                sys.argv[1] == "ref")
    elif sys.argv[1] == "refdump":
        refdump(sys.argv[2])
    else:
        dump(sys.argv[2])
