"""The C redirect-on-write path (xm_write_row, native/xm_row.c) and its Python twin
(SNAPDISK_WRITE_PATH=python) leave byte-identical metadata: the same writes, snapshots and trims
on two stores, then every database of both dumped and compared."""

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
        vols = [e.create_volume(f"v{i}", VOL_BYTES).id for i in range(2)]
        for step in range(300):
            vol = rnd.choice(vols)
            r = rnd.random()
            if r < 0.05:
                e.create_snapshot(f"v{vols.index(vol)}", f"s{step}")
            elif r < 0.08:
                off = rnd.randrange(0, VOL_BYTES - BS)
                e.trim(vol, off, rnd.randrange(1, min(64 * BS, VOL_BYTES - off)))
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
    assert c_content == py_content
    for name in c_dump:
        assert c_dump[name] == py_dump[name], f"database {name} differs"
