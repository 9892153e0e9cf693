"""The integrity check finds each kind of damage done to a store on purpose."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from snapdisk import errors, layout
from snapdisk.check import CheckReport
from snapdisk.native import (
    BLOCK_SIZE,
    DB_COUNTERS,
    DB_DEAD,
    DB_DEADIDX,
    DB_FREE,
    DB_LIVE,
    DB_LIVEBIRTH,
    DB_META,
    DB_NAMES,
    DB_PENDING,
    DB_REFS,
    DB_SNAPS,
    DB_VOLSTATE,
    DB_VOLUMES,
    Txn,
)
from snapdisk.store import StoreConfig, StoreDir
from snapdisk.volume import Engine

BS = BLOCK_SIZE


def make_store(path: Path) -> None:
    with Engine.create(str(path), StoreConfig(pool_bytes=1024 * BS)) as e:
        a = e.create_volume("a", 64 * BS).id
        e.write(a, 0, b"a" * 16 * BS)
        e.create_snapshot("a", "s1")
        e.write(a, 4 * BS, b"b" * 4 * BS)  # dead records for s1
        e.create_snapshot("a", "s2")
        e.clone("a", "s1", "c")
        e.create_volume("z", 8 * BS)
        e.write(e.volume_id("z"), 0, b"z" * 2 * BS)
        e.trim(e.volume_id("z"), BS, BS)
        e.flush()
        assert e.check().ok, e.check().problems


def first(t: Txn, db: int, prefix: bytes = b"") -> tuple[bytes, bytes]:
    for k, v in t.scan_prefix(db, prefix):
        return k, v
    raise AssertionError("nothing to damage")


Z = struct.pack(">I", 3)  # volume z: ids go a=1, c=2 (the clone), z=3


def leak_a_block(t: Txn) -> None:
    k, v = first(t, DB_LIVE, Z)
    t.delete(DB_LIVE, k)


def double_own(t: Txn) -> None:
    _, v = first(t, DB_LIVE, Z)
    t.put(DB_LIVE, struct.pack(">IQ", 1, 60), v)  # volume a, block 60, z's blocks


def point_past_pool(t: Txn) -> None:
    k, v = first(t, DB_LIVE, Z)
    length, flags, pbn, birth = layout.REC.unpack(v)
    t.put(DB_LIVE, k, layout.REC.pack(length, flags, 10_000, birth))


def drop_snapshot_record(t: Txn) -> None:
    k, _ = first(t, DB_SNAPS, struct.pack(">I", 1))
    t.delete(DB_SNAPS, k)


def dangling_name(t: Txn) -> None:
    t.put(DB_NAMES, b"s" + struct.pack(">I", 1) + b"ghost", struct.pack(">Q", 99))


def counter_drift(t: Txn) -> None:
    k, v = first(t, DB_COUNTERS, struct.pack(">I", 1))
    t.put(DB_COUNTERS, k, struct.pack("<Q", struct.unpack("<Q", v)[0] + 1))


def free_a_held_block(t: Txn) -> None:
    _, v = first(t, DB_LIVE, Z)
    pbn = layout.REC.unpack(v)[2]
    t.put(DB_FREE, struct.pack(">Q", pbn), struct.pack("<Q", 1))


def unflag_shared(t: Txn) -> None:
    for k, v in t.scan_prefix(DB_LIVE, struct.pack(">I", 2)):  # the clone: all SHARED
        length, flags, pbn, birth = layout.REC.unpack(v)
        t.put(DB_LIVE, k, layout.REC.pack(length, 0, pbn, birth))
        return


def orphan_dead_record(t: Txn) -> None:
    _, v = first(t, DB_DEAD, struct.pack(">I", 1))
    t.put(DB_DEAD, struct.pack(">IQQ", 1, 60, 1), v)


DAMAGE: dict[str, tuple[Callable[[Txn], None], str]] = {
    "leak": (leak_a_block, "leaked"),
    "double-owned": (double_own, "held by 2 records"),
    "out-of-range": (point_past_pool, "high-water mark"),
    "snapshot-record-gone": (drop_snapshot_record, "needed by no snapshot"),
    "dangling-name": (dangling_name, "points at no snapshot"),
    "counter-drift": (counter_drift, "counter"),
    "free-and-held": (free_a_held_block, "held and also free"),
    "orphan-dead": (orphan_dead_record, "missing from the dead index"),
    "unflagged-shared": (unflag_shared, "not flagged SHARED"),
}


def damaged_report(path: Path, damage: Callable[[Txn], None]) -> CheckReport:
    make_store(path)
    sd = StoreDir.open(str(path))
    try:
        with sd.txn(write=True) as t:
            damage(t)
    finally:
        sd.close()
    with Engine.open(str(path)) as e:
        return e.check()


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_check_reports_damage(tmp_path: Path, kind: str) -> None:
    damage, phrase = DAMAGE[kind]
    report = damaged_report(tmp_path, damage)
    assert not report.ok
    assert any(phrase in p for p in report.problems), report.problems


def test_clean_store_passes(tmp_path: Path) -> None:
    make_store(tmp_path)
    with Engine.open(str(tmp_path)) as e:
        report = e.check()
    assert report.ok, report.problems
    assert report.stats["live_records"] > 0 and report.stats["dead_records"] > 0


def unreadable_volume_record(t: Txn) -> None:
    k, _ = first(t, DB_VOLUMES)
    t.put(DB_VOLUMES, k, b'{"name": 7')


def short_live_record(t: Txn) -> None:
    k, v = first(t, DB_LIVE, Z)
    t.put(DB_LIVE, k, v[:-1])


def short_snapshot_key(t: Txn) -> None:
    k, v = first(t, DB_SNAPS)
    t.put(DB_SNAPS, k[:-1], v)


UNREADABLE: dict[str, tuple[Callable[[Txn], None], str]] = {
    "volume-json": (unreadable_volume_record, "cannot read volume 1 record: not JSON"),
    "live-size": (short_live_record, "cannot read volume z: live record at block 0"),
    "snapshot-key": (short_snapshot_key, "cannot read snapshot key"),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_check_reports_records_it_cannot_read(tmp_path: Path, kind: str) -> None:
    damage, phrase = UNREADABLE[kind]
    report = damaged_report(tmp_path, damage)
    assert any(phrase in p for p in report.problems), report.problems
    assert errors.Corrupt.exit_code == 10  # what `snapdisk check` exits with when not ok


ALL_DBS = [DB_META, DB_VOLUMES, DB_VOLSTATE, DB_NAMES, DB_SNAPS, DB_LIVE, DB_LIVEBIRTH, DB_DEAD,
           DB_DEADIDX, DB_REFS, DB_FREE, DB_PENDING, DB_COUNTERS]


@pytest.mark.parametrize("seed", range(int(os.environ.get("FUZZ_SEEDS", "8"))))
def test_random_damage_in_every_database_is_reported_never_a_traceback(tmp_path: Path,
                                                                       seed: int) -> None:
    """Random bytes in one record of each database in turn (value or key): opening the store
    refuses with Corrupt (exit 10) or FormatError, or check reports the damage; nothing else
    is raised."""
    rng = random.Random(seed)
    for db in ALL_DBS:
        path = tmp_path / f"db{db}"  # made afresh: a copy of data.mdb would not be sparse
        make_store(path)
        sd = StoreDir.open(str(path))
        try:
            with sd.txn(write=True) as t:
                items = list(t.scan(db, b""))
                if not items:
                    continue
                k, v = rng.choice(items)
                junk = v
                while len(junk) == len(v):  # a value of the right size may be a valid one
                    junk = rng.randbytes(rng.randrange(1, 48))
                if rng.random() < 0.7:
                    t.put(db, k, junk)
                else:
                    t.delete(db, k)
                    t.put(db, junk, v)
        finally:
            sd.close()
        try:
            with Engine.open(str(path)) as e:
                report = e.check()
        except (errors.Corrupt, errors.FormatError):  # exit 10, or 9 for a lost format record
            continue
        assert not report.ok, (db, k, junk)
