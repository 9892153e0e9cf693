"""Costs asserted on counted work (key/value operations, map records read), never on time."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from snapdisk import native
from snapdisk.native import BLOCK_SIZE, Txn
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path), StoreConfig(pool_bytes=1 << 30))
    yield e
    e.close()


@contextmanager
def counted(e: Engine) -> Iterator[dict[str, int]]:
    """Counts the key/value operations of every transaction begun inside the block."""
    txns: list[Txn] = []
    real = e.native.txn

    def txn(write: bool = False) -> Txn:
        t = real(write)
        txns.append(t)
        return t

    e.native.txn = txn  # type: ignore[method-assign]
    out: dict[str, int] = {}
    try:
        yield out
    finally:
        e.native.txn = real  # type: ignore[method-assign]
        out["ops"] = sum(t.ops for t in txns)


def fill(e: Engine, vol: int, nblocks: int, scattered: bool, seed: int = 1) -> None:
    rng = random.Random(seed)
    if scattered:
        for b in rng.sample(range(nblocks * 4), nblocks):
            e.write(vol, b * BS, bytes([b % 250 + 1]) * BS)
    else:
        for b in range(0, nblocks, 256):
            n = min(256, nblocks - b)
            e.write(vol, b * BS, b"x" * n * BS)


def cost(e: Engine, f: Callable[[], Any]) -> int:
    """Key/value operations of f: Python's (every Txn) plus those of the C bulk walks."""
    before = native.bulk_ops()
    with counted(e) as c:
        f()
    return c["ops"] + native.bulk_ops() - before


def test_snapshot_create_work_does_not_grow_with_data(engine: Engine) -> None:
    small = engine.create_volume("small", 64 << 20).id
    big = engine.create_volume("big", 1 << 30).id
    fill(engine, small, 16, scattered=False)
    fill(engine, big, 8192, scattered=True)  # 32 MiB of scattered 4 KiB writes
    fill(engine, big, 32768, scattered=False)
    a = [cost(engine, lambda: engine.create_snapshot("small")) for _ in range(3)]
    b = [cost(engine, lambda: engine.create_snapshot("big")) for _ in range(3)]
    assert a == b, (a, b)


def test_live_read_work_does_not_grow_with_snapshots(engine: Engine) -> None:
    vol = engine.create_volume("v", 64 << 20).id
    rng = random.Random(5)
    order = list(range(2048))
    rng.shuffle(order)  # one record per block: shuffled writes never merge
    for b in order:
        engine.write(vol, b * BS, bytes([b % 250 + 1]) * BS)

    def read_cost() -> tuple[int, int]:
        # apply the group-commit overlay first: the map's cost, not the overlay's, and no
        # batch applied in the background (its scans count) while we measure
        engine.commit_batch()
        before = engine.native.stats()
        for off in range(0, 4 << 20, 1 << 20):
            engine.read(vol, off, 1 << 20)
        after = engine.native.stats()
        return (after["records_read"] - before["records_read"],
                after["cursor_steps"] - before["cursor_steps"])

    with_none = read_cost()
    for i in range(128):  # snapshots whose changes fall outside the range read
        engine.create_snapshot("v")
        engine.write(vol, (1024 + rng.randrange(1024)) * BS, bytes([i % 250 + 1]) * BS)
    assert read_cost() == with_none
    for i in range(127):  # and snapshots that each change blocks inside it
        engine.create_snapshot("v")
        for b in rng.sample(range(1024), 4):
            engine.write(vol, b * BS, bytes([i % 250 + 1]) * BS)
    assert engine.volume_info("v").snapshots == 255
    with_255 = read_cost()
    assert abs(with_255[0] - with_none[0]) <= with_none[0] * 0.05, (with_none, with_255)
    assert abs(with_255[1] - with_none[1]) <= with_none[1] * 0.05, (with_none, with_255)


def test_rollback_work_follows_changed_data_not_size(engine: Engine) -> None:
    costs = {}
    # The first rollback of a store meets an empty REFS table and costs less: warm up with one.
    for i, (size_mib, changed) in enumerate(((64, 64), (64, 64), (1024, 64), (1024, 640))):
        name = f"v{i}"
        vol = engine.create_volume(name, size_mib << 20).id
        fill(engine, vol, 16384, scattered=False)  # the first 64 MiB, whatever the size
        engine.create_snapshot(name, "s")
        rng = random.Random(3)
        for b in rng.sample(range(16384), changed):
            engine.write(vol, b * BS, b"y" * BS)
        costs[(size_mib, changed)] = cost(engine, lambda n=name: engine.rollback(n, "s"))
    # same change on a 16x larger volume: same work
    assert costs[(1024, 64)] <= costs[(64, 64)] * 1.2 + 20, costs
    # 10x the change: about 10x the work (linear, not worse)
    assert 5 * costs[(1024, 64)] <= costs[(1024, 640)] <= 15 * costs[(1024, 64)], costs


def test_snapshot_delete_work_follows_what_it_frees(engine: Engine) -> None:
    vol = engine.create_volume("v", 1 << 30).id
    fill(engine, vol, 65536, scattered=False)  # 256 MiB
    engine.create_snapshot("v", "a")
    for b in range(0, 64):
        engine.write(vol, b * 7 * BS, b"z" * BS)
    engine.create_snapshot("v", "b")
    for b in range(0, 640):
        engine.write(vol, b * 7 * BS + BS, b"z" * BS)
    engine.create_snapshot("v", "c")
    small = cost(engine, lambda: engine.delete_snapshot("v", "b"))  # frees the 64 blocks only b had
    big = cost(engine, lambda: engine.delete_snapshot("v", "a"))  # frees 64 + 640 blocks
    assert small < 64 * 20 and big >= 5 * small, (small, big)


# ---- the bulk walks (bulk.py, native/xm_bulk.c), on both paths --------------------------------

@pytest.fixture(params=["c", "python"])
def bulk_engine(request: pytest.FixtureRequest, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    if request.param == "python":
        monkeypatch.setenv("SNAPDISK_BULK_PATH", "python")
    e = Engine.create(str(tmp_path), StoreConfig(pool_bytes=1 << 30))
    yield e
    e.close()


def _changed_after_snapshot(e: Engine, name: str, size_mib: int, base_blocks: int,
                            older_snapshots: int, changed: int) -> None:
    """A volume of size_mib with base_blocks written, older_snapshots snapshots each changing
    8 blocks, then `changed` scattered blocks written, snapshot "s", the same blocks rewritten
    (so deleting s frees exactly them), snapshot "t", and `changed` blocks rewritten again."""
    vol = e.create_volume(name, size_mib << 20).id
    fill(e, vol, base_blocks, scattered=False)
    rng = random.Random(7)
    for i in range(older_snapshots):
        e.create_snapshot(name)
        for b in rng.sample(range(base_blocks), 8):
            e.write(vol, b * BS, bytes([i % 250 + 1]) * BS)
    blocks = rng.sample(range(base_blocks), changed)
    for b in blocks:
        e.write(vol, b * BS, b"b" * BS)
    e.create_snapshot(name, "s")
    for b in blocks:
        e.write(vol, b * BS, b"c" * BS)
    e.create_snapshot(name, "t")
    for b in rng.sample(range(base_blocks), changed):
        e.write(vol, b * BS, b"d" * BS)


def test_bulk_delete_work_follows_changes_not_size_or_snapshots(bulk_engine: Engine) -> None:
    e = bulk_engine
    costs = {}
    cases = ((0, 64, 0, 64), (1, 64, 0, 64), (2, 1024, 64, 64), (3, 1024, 64, 640))
    for i, size_mib, others, changed in cases:
        _changed_after_snapshot(e, f"v{i}", size_mib, 16384, others, changed)
        # deleting "s" frees what only s held: the blocks rewritten between s and t
        costs[(size_mib, others, changed)] = cost(e, lambda n=f"v{i}": e.delete_snapshot(n, "s"))
    base = costs[(64, 0, 64)]
    assert costs[(1024, 64, 64)] <= base * 1.2 + 40, costs  # 16x size, 64 more snapshots
    assert 5 * costs[(1024, 64, 64)] <= costs[(1024, 64, 640)] <= 15 * costs[(1024, 64, 64)], costs
    assert e.check().ok


def test_bulk_rollback_work_ignores_older_snapshots(bulk_engine: Engine) -> None:
    e = bulk_engine
    costs = {}
    for i, others in enumerate((0, 0, 64)):
        _changed_after_snapshot(e, f"v{i}", 256, 16384, others, 64)
        costs[i] = cost(e, lambda n=f"v{i}": e.rollback(n, "t"))
    assert costs[2] <= costs[1] * 1.2 + 40, costs
    assert e.check().ok


def test_bulk_volume_delete_work_follows_records_not_size(bulk_engine: Engine) -> None:
    e = bulk_engine
    costs = {}
    for i, (size_mib, blocks) in enumerate(((64, 640), (64, 640), (1024, 640), (1024, 6400))):
        vol = e.create_volume(f"v{i}", size_mib << 20).id
        fill(e, vol, blocks, scattered=True, seed=i)  # one record per block
        costs[(size_mib, blocks)] = cost(e, lambda n=f"v{i}": e.delete_volume(n))
    assert costs[(1024, 640)] <= costs[(64, 640)] * 1.2 + 40, costs
    assert 5 * costs[(1024, 640)] <= costs[(1024, 6400)] <= 15 * costs[(1024, 640)], costs
    assert e.check().ok
