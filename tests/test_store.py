"""The store directory: creation (atomic, nothing left behind on failure), opening, locking,
format versions and the migration of older formats."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from snapdisk import errors, layout, store
from snapdisk.engine import Engine
from snapdisk.native import BLOCK_SIZE, DB_META, DB_VOLUMES, NativeStore
from snapdisk.store import DEFAULT_MAP_BYTES, StoreConfig, StoreDir

MiB = 1 << 20
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_format1  # noqa: E402


def unpack_format1(tmp_path: Path) -> str:
    path = tmp_path / "f1"
    with tarfile.open(FIXTURES / "format1-store.tar.gz") as tar:
        for m in tar.getmembers():  # only the two files it should hold (no path tricks)
            if m.name in ("meta/data.mdb", "pool.dat") and m.isfile():
                tar.extract(m, path)
    return str(path)


def meta_format(path: str, set_to: int | None = None) -> int:
    """The format record, read (or set) without migrating (StoreDir.open would migrate)."""
    native = NativeStore(os.path.join(path, "meta"), os.path.join(path, "pool.dat"), False,
                         False, DEFAULT_MAP_BYTES)
    try:
        with native.txn(write=set_to is not None) as t:
            if set_to is not None:
                t.put(DB_META, b"format", struct.pack("<I", set_to))
            return int(struct.unpack("<I", t.get(DB_META, b"format") or b"")[0])
    finally:
        native.close()


def test_format1_store_is_migrated_and_reads_back_what_was_written(tmp_path: Path) -> None:
    path = unpack_format1(tmp_path)
    assert meta_format(path) == 1
    want = make_format1.expected()
    with Engine.open(path) as e:
        report = e.check()
        assert report.ok, report.problems
        assert e.config.map_bytes == DEFAULT_MAP_BYTES
        with e.native.txn() as t:
            assert layout.decode_u32(t.get(DB_META, b"format"), "format") == layout.FORMAT_VERSION
            recs = [json.loads(v) for _, v in t.scan(DB_VOLUMES, b"")]
        assert len(recs) == 3 and all(r["encryption"] is None for r in recs)
        assert sorted(v.name for v in e.list_volumes()) == ["alpha", "beta", "gamma"]
        assert e.volume_info("gamma").origin is not None
        assert e.snapshot_info("beta", "h1").policy == "hourly"
        for key, content in want.items():
            vol, _, snap = key.partition("@")
            vid = e.volume_id(vol)
            if snap:
                got = e.read_snapshot(vid, e.snapshot_id(vol, snap), 0, len(content))
            else:
                got = e.read(vid, 0, len(content))
            assert got == content, key
        # the migrated store takes writes and snapshots as usual
        e.write(e.volume_id("alpha"), 0, b"n" * BLOCK_SIZE)
        e.create_snapshot("alpha", "after")
        e.delete_snapshot("alpha", "s1")
        assert e.check().ok
    assert meta_format(path) == layout.FORMAT_VERSION
    with Engine.open(path) as e:  # and reopens without migrating again
        assert e.read(e.volume_id("alpha"), 0, BLOCK_SIZE) == b"n" * BLOCK_SIZE


def test_a_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    path = unpack_format1(tmp_path)

    def half_then_fail(t: object) -> None:
        store._migrate_1_to_2(t)  # type: ignore[arg-type]
        raise errors.Corrupt("injected")

    monkeypatch.setitem(store.MIGRATIONS, 1, half_then_fail)
    with pytest.raises(errors.Corrupt, match="injected"):
        Engine.open(path)
    assert meta_format(path) == 1  # one transaction: all of the migration or none
    monkeypatch.undo()
    with Engine.open(path) as e:
        assert e.check().ok


def test_newer_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    Engine.create(path, StoreConfig(pool_bytes=16 * MiB)).close()
    for version in (layout.FORMAT_VERSION + 1, 0):
        meta_format(path, set_to=version)
        with pytest.raises(errors.FormatError, match=f"format {version}"):
            Engine.open(path)


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    Engine.create(path, StoreConfig(pool_bytes=16 * MiB)).close()
    sd = StoreDir.open(path)
    with sd.txn(write=True) as t:
        t.put(DB_META, b"format", struct.pack("<I", 99))
    sd.close()
    with pytest.raises(errors.FormatError, match="format 99"):
        Engine.open(path)


def test_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(errors.StoreNotFound, match="snapdisk init"):
        Engine.open(str(tmp_path / "nothing"))


def test_second_writer_process_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with Engine.create(path, StoreConfig(pool_bytes=16 * MiB)):
        code = f"from snapdisk.volume import Engine; Engine.open({path!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode != 0 and "StoreLocked" in out.stderr and "in use" in out.stderr
        with pytest.raises(errors.StoreLocked):  # and in this process too
            Engine.open(path)


RACER = """
import sys, time
from snapdisk import errors
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    e = Engine.create(sys.argv[1], StoreConfig(pool_bytes=16 << 20))
except (errors.AlreadyExists, errors.StoreLocked) as exc:
    print(type(exc).__name__)
    sys.exit(3)
e.create_volume(sys.argv[3], 1 << 20)
e.close()
print("created")
"""


@pytest.mark.parametrize("where", ["new", "existing"])
def test_concurrent_inits_exactly_one_wins(tmp_path: Path, where: str) -> None:
    path = tmp_path / "s"
    if where == "existing":
        path.mkdir()
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(start), f"v{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes.count(0) == 1, (codes, outs)
    assert all(c == 3 for c in codes if c != 0), outs
    assert all(o.strip() in ("AlreadyExists", "StoreLocked") for (o, _), c in zip(outs, codes)
               if c == 3)
    with Engine.open(str(path)) as e:  # the winner's store, not re-initialized by a loser
        assert [v.name for v in e.list_volumes()] == [f"v{codes.index(0)}"]
        assert e.check().ok


def test_an_init_that_lost_the_race_does_not_reinitialize(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving of issue 10 item 5, made deterministic: between our existence check
    and our lock, another init runs to completion (and writes a volume)."""
    path = str(tmp_path / "s")
    real_lock = StoreDir._lock
    raced = []

    def lock_after_another_init(lock_path: str) -> int:
        if not raced:
            raced.append(1)
            with Engine.create(path, StoreConfig(pool_bytes=16 * MiB)) as other:
                other.create_volume("theirs", MiB)
        return real_lock(lock_path)

    monkeypatch.setattr(StoreDir, "_lock", staticmethod(lock_after_another_init))
    with pytest.raises(errors.AlreadyExists):
        Engine.create(path, StoreConfig(pool_bytes=16 * MiB))
    monkeypatch.undo()
    with Engine.open(path) as e:
        assert [v.name for v in e.list_volumes()] == ["theirs"] and e.check().ok


def test_pool_size_zero_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new" / "s"
    with pytest.raises(errors.InvalidSize, match="too small"):
        Engine.create(str(path), StoreConfig(pool_bytes=0))
    assert not path.exists()


def test_failed_init_in_an_existing_directory_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    (path / "keep").write_text("x")
    for bad in (StoreConfig(pool_bytes=0), StoreConfig(pool_bytes=16 * MiB, map_bytes=12345)):
        with pytest.raises(errors.InvalidSize):
            Engine.create(str(path), bad)
        assert sorted(os.listdir(path)) == ["keep"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    Engine.create(str(path), StoreConfig(pool_bytes=16 * MiB)).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700  # on success only


def test_init_on_an_existing_store_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with Engine.create(path, StoreConfig(pool_bytes=16 * MiB)) as e:
        e.create_volume("v", MiB)
    with pytest.raises(errors.AlreadyExists):
        Engine.create(path, StoreConfig(pool_bytes=16 * MiB))
    with Engine.open(path) as e:
        assert [v.name for v in e.list_volumes()] == ["v"]


def test_map_size_is_chosen_at_init_and_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    Engine.create(path, StoreConfig(pool_bytes=16 * MiB, map_bytes=256 * MiB)).close()
    with Engine.open(path) as e:
        assert e.config.map_bytes == 256 * MiB
        # MDB_WRITEMAP sizes data.mdb to the map (sparse): the store's own size was used
        assert os.stat(os.path.join(path, "meta", "data.mdb")).st_size == 256 * MiB


def test_default_pool_is_the_free_space(tmp_path: Path) -> None:
    with Engine.create(str(tmp_path / "s")) as e:
        assert e.config.pool_bytes is not None and e.config.pool_bytes > 16 * BLOCK_SIZE


def test_config_round_trips_and_keeps_unknown_keys() -> None:
    c = StoreConfig(pool_bytes=MiB, sync_commits=True, manual_snapshot_quota=3,
                    auto_snapshot_quota=4, map_bytes=8 * MiB, extra={"future": [1]})
    assert StoreConfig.from_json(c.to_json()) == c
    with pytest.raises(errors.Corrupt, match="pool_bytes"):
        StoreConfig.from_json(b'{"pool_bytes": "x"}')
    with pytest.raises(errors.Corrupt, match="not JSON"):
        StoreConfig.from_json(b"{")
