"""The C routines and their plain-Python twins agree on random inputs (hypothesis)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapdisk import bulk, extmap_ref, native
from snapdisk.engine import Engine
from snapdisk.errors import Corrupt
from snapdisk.native import BLOCK_SIZE, HOLE, Extent
from snapdisk.store import StoreConfig


@st.composite
def extent_lists(draw: st.DrawFn, max_len: int = 40) -> list[Extent]:
    """Sorted, disjoint records: random gaps and lengths; pbns often contiguous so merges
    happen; a few births and flags so merge rules are exercised."""
    n = draw(st.integers(0, 12))
    out = []
    lba = draw(st.integers(0, 20))
    pbn = draw(st.integers(0, 1000))
    for _ in range(n):
        lba += draw(st.integers(0, 6))
        length = draw(st.integers(1, max_len))
        pbn = pbn if draw(st.booleans()) else draw(st.integers(0, 5000))
        out.append(Extent(lba, pbn, draw(st.integers(1, 3)), length, draw(st.sampled_from([0, 1]))))
        lba += length
        pbn += length
    return out


ranges = st.tuples(st.integers(0, 400), st.integers(1, 400))


@settings(max_examples=400, deadline=None)
@given(extent_lists(), ranges)
def test_plan_matches_reference(exts: list[Extent], rng: tuple[int, int]) -> None:
    lba, n = rng
    c = native.plan(exts, lba, n)
    assert c == extmap_ref.plan(exts, lba, n)
    assert sum(r.len for r in c) == n  # it covers the request exactly
    assert c[0].lba == lba


@settings(max_examples=400, deadline=None)
@given(extent_lists(), ranges)
def test_extents_match_reference(exts: list[Extent], rng: tuple[int, int]) -> None:
    lba, n = rng
    c = native.extents(exts, lba, n)
    assert c == extmap_ref.extents(exts, lba, n)
    assert all(a.pbn != b.pbn for a, b in zip(c, c[1:]))  # alternating


@settings(max_examples=600, deadline=None)
@given(extent_lists(), st.integers(0, 400), st.integers(1, 64), st.integers(0, 6000),
       st.integers(1, 3), st.booleans(), st.sampled_from([8, 64, 1024]))
def test_insert_matches_reference(exts: list[Extent], lba: int, n: int, pbn: int, birth: int,
                                  hole: bool, max_len: int) -> None:
    # xm_insert is called with the records that overlap or touch the new extent
    old = [e for e in exts if e.lba <= lba + n and e.lba + e.len >= lba]
    new = Extent(lba, HOLE if hole else pbn, birth, n, 0)
    c_keep, c_gone = native.insert(old, new, max_len)
    p_keep, p_gone = extmap_ref.insert(old, new, max_len)
    assert (c_keep, c_gone) == (p_keep, p_gone)
    # and the result means what it should: the new view is old outside, new inside
    def view(recs: list[Extent]) -> dict[int, int]:
        return {r.lba + i: r.pbn + i for r in recs for i in range(r.len)}
    before, after = view(old), view(c_keep)
    for b in range(lba - 2, lba + n + 2):
        if lba <= b < lba + n:
            assert after.get(b) == (None if hole else pbn + b - lba)
            assert (b in before) == any(g.lba <= b < g.lba + g.len for g in c_gone)
        else:
            assert after.get(b) == before.get(b)


def test_corrupt_input_is_refused_by_both() -> None:
    overlapping = [Extent(0, 10, 1, 5, 0), Extent(3, 50, 1, 5, 0)]
    for f in (native.plan, extmap_ref.plan):
        with pytest.raises(Corrupt):
            f(overlapping, 0, 10)
    with pytest.raises(Corrupt):
        native.insert(overlapping, Extent(1, 5, 1, 1, 0))
    with pytest.raises(Corrupt):
        extmap_ref.insert(overlapping, Extent(1, 5, 1, 1, 0), 1024)


# ---- the bulk walks: C (native/xm_bulk.c) against their Python twins (bulk.py) -------------

MiB = 1 << 20


def _bulk_run(path: Path, seed: int) -> tuple[dict[str, list[tuple[bytes, bytes]]], bytes]:
    """A random workload of writes, snapshots, rollbacks, clones (shared blocks: REFS), snapshot
    and volume deletes, in chunks of 7 records; every database dumped at the end."""
    rnd = random.Random(seed)
    e = Engine.create(str(path), StoreConfig(pool_bytes=64 * MiB))
    size = 2 * MiB
    try:
        names = ["v0", "v1"]
        for n in names:
            e.create_volume(n, size)
        for step in range(400):
            name = rnd.choice(names)
            vol = e.volume_id(name)
            snaps = [s.name for s in e.list_snapshots(name, with_usage=False)]
            r = rnd.random()
            if r < 0.08:
                e.create_snapshot(name, f"s{step}")
            elif r < 0.12 and snaps:
                e.delete_snapshot(name, rnd.choice(snaps))
            elif r < 0.14 and snaps:
                e.rollback(name, rnd.choice(snaps))
            elif r < 0.18 and snaps and len(names) < 5:
                names.append(f"c{step}")
                e.clone(name, rnd.choice(snaps), names[-1])
            elif r < 0.20 and len(names) > 2:
                names.remove(name)
                e.delete_volume(name)
            else:
                blocks = rnd.choice([1, 1, 2, 5, 40, 200])
                off = rnd.randrange(0, size // BLOCK_SIZE - blocks) * BLOCK_SIZE
                e.write(vol, off, rnd.randbytes(8) * (blocks * BLOCK_SIZE // 8))
        content = b"".join(e.read(e.volume_id(n), 0, size) for n in names)
        with e.native.txn() as t:
            dump = {native.db_name(db): list(t.scan(db, b"")) for db in range(native.DB_COUNT)}
        assert e.check().ok
        return dump, content
    finally:
        e.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_c_and_python_bulk_walks_leave_identical_databases(
        tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # snapshot and volume stamps
    monkeypatch.setattr(bulk, "CHUNK", 7)  # many chunks per walk
    c_dump, c_content = _bulk_run(tmp_path / "c", seed)
    monkeypatch.setenv("SNAPDISK_BULK_PATH", "python")
    py_dump, py_content = _bulk_run(tmp_path / "py", seed)
    assert c_content == py_content
    assert sum(len(v) for v in c_dump.values()) > 100
    assert c_dump["refs"], "the workload must share blocks (clone, rollback)"
    for name in c_dump:
        assert c_dump[name] == py_dump[name], f"database {name} differs"
