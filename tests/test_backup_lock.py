"""Repository locks (backup_lock.py) against the real radosgw the tests start: shared locks
coexist, an exclusive one excludes every other, abandoned locks are ignored and swept by prune,
a held lock is refreshed, a lock that could not be refreshed stops its holder; and the commands
themselves: prune refuses to run beside a backup (which would otherwise lose chunks the backup
is about to name), a backup and a restore refuse to run beside a prune."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from snapdisk import backup, backup_lock, backup_restore, errors
from snapdisk.engine import Engine
from snapdisk.s3 import Bucket
from snapdisk.store import StoreConfig

pytest_plugins = ["s3_fixture"]

MiB = 1 << 20


def bucket(url: str) -> Bucket:
    b = Bucket(url)
    b.ensure_bucket()
    return b


def refused(b: Bucket, kind: str, match: str) -> None:
    """Taking a lock of KIND fails with Busy naming the holder, and leaves no object."""
    before = names(b)
    with pytest.raises(errors.Busy, match=match):
        backup_lock.hold(b, kind, "taker").__enter__()
    assert names(b) == before


def names(b: Bucket) -> list[str]:
    return sorted(n for n, _, _ in b.list(backup_lock.LOCKS_DIR))


def test_shared_locks_coexist_exclusive_excludes(s3_url: str) -> None:
    b = bucket(s3_url)
    with backup_lock.hold(b, backup_lock.SHARED, "backup of a@1"):
        with backup_lock.hold(b, backup_lock.SHARED, "restore of a@1"):
            assert len(names(b)) == 2
            refused(b, backup_lock.EXCLUSIVE, r"backup of a@1|restore of a@1")
        assert len(names(b)) == 1
    with backup_lock.hold(b, backup_lock.EXCLUSIVE, "prune"):
        refused(b, backup_lock.SHARED, "prune")
        refused(b, backup_lock.EXCLUSIVE, "prune")
    assert names(b) == []


def test_abandoned_lock_is_ignored(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b = bucket(s3_url)
    dead = backup_lock.Lock(b, backup_lock.SHARED, "backup killed by -9")
    dead._write()  # taken, never released: its holder died
    monkeypatch.setattr(backup_lock, "STALE", 2.0)
    refused(b, backup_lock.EXCLUSIVE, "backup killed by -9")
    time.sleep(3.5)  # S3's LastModified has one-second resolution
    with backup_lock.hold(b, backup_lock.EXCLUSIVE, "prune") as lk:
        assert lk.abandoned == [dead.name]


def test_held_lock_is_refreshed(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b = bucket(s3_url)
    monkeypatch.setattr(backup_lock, "STALE", 3.0)
    monkeypatch.setattr(backup_lock, "REFRESH", 0.5)
    with backup_lock.hold(b, backup_lock.SHARED, "a long backup") as lk:
        time.sleep(5)
        lk.ensure()  # refreshed all along
        refused(b, backup_lock.EXCLUSIVE, "a long backup")


def test_lost_lock_stops_its_holder(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b = bucket(s3_url)
    monkeypatch.setattr(backup_lock, "STALE", 2.0)
    monkeypatch.setattr(backup_lock, "REFRESH", 100.0)  # never refreshed in this test
    with backup_lock.hold(b, backup_lock.SHARED, "backup of a@1") as lk:
        lk.ensure()
        time.sleep(1.2)
        with pytest.raises(errors.ServerError, match="lost the lock"):
            lk.ensure()


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine.create(str(tmp_path / "s"), StoreConfig(pool_bytes=128 * MiB))
    e.create_volume("v", 8 * MiB)
    vol = e.volume_id("v")
    e.write(vol, 0, random.Random(1).randbytes(3 * MiB))
    e.create_snapshot("v", "s1")
    return e


def test_commands_refuse_to_run_beside_prune(engine: Engine, s3_url: str,
                                             tmp_path: Path) -> None:
    try:
        backup.backup(engine, "v", "s1", s3_url)
        b = Bucket(s3_url)
        with backup_lock.hold(b, backup_lock.EXCLUSIVE, "prune"):
            engine.create_snapshot("v", "s2")
            with pytest.raises(errors.Busy, match="prune"):
                backup.backup(engine, "v", "s2", s3_url)
            with pytest.raises(errors.Busy, match="prune"):
                backup_restore.restore(engine, s3_url, "v", "s1", "copy")
            with pytest.raises(errors.Busy, match="prune"):
                backup.verify(s3_url, "v", "s1")
        assert "copy" not in {v.name for v in engine.list_volumes()}
        assert names(b) == []
        backup.backup(engine, "v", "s2", s3_url)  # the lock is gone: it runs
    finally:
        engine.close()


def test_prune_refuses_to_run_beside_a_backup(engine: Engine, s3_url: str) -> None:
    """The race this lock exists for: a backup in progress (chunks uploaded, manifest not yet
    written) and a prune that would delete those chunks as unreferenced."""
    try:
        backup.backup(engine, "v", "s1", s3_url)
        b = Bucket(s3_url)
        with backup_lock.hold(b, backup_lock.SHARED, "backup of v@s2"), \
                pytest.raises(errors.Busy, match=r"backup of v@s2"):
            backup.prune(s3_url, keep_last=0)
        assert backup.list_backups(s3_url)  # nothing was pruned
        # an abandoned lock does not block prune for ever, and prune sweeps it
        dead = backup_lock.Lock(b, backup_lock.SHARED, "backup killed by -9")
        dead._write()
        old = backup_lock.STALE
        backup_lock.STALE = 1.0
        try:
            time.sleep(2.5)
            out = backup.prune(s3_url, keep_last=1)
        finally:
            backup_lock.STALE = old
        assert out["deleted_locks"] == 1 and names(b) == []
    finally:
        engine.close()
