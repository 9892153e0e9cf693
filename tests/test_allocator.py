"""The allocator alone: next-fit allocation, PENDING until durable, coalescing, shared runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import allocator, errors, layout
from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE, DB_FREE, DB_PENDING, DB_REFS, Txn
from snapdisk.store import StoreConfig

CAP = 64  # blocks


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path), StoreConfig(pool_bytes=CAP * BLOCK_SIZE))
    yield e
    e.close()


def free_runs(t: Txn) -> list[tuple[int, int]]:
    return [(layout.parse_pbn_key(k), layout.decode_u64(v, "free"))
            for k, v in t.scan(DB_FREE, b"")]


def test_fresh_space_is_contiguous_from_the_high_water_mark(engine: Engine) -> None:
    with engine.native.txn(write=True) as t:
        assert allocator.allocate(t, 5) == [(0, 5)]
        assert allocator.allocate(t, 3) == [(5, 3)]
        assert allocator.totals(t) == (8, CAP, 0, 0)


def test_freed_blocks_wait_in_pending_then_coalesce_into_free(engine: Engine) -> None:
    freed: list[tuple[int, int]] = []
    with engine.native.txn(write=True) as t:
        allocator.allocate(t, 10)
    with engine.native.txn(write=True) as t:
        allocator.release(t, 2, 2, freed)
        allocator.release(t, 6, 2, freed)
        seq = allocator.committed_seq(t)  # this transaction's seq, not yet committed
    assert freed == [(2, 2), (6, 2)] and seq == 1
    with engine.native.txn(write=True) as t:
        assert allocator.totals(t) == (10, CAP, 0, 4)
        assert free_runs(t) == []  # not reusable before the free is durable
        allocator.release(t, 4, 2, freed)  # a later seq
        assert allocator.release_pending(t, upto_seq=1) == 4
        assert free_runs(t) == [(2, 2), (6, 2)]
        assert allocator.release_pending(t) == 2
        assert free_runs(t) == [(2, 6)]  # coalesced with both neighbours
        assert allocator.totals(t) == (10, CAP, 6, 0)
        assert [(layout.parse_pending_key(k)) for k, _ in t.scan(DB_PENDING, b"")] == []


def test_next_fit_reuses_free_runs_before_fresh_space(engine: Engine) -> None:
    freed: list[tuple[int, int]] = []
    with engine.native.txn(write=True) as t:
        allocator.allocate(t, 10)
        allocator.release(t, 1, 2, freed)
        allocator.release(t, 5, 1, freed)
        allocator.release_pending(t)
        assert allocator.allocate(t, 2) == [(1, 2)]  # wrapped around from the hint (10)
        assert allocator.allocate(t, 2) == [(5, 1), (10, 1)]  # onwards from the hint (3)
        assert allocator.totals(t) == (11, CAP, 0, 0)


def test_shared_runs_free_only_with_their_last_holder(engine: Engine) -> None:
    freed: list[tuple[int, int]] = []
    with engine.native.txn(write=True) as t:
        allocator.allocate(t, 8)
        allocator.share(t, 2, 4)  # a second record holds blocks 2-5
        allocator.share(t, 4, 2)  # a third holds 4-5
        assert allocator.refs_of(t, 0, 8) == [(0, 2, 1), (2, 4, 2), (4, 6, 3), (6, 8, 1)]
        allocator.release(t, 2, 4, freed)  # the second goes: nothing is freed
        assert freed == []
        assert allocator.refs_of(t, 2, 4) == [(2, 4, 1), (4, 6, 2)]
        allocator.release(t, 0, 8, freed)  # the first: all but the third's blocks
        assert freed == [(0, 4), (6, 2)]
        allocator.release(t, 4, 2, freed)
        assert freed[-1] == (4, 2)
        assert list(t.scan(DB_REFS, b"")) == []


def test_a_full_pool_raises_and_the_transaction_changes_nothing(engine: Engine) -> None:
    with engine.native.txn(write=True) as t:
        allocator.allocate(t, CAP - 2)
    with pytest.raises(errors.PoolFull, match="3 more blocks"), engine.native.txn(write=True) as t:
        allocator.allocate(t, 3)
    with engine.native.txn() as t:
        assert allocator.totals(t) == (CAP - 2, CAP, 0, 0)


def test_damaged_allocator_records_are_corrupt(engine: Engine) -> None:
    with engine.native.txn(write=True) as t:
        allocator.allocate(t, 10)  # the next-fit hint is 10
        t.put(DB_FREE, layout.pbn_key(12), b"\1\2")
    with pytest.raises(errors.Corrupt, match="free run"), engine.native.txn(write=True) as t:
        allocator.allocate(t, 1)
