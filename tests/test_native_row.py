"""The C redirect-on-write path (xm_write_row, native/xm_row.c) and its Python twin
(SNAPDISK_WRITE_PATH=python) leave byte-identical metadata: the same writes, snapshots, trims,
clones, rollbacks and snapshot deletes on two stores, then every database of both dumped and
compared."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from snapdisk.native import BLOCK_SIZE, DB_COUNT, db_name
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
MiB = 1 << 20
VOL_BYTES = 2 * MiB


def dump(e: Engine) -> dict[str, list[tuple[bytes, bytes]]]:
    with e.native.txn() as t:
        return {db_name(db): list(t.scan(db, b"")) for db in range(DB_COUNT)}


def run(path: Path, seed: int) -> tuple[dict[str, list[tuple[bytes, bytes]]], dict[str, int], bytes]:
    rnd = random.Random(seed)
    e = Engine.create(str(path), StoreConfig(pool_bytes=64 * MiB))
    try:
        names = [f"v{i}" for i in range(2)]
        vols = [e.create_volume(n, VOL_BYTES).id for n in names]
        snaps: dict[str, list[str]] = {n: [] for n in names}
        # First, SHARED blocks whose other holder goes: the origin's write releases its holds
        # (no snapshot of it is left), so the clone's write then frees the blocks (PENDING)
        e.write(vols[0], 0, b"o" * 8 * BS)
        e.create_snapshot(names[0], "t")
        names.append("t-clone")
        vols.append(e.clone(names[0], "t", "t-clone").id)
        snaps["t-clone"] = []
        e.delete_snapshot(names[0], "t")
        e.write(vols[0], 0, b"w" * 8 * BS)  # the whole record: the clone's is the last holder
        e.commit_batch()
        e.write(vols[-1], 2 * BS, b"c" * 4 * BS)
        e.commit_batch()
        for step in range(300):
            k = rnd.randrange(len(vols))
            vol, name = vols[k], names[k]
            r = rnd.random()
            if r < 0.05:
                e.create_snapshot(name, f"s{step}")
                snaps[name].append(f"s{step}")
            elif r < 0.08:
                off = rnd.randrange(0, VOL_BYTES - BS)
                e.trim(vol, off, rnd.randrange(1, min(64 * BS, VOL_BYTES - off)))
            elif r < 0.10 and snaps[name] and len(vols) < 5:
                # a clone, and below a rollback: their records are SHARED, so the writes that
                # follow go through the batch's release (ov_ent.release) in C and through
                # allocator.release in the twin
                names.append(f"c{step}")
                vols.append(e.clone(name, rnd.choice(snaps[name]), names[-1]).id)
                snaps[names[-1]] = []
            elif r < 0.12 and snaps[name]:
                e.rollback(name, rnd.choice(snaps[name]))
            elif r < 0.13 and snaps[name]:
                # the last holder but one gone: a later write frees its SHARED block
                e.delete_snapshot(name, snaps[name].pop(rnd.randrange(len(snaps[name]))))
            else:
                blocks = rnd.choice([1, 1, 1, 2, 3, 8, 40])
                off = rnd.randrange(0, VOL_BYTES // BS - blocks) * BS
                length = blocks * BS
                if rnd.random() < 0.3:  # unaligned: partial first and last blocks
                    off += rnd.randrange(1, BS)
                    length = min(length, VOL_BYTES - off) - rnd.randrange(0, BS)
                e.write(vol, off, rnd.randbytes(8) * (length // 8) + bytes(length % 8))
                # one group-commit batch per write, as the Python twin commits each write: a
                # batch of several writes kills neighbouring blocks as one dead record (the
                # same map, other bytes; tests/test_batch.py compares batched runs by content)
                e.commit_batch()
        content = b"".join(e.read(v, 0, VOL_BYTES) for v in vols)
        return dump(e), e.native.stats(), content
    finally:
        e.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_and_python_write_paths_leave_identical_map_records(
        tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # snapshot and volume stamps
    c_dump, c_stats, c_content = run(tmp_path / "c", seed)
    monkeypatch.setenv("SNAPDISK_WRITE_PATH", "python")
    py_dump, py_stats, py_content = run(tmp_path / "py", seed)
    assert c_stats["redirected_writes"] > 10 and py_stats["redirected_writes"] == 0
    # every write the in-place path declined was redirected in C, those over a clone's or a
    # rollback's SHARED records too: none went the Python way
    assert c_stats["redirected_writes"] == c_stats["slow_writes"]
    assert c_content == py_content
    for name in c_dump:
        assert c_dump[name] == py_dump[name], f"database {name} differs"
