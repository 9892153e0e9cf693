"""The extent map alone: overlay, kill (dead record or release), the (death, birth) window and
its counters, views at an epoch, and the range helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import allocator, catalog, extmap, layout
from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE, DB_LIVEBIRTH, HOLE, Extent, Txn
from snapdisk.store import StoreConfig


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path), StoreConfig(pool_bytes=1024 * BLOCK_SIZE))
    yield e
    e.close()


def new_vol(t: Txn) -> catalog.VolState:
    return catalog.new_volume(t, "v", 64 * BLOCK_SIZE, None, {})


def live(t: Txn, vs: catalog.VolState) -> list[Extent]:
    return t.live_overlap(vs.vol, 0, 64)


def test_overlay_splits_old_records_and_returns_what_it_covers(engine: Engine) -> None:
    with engine.native.txn(write=True) as t:
        vs = new_vol(t)
        assert extmap.overlay(t, vs, Extent(0, 100, 1, 8)) == []
        gone = extmap.overlay(t, vs, Extent(2, 200, 1, 3))
        assert gone == [Extent(2, 102, 1, 3)]
        assert live(t, vs) == [Extent(0, 100, 1, 2), Extent(2, 200, 1, 3), Extent(5, 105, 1, 3)]
        assert list(t.scan(DB_LIVEBIRTH, b"")) == []  # no snapshot: no birth index


def test_kill_keeps_what_a_snapshot_needs_and_releases_the_rest(engine: Engine) -> None:
    freed: list[tuple[int, int]] = []
    with engine.native.txn(write=True) as t:
        vs = new_vol(t)
        allocator.allocate(t, 16)
        vs.epoch, vs.max_snap, vs.nsnaps = 3, 2, 1  # snapshot 2 exists, writes are in 3
        vs.live_blocks = 8
        extmap.kill(t, vs, Extent(0, 0, 2, 4), freed)  # born by the snapshot: kept, dead at 3
        extmap.kill(t, vs, Extent(4, 4, 3, 4), freed)  # born after it: released
        assert freed == [(4, 4)] and vs.live_blocks == 0
        assert extmap.window(t, vs.vol, 3, 3, 0, 2) == [(3, 2, 0, 4)]
        assert extmap.counted_blocks(t, vs.vol, 0, layout.INFINITY, 0, layout.INFINITY) == 4
        assert extmap.dead_record(t, vs.vol, 0, 2) == Extent(0, 0, 2, 4)
        # the view of snapshot 2 sees the dead record; a later epoch does not
        assert extmap.view_at(t, vs.vol, 2, 0, 64) == [Extent(0, 0, 2, 4)]
        assert extmap.view_at(t, vs.vol, 3, 0, 64) == []
        e = extmap.drop_dead(t, vs.vol, 0, 2, 3)
        assert e == Extent(0, 0, 2, 4)
        assert extmap.counted_blocks(t, vs.vol, 0, layout.INFINITY, 0, layout.INFINITY) == 0
        assert extmap.window(t, vs.vol, 0, layout.INFINITY, 0, layout.INFINITY) == []


def test_window_selects_by_death_and_birth(engine: Engine) -> None:
    with engine.native.txn(write=True) as t:
        vs = new_vol(t)
        for lba, birth, death in ((0, 1, 2), (1, 1, 3), (2, 2, 3), (3, 2, 4), (4, 3, 4)):
            extmap.add_dead(t, vs.vol, Extent(lba, 100 + lba, birth, 1), death)
        got = extmap.window(t, vs.vol, 3, 3, 0, 2)
        assert sorted((lba, b, d) for d, b, lba, _ in got) == [(1, 1, 3), (2, 2, 3)]
        got = extmap.window(t, vs.vol, 3, 4, 2, 2)
        assert sorted((lba, b, d) for d, b, lba, _ in got) == [(2, 2, 3), (3, 2, 4)]
        assert extmap.counted_blocks(t, vs.vol, 3, 4, 2, 2) == 2


def test_birth_index_follows_live_records_while_snapshots_exist(engine: Engine) -> None:
    with engine.native.txn(write=True) as t:
        vs = new_vol(t)
        vs.nsnaps, vs.max_snap, vs.epoch = 1, 1, 2
        extmap.overlay(t, vs, Extent(0, 10, 2, 4))
        assert vs.flags & layout.VS_BIRTH_INDEXED
        assert list(extmap.live_ranges_born_after(t, vs, 1)) == [(0, 4)]
        assert list(extmap.live_ranges_born_after(t, vs, 2)) == []
        extmap.overlay(t, vs, Extent(0, HOLE, 0, 4))
        assert list(extmap.live_ranges_born_after(t, vs, 1)) == []


def test_copy_in_shares_blocks_and_flags_records(engine: Engine) -> None:
    with engine.native.txn(write=True) as t:
        vs = new_vol(t)
        allocator.allocate(t, 4)
        extmap.copy_in(t, vs, [Extent(8, 0, 1, 4)], 1)
        assert live(t, vs) == [Extent(8, 0, 1, 4, layout.F_SHARED)]
        assert vs.flags & layout.VS_SHARED and vs.live_blocks == 4
        assert allocator.refs_of(t, 0, 4) == [(0, 4, 2)]
        assert extmap.has_shared_blocks(t)


def test_range_helpers() -> None:
    assert extmap.merge_ranges([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert extmap.clip([Extent(0, 100, 1, 10), Extent(20, 200, 1, 5)], 5, 22) == [
        Extent(5, 105, 1, 5), Extent(20, 200, 1, 2)]


def test_intersect_ranges() -> None:
    """[lo, hi) overlaps (diff.py: the changed ranges where a view maps blocks)."""
    assert extmap.intersect_ranges([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    assert extmap.intersect_ranges([(5, 25)], [(20, 30), (0, 10)]) == [(5, 10), (20, 25)]
    assert extmap.intersect_ranges([(0, 4)], [(4, 8)]) == []
