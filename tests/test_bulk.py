"""Bulk walks in bounded chunks (bulk.py, native/xm_bulk.c): the mark makes the effect visible
at once, the chunks leave room for other I/O, an interrupted walk is finished at open, and the
store checks clean after every step.  Each test runs on the C path and on the Python twins."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import bulk, bulk_pace, errors, layout
from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig

BS = BLOCK_SIZE
MiB = 1 << 20


class Crash(Exception):
    """Stands for a crash between two chunks: the walk stops with its work marked."""


@pytest.fixture(params=["c", "python"])
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if request.param == "python":
        monkeypatch.setenv("SNAPDISK_BULK_PATH", "python")
    monkeypatch.setattr(bulk, "CHUNK", 16)
    monkeypatch.setattr(bulk_pace, "GROWTH", 1)  # these tests count chunks of 16
    Engine.create(str(tmp_path), StoreConfig(pool_bytes=256 * MiB)).close()
    yield tmp_path


def scattered(e: Engine, vol: int, n: int, fill: bytes, seed: int = 1) -> list[int]:
    blocks = random.Random(seed).sample(range(1024), n)
    for b in blocks:
        e.write(vol, b * BS, fill * BS)
    return blocks


def pending(e: Engine) -> list[bulk.Item]:
    with e.native.txn() as t:
        return bulk.pending(t)


def crash_after(chunks: int) -> tuple[list[tuple[int, int]], object]:
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) > chunks:
            raise Crash()
    return calls, progress


def test_snapshot_delete_in_chunks_reports_progress_and_frees(store: Path) -> None:
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        scattered(e, vol, 200, b"a")
        e.create_snapshot("v", "s")
        scattered(e, vol, 200, b"b")  # the same blocks: s alone holds the old ones
        e.create_snapshot("v", "t")
        calls: list[tuple[int, int]] = []
        e.delete_snapshot("v", "s", progress=lambda d, t: calls.append((d, t)))
        assert len(calls) >= 200 // 16, calls  # one report per chunk at least
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)
        assert calls[-1][0] == calls[-1][1]
        assert pending(e) == []
        assert [s.name for s in e.list_snapshots("v")] == ["t"]
        with e.native.txn() as t:
            assert not list(t.scan_prefix(layout.DB_DEAD, layout.vol_key(vol)))
        assert e.check().ok


def test_interrupted_snapshot_delete_is_invisible_and_finished_at_open(store: Path) -> None:
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        scattered(e, vol, 300, b"a")
        e.create_snapshot("v", "s")
        scattered(e, vol, 300, b"b")
        e.create_snapshot("v", "t")
        t_content = e.read_snapshot(vol, e.snapshot_id("v", "t"), 0, 4 * MiB)
        _, progress = crash_after(2)
        with pytest.raises(Crash):
            e.delete_snapshot("v", "s", progress=progress)  # type: ignore[arg-type]
        assert [i["op"] for i in pending(e)] == ["drop_window"]
        assert [s.name for s in e.list_snapshots("v")] == ["t"]  # gone at once
        with pytest.raises(errors.SnapshotNotFound):
            e.snapshot_id("v", "s")
        e.create_snapshot("v", "s")  # the name is free at once
        # Other I/O and reads of the remaining snapshot go on meanwhile.
        assert e.read_snapshot(vol, e.snapshot_id("v", "t"), 0, 4 * MiB) == t_content
        e.write(vol, 0, b"c" * BS)
    with Engine.open(str(store)) as e:  # open finishes the walk
        assert pending(e) == []
        assert e.check().ok
        assert e.read_snapshot(vol, e.snapshot_id("v", "t"), 0, 4 * MiB) == t_content


def test_cancelled_delete_stops_between_chunks_consistently(store: Path) -> None:
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        scattered(e, vol, 300, b"a")
        e.create_snapshot("v", "s")
        scattered(e, vol, 300, b"b")
        e.create_snapshot("v", "t")
        calls = []

        def cancel() -> bool:
            calls.append(1)
            return len(calls) > 3
        with pytest.raises(errors.Cancelled, match="next bulk operation or the next open"):
            e.delete_snapshot("v", "s", cancel=cancel)
        assert pending(e)
        assert e.check().ok  # check finishes marked work first
        assert pending(e) == []
        with pytest.raises(errors.Cancelled, match="nothing was changed"):
            e.delete_snapshot("v", "t", cancel=lambda: True)
        assert [s.name for s in e.list_snapshots("v")] == ["t"]


def test_interrupted_rollback_refuses_the_volume_until_finished(store: Path) -> None:
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        other = e.create_volume("w", 4 * MiB).id
        scattered(e, vol, 300, b"a")
        e.create_snapshot("v", "s")
        want = e.read(vol, 0, 4 * MiB)
        scattered(e, vol, 300, b"b", seed=2)
        e.create_snapshot("v", "t")
        scattered(e, vol, 100, b"c", seed=3)
        _, progress = crash_after(2)
        with pytest.raises(Crash):
            e.rollback("v", "s", progress=progress)  # type: ignore[arg-type]
        assert [i["op"] for i in pending(e)] == ["rollback"]
        with pytest.raises(errors.SnapdiskError):
            e.read(vol, 0, BS)  # the half-restored volume is not readable
        for op in (lambda: e.create_snapshot("v"), lambda: e.delete_snapshot("v", "t"),
                   lambda: e.rollback("v", "t"), lambda: e.delete_volume("v")):
            with pytest.raises(errors.Busy):
                op()
        e.write(other, 0, b"o" * BS)  # other volumes go on
    with Engine.open(str(store)) as e:
        assert pending(e) == []
        assert e.read(vol, 0, 4 * MiB) == want
        assert [s.name for s in e.list_snapshots("v")] == ["s", "t"]
        assert e.check().ok


def test_rollback_in_chunks_equals_the_snapshot(store: Path) -> None:
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        scattered(e, vol, 500, b"a")
        e.create_snapshot("v", "s")
        want = e.read(vol, 0, 4 * MiB)
        scattered(e, vol, 400, b"b", seed=2)
        e.write(vol, 0, b"x" * 64 * BS)  # a long record too
        calls: list[tuple[int, int]] = []
        e.rollback("v", "s", progress=lambda d, t: calls.append((d, t)))
        assert len(calls) > 3 and calls[-1][0] == calls[-1][1]
        assert e.read(vol, 0, 4 * MiB) == want
        assert e.check().ok


def test_volume_delete_name_free_at_once_and_finished_at_open(store: Path) -> None:
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        scattered(e, vol, 300, b"a")
        e.create_snapshot("v", "s")
        scattered(e, vol, 300, b"b", seed=2)
        _, progress = crash_after(2)
        with pytest.raises(Crash):
            e.delete_volume("v", progress=progress)  # type: ignore[arg-type]
        assert [v.name for v in e.list_volumes()] == []
        assert e.create_volume("v", MiB).id != vol  # ids are never reused
        with pytest.raises(errors.SnapdiskError):
            e.read(vol, 0, BS)
    with Engine.open(str(store)) as e:
        assert pending(e) == []
        assert e.check().ok
        with e.native.txn() as t:
            for db in (layout.DB_LIVE, layout.DB_DEAD):
                assert not list(t.scan_prefix(db, layout.vol_key(vol)))


def test_io_goes_on_between_chunks(store: Path) -> None:
    """No transaction or gate is held between chunks: a write from the progress callback (on
    the same thread) would deadlock or fail if one were."""
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        other = e.create_volume("w", 4 * MiB).id
        scattered(e, vol, 300, b"a")
        e.create_snapshot("v", "s")
        scattered(e, vol, 300, b"b")
        e.create_snapshot("w", "ws")
        n = [0]

        def progress(done: int, total: int) -> None:
            n[0] += 1
            e.write(other, n[0] * BS, b"w" * BS)  # redirected: a write transaction
            assert e.read(other, n[0] * BS, BS) == b"w" * BS
        e.delete_snapshot("v", "s", progress=progress)
        e.delete_volume("v", progress=progress)
        assert n[0] > 10
        assert e.check().ok


def test_interrupted_clone_is_refused_until_finished_at_open(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "CLONE_STEP", 64)  # many steps
    with Engine.open(str(store)) as e:
        vol = e.create_volume("v", 4 * MiB).id
        scattered(e, vol, 300, b"a")
        e.create_snapshot("v", "s")
        want = e.read(vol, 0, 4 * MiB)
        scattered(e, vol, 300, b"b", seed=2)
        _, progress = crash_after(2)
        with pytest.raises(Crash):
            e.clone("v", "s", "c", progress=progress)  # type: ignore[arg-type]
        cid = e.volume_id("c")
        with pytest.raises(errors.SnapdiskError):
            e.read(cid, 0, BS)  # not readable until the copy ends
        for op in (lambda: e.create_snapshot("c"), lambda: e.delete_snapshot("v", "s")):
            with pytest.raises(errors.Busy):
                op()
    with Engine.open(str(store)) as e:
        assert pending(e) == []
        assert e.read(cid, 0, 4 * MiB) == want
        e.delete_snapshot("v", "s")  # the clone keeps its blocks
        assert e.read(cid, 0, 4 * MiB) == want
        assert e.check().ok
