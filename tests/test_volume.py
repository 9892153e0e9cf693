"""The engine's semantics, one named test each (the model test covers them in combination)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import errors
from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE, DB_LIVE, DB_META
from snapdisk.store import StoreConfig

BS = BLOCK_SIZE
MiB = 1 << 20


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path / "store"), StoreConfig(pool_bytes=64 * MiB))
    yield e
    e.close()


def used(e: Engine) -> int:
    return int(e.usage()["store"]["used_bytes"])


def live_records(e: Engine, vol: int) -> list[tuple[int, int, int, int, int]]:
    with e.native.txn() as t:
        return [(struct.unpack(">IQ", k)[1], *struct.unpack("<IIQQ", v))
                for k, v in t.scan_prefix(DB_LIVE, struct.pack(">I", vol))]


def test_unwritten_reads_zero_and_is_a_hole(engine: Engine) -> None:
    v = engine.create_volume("v", 8 * MiB).id
    assert engine.read(v, 0, 8 * MiB) == bytes(8 * MiB)
    assert engine.block_status(v, 0, 8 * MiB) == [(0, 8 * MiB, False)]


def test_unaligned_io_read_modify_write(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 512, b"a" * 512)  # inside a hole: RMW with zeros
    engine.write(v, 3584, b"b" * 1024)  # straddles blocks 0 and 1
    expect = bytes(512) + b"a" * 512 + bytes(2560) + b"b" * 1024 + bytes(BS - 512)
    assert engine.read(v, 0, 2 * BS) == expect
    assert engine.read(v, 600, 10) == b"a" * 10


def test_sequential_write_is_a_handful_of_extents(engine: Engine) -> None:
    v = engine.create_volume("v", 32 * MiB).id
    for off in range(0, 16 * MiB, 64 * 1024):
        engine.write(v, off, b"s" * 64 * 1024)
    recs = live_records(engine, v)
    assert len(recs) == 4  # 4096 blocks in extents of at most 1024 blocks
    assert all(length == 1024 for _, length, _, _, _ in recs)


def test_redirect_on_write_copies_nothing_and_in_place_after(engine: Engine) -> None:
    v = engine.create_volume("v", 4 * MiB).id
    engine.write(v, 0, b"1" * MiB)
    before = used(engine)
    s = engine.create_snapshot("v")
    assert used(engine) == before  # a snapshot allocates nothing
    engine.write(v, 0, b"2" * BS)  # first write to a shared block: one new block, nothing copied
    assert used(engine) == before + BS
    pbn = live_records(engine, v)[0][3]
    engine.write(v, 0, b"3" * BS)  # the new block is the volume's own: rewritten in place
    assert used(engine) == before + BS and live_records(engine, v)[0][3] == pbn
    assert engine.read_snapshot(v, s.id, 0, BS) == b"1" * BS
    assert engine.read(v, 0, BS) == b"3" * BS


def test_blocks_no_snapshot_shares_are_rewritten_in_place(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 0, b"x" * BS)
    recs = live_records(engine, v)
    stats = engine.native.stats()
    engine.write(v, 0, b"y" * BS)
    assert live_records(engine, v) == recs
    assert engine.native.stats()["fast_writes"] == stats["fast_writes"] + 1


def test_rollback_keeps_earlier_and_later_snapshots(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 0, b"A" * BS)
    engine.create_snapshot("v", "s1")
    engine.write(v, 0, b"B" * BS)
    engine.create_snapshot("v", "s2")
    engine.write(v, 0, b"C" * BS)
    engine.create_snapshot("v", "s3")
    engine.rollback("v", "s2")
    assert engine.read(v, 0, BS) == b"B" * BS
    assert [s.name for s in engine.list_snapshots("v")] == ["s1", "s2", "s3"]
    engine.rollback("v", "s3")  # forward again, to a later snapshot
    assert engine.read(v, 0, BS) == b"C" * BS
    engine.rollback("v", "s1")
    assert engine.read(v, 0, BS) == b"A" * BS
    for name, want in (("s1", b"A"), ("s2", b"B"), ("s3", b"C")):
        assert engine.read_snapshot(v, engine.snapshot_id("v", name), 0, BS) == want * BS
    assert engine.check().ok


def test_clone_survives_deletion_of_its_source(engine: Engine) -> None:
    v = engine.create_volume("gold", 2 * MiB).id
    engine.write(v, 0, b"g" * 2 * MiB)
    engine.create_snapshot("gold", "s")
    before = used(engine)
    c = engine.clone("gold", "s", "copy").id
    assert used(engine) == before  # clones share every block
    assert engine.volume_info("copy").origin == {"volume": "gold", "volume_id": v, "snapshot": "s",
                                                 "snapshot_id": 1}
    engine.write(c, 0, b"c" * BS)
    engine.delete_snapshot("gold", "s")
    engine.delete_volume("gold")
    engine.flush()
    assert engine.read(c, 0, BS) == b"c" * BS
    assert engine.read(c, BS, 2 * MiB - BS) == b"g" * (2 * MiB - BS)
    assert used(engine) == 2 * MiB  # the source's blocks the clone no longer holds are freed
    assert engine.check().ok


def test_delete_frees_exactly_what_nothing_else_holds_and_space_is_reused(engine: Engine) -> None:
    v = engine.create_volume("v", 8 * MiB).id
    engine.write(v, 0, b"a" * 4 * MiB)
    engine.create_snapshot("v", "s")
    engine.write(v, 0, b"b" * MiB)  # 1 MiB only the snapshot holds now
    info = engine.snapshot_info("v", "s")
    assert info.exclusive_bytes == MiB and info.referenced_bytes == 4 * MiB
    before = used(engine)
    engine.delete_snapshot("v", "s")
    assert used(engine) == before - MiB
    engine.flush()  # freed blocks become reusable once the delete is durable
    hwm = engine.usage()["store"]
    engine.write(v, 6 * MiB, b"c" * MiB)
    assert engine.usage()["store"]["used_bytes"] == hwm["used_bytes"] + MiB
    with engine.native.txn() as t:
        hwm_blocks = struct.unpack("<QQ", t.get(DB_META, b"alloc") or b"")[0]
    assert hwm_blocks == 5 * MiB // BS  # the freed MiB was reused, the pool did not grow


def test_trim_frees_and_punches_the_pool(engine: Engine) -> None:
    v = engine.create_volume("v", 8 * MiB).id
    engine.write(v, 0, os.urandom(4 * MiB))
    engine.flush()
    on_disk = engine.usage()["store"]["pool_file_bytes"]
    engine.trim(v, 0, 4 * MiB)
    assert engine.read(v, 0, 4 * MiB) == bytes(4 * MiB)
    assert engine.block_status(v, 0, 4 * MiB) == [(0, 4 * MiB, False)]
    assert used(engine) == 0
    assert engine.usage()["store"]["pool_file_bytes"] <= on_disk - 4 * MiB


def test_trim_of_snapshot_blocks_keeps_them_for_the_snapshot(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 0, b"k" * MiB)
    s = engine.create_snapshot("v")
    engine.trim(v, 0, MiB)
    assert engine.read(v, 0, MiB) == bytes(MiB)
    assert engine.read_snapshot(v, s.id, 0, MiB) == b"k" * MiB


def test_zero_handles_partial_blocks(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 0, b"z" * 3 * BS)
    engine.zero(v, 1024, 2 * BS)
    assert engine.read(v, 0, 3 * BS) == b"z" * 1024 + bytes(2 * BS) + b"z" * (BS - 1024)
    # the whole block 1 became a hole; the partly zeroed edge blocks stay allocated
    assert engine.block_status(v, 0, 3 * BS) == [(0, BS, True), (BS, BS, False), (2 * BS, BS, True)]
    assert engine.read(v, BS, BS) == bytes(BS)


def test_full_pool_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    with Engine.create(str(tmp_path), StoreConfig(pool_bytes=256 * BS)) as e:
        v = e.create_volume("v", 4 * MiB).id
        e.write(v, 0, b"a" * 200 * BS)
        before = e.usage()
        with pytest.raises(errors.PoolFull):
            e.write(v, 200 * BS, b"b" * 100 * BS)
        assert e.usage() == before
        assert e.read(v, 200 * BS, 100 * BS) == bytes(100 * BS)
        assert e.check().ok


@pytest.mark.parametrize("size", [0, -512, 1000, 4097, 2**60])
def test_bad_sizes_are_refused(engine: Engine, size: int) -> None:
    with pytest.raises(errors.InvalidSize):
        engine.create_volume("v", size)
    assert engine.list_volumes() == []


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a@b", "x" * 65, "sp ace", "é"])
def test_bad_names_are_refused(engine: Engine, name: str) -> None:
    with pytest.raises(errors.InvalidName):
        engine.create_volume(name, MiB)
    engine.create_volume("ok", MiB)
    with pytest.raises(errors.InvalidName):
        engine.create_snapshot("ok", name or "@")
    with pytest.raises(errors.InvalidName):
        engine.clone("ok", "1", name or "@")


def test_unknown_and_duplicate_objects(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    with pytest.raises(errors.AlreadyExists):
        engine.create_volume("v", MiB)
    engine.create_snapshot("v", "s")
    with pytest.raises(errors.AlreadyExists):
        engine.create_snapshot("v", "s")
    with pytest.raises(errors.VolumeNotFound):
        engine.volume_info("nope")
    with pytest.raises(errors.SnapshotNotFound):
        engine.delete_snapshot("v", "nope")
    with pytest.raises(errors.SnapshotNotFound):
        engine.clone("v", "99", "c")
    with pytest.raises(errors.OutOfRange):
        engine.write(v, MiB - 512, bytes(1024))
    with pytest.raises(errors.OutOfRange):
        engine.read(v, MiB, 512)
    assert engine.volume_info("v").snapshots == 1 and engine.check().ok


def test_quota_manual_refused_automatic_replaces_oldest(tmp_path: Path) -> None:
    cfg = StoreConfig(pool_bytes=16 * MiB, manual_snapshot_quota=2, auto_snapshot_quota=3)
    with Engine.create(str(tmp_path), cfg) as e:
        e.create_volume("v", MiB)
        e.create_snapshot("v", "m1")
        e.create_snapshot("v", "m2")
        with pytest.raises(errors.QuotaExceeded):
            e.create_snapshot("v", "m3")
        for i in range(5):
            e.create_snapshot("v", f"a{i}", kind="auto", policy="hourly")
        names = [s.name for s in e.list_snapshots("v")]
        assert names == ["m1", "m2", "a2", "a3", "a4"]
        assert e.snapshot_info("v", "a4").policy == "hourly"
        assert e.check().ok


def test_resize_grows_and_refuses_to_shrink(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 0, b"r" * BS)
    engine.create_snapshot("v", "small")
    engine.resize_volume("v", 2 * MiB)
    engine.write(v, 2 * MiB - BS, b"e" * BS)
    with pytest.raises(errors.InvalidSize):
        engine.resize_volume("v", MiB)
    assert engine.snapshot_info("v", "small").size_bytes == MiB
    engine.rollback("v", "small")  # rollback restores the snapshot's size
    assert engine.volume_info("v").size_bytes == MiB


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with Engine.create(path, StoreConfig(pool_bytes=16 * MiB)) as e:
        v = e.create_volume("v", MiB).id
        e.write(v, 0, b"p" * BS)
        e.create_snapshot("v", "s")
        e.write(v, 0, b"q" * BS)
    with Engine.open(path) as e:
        assert e.read(v, 0, BS) == b"q" * BS
        assert e.read_snapshot(v, e.snapshot_id("v", "s"), 0, BS) == b"p" * BS
        assert e.check().ok
