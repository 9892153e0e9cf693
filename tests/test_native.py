"""The C core's store handle: the layout constants it exports, the LMDB map size (full, then
grown), and damaged records answered with Corrupt instead of a crash."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import errors, native
from snapdisk.native import BLOCK_SIZE, DB_LIVE, DB_META, DB_VOLSTATE, NativeStore
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
MiB = 1 << 20


def test_layout_sizes_match_the_python_encodings() -> None:
    lib = native.lib
    assert struct.calcsize("<IIQQ") == lib.XM_REC_LEN
    assert struct.calcsize("<QQQQII") == lib.XM_VOLSTATE_LEN
    assert struct.calcsize(">IQ") == lib.XM_LIVE_KEY_LEN
    assert struct.calcsize(">IQQ") == lib.XM_TRIPLE_KEY_LEN
    assert struct.calcsize(">IQQQ") == lib.XM_DEADIDX_KEY_LEN
    assert native.DB_COUNT <= lib.XM_DB_MAX
    names = [native.db_name(db) for db in range(native.DB_COUNT)]
    assert names[:3] == ["meta", "volumes", "volstate"] and len(set(names)) == len(names)
    with pytest.raises(ValueError):
        native.db_name(native.DB_COUNT)


@pytest.fixture
def small_map(tmp_path: Path) -> Iterator[NativeStore]:
    os.makedirs(tmp_path / "meta")
    st = NativeStore(str(tmp_path / "meta"), str(tmp_path / "pool.dat"), True, False, 256 * 1024)
    yield st
    st.close()


def test_map_full_is_metadata_full_and_the_map_can_grow(small_map: NativeStore) -> None:
    st = small_map
    with pytest.raises(errors.MetadataFull, match="delete snapshots"), st.txn(write=True) as t:
        for i in range(100_000):
            t.put(DB_META, b"k%08d" % i, bytes(100))
    with st.gate_exclusive():
        st.set_map_size(64 * MiB)
    assert st.map_size() == 64 * MiB
    with st.txn(write=True) as t:
        for i in range(10_000):
            t.put(DB_META, b"k%08d" % i, bytes(100))
    with st.txn() as t:
        assert t.get(DB_META, b"k00009999") == bytes(100)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path / "store"), StoreConfig(pool_bytes=64 * MiB))
    yield e
    e.close()


@pytest.mark.parametrize("value", [
    b"\x01" * 23,  # wrong size
    struct.pack("<IIQQ", 0, 0, 5, 1),  # empty record
    struct.pack("<IIQQ", 5000, 0, 5, 1),  # longer than MAX_EXTENT
    struct.pack("<IIQQ", 4, 0, 1 << 60, 1),  # a pbn past any file offset
])
def test_a_damaged_live_record_is_corrupt_on_every_c_path(engine: Engine, value: bytes) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 0, b"x" * 4 * BS)
    with engine.native.txn(write=True) as t:
        t.put(DB_LIVE, struct.pack(">IQ", v, 0), value)
    for call in (lambda: engine.read(v, 0, BS),
                 lambda: engine.native.write_inplace(v, 0, b"y" * BS),
                 lambda: engine.native.write_row(v, 0, b"y" * BS),
                 lambda: engine.block_status(v, 0, MiB)):
        with pytest.raises(errors.Corrupt):
            call()


def test_a_damaged_volstate_is_corrupt_on_the_row_path(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.create_snapshot("v")
    with engine.native.txn(write=True) as t:
        t.put(DB_VOLSTATE, struct.pack(">I", v), b"\x00" * 39)
    with pytest.raises(errors.Corrupt):
        engine.native.write_row(v, 0, b"y" * BS)


def test_overlapping_live_records_are_corrupt(engine: Engine) -> None:
    v = engine.create_volume("v", MiB).id
    engine.write(v, 0, b"x" * 8 * BS)
    with engine.native.txn(write=True) as t:
        t.put(DB_LIVE, struct.pack(">IQ", v, 2), struct.pack("<IIQQ", 2, 0, 100, 1))
    with pytest.raises(errors.Corrupt):
        engine.read(v, 0, 8 * BS)


WALK = """
import sys
from snapdisk import errors, native
from snapdisk.volume import Engine
try:
    e = Engine.open(sys.argv[1])
except errors.SnapdiskError as exc:
    sys.exit(print("refused:", exc))
try:
    with e.native.txn() as t:
        for db in range(native.DB_COUNT):
            for _ in t.scan(db, b""):
                pass
    e.check()
except errors.SnapdiskError as exc:
    print("reported:", exc)
finally:
    e.close()
"""


def test_random_damage_in_the_metadata_never_crashes(tmp_path: Path) -> None:
    """64 random bytes in one page of data.mdb (issue 10's reproduction: some seeds made LMDB
    itself SIGSEGV): opening, walking every database and checking must end in a clean exit or
    a Python error, never a signal.  xm_verify at open catches what would crash LMDB."""
    base = tmp_path / "base"
    e = Engine.create(str(base), StoreConfig(pool_bytes=64 * MiB))
    rnd = random.Random(0)
    v = e.create_volume("v", 8 * MiB).id
    for i in range(200):
        e.write(v, rnd.randrange(0, 2000) * BS, b"x" * BS)
        if i % 20 == 0:
            e.create_snapshot("v")
    _, pages, psize = e.native.env_info()
    e.close()
    refused = 0
    for seed in range(30):
        d = tmp_path / f"s{seed}"
        subprocess.run(["cp", "-r", "--sparse=always", str(base), str(d)], check=True)
        r = random.Random(seed)
        with open(d / "meta" / "data.mdb", "r+b") as f:
            f.seek(r.randrange(2, pages) * psize + r.randrange(0, psize - 64))
            f.write(r.randbytes(64))
        p = subprocess.run([sys.executable, "-c", WALK, str(d)], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode >= 0, f"seed {seed}: killed by signal {-p.returncode}: {p.stderr[-2000:]}"
        refused += "refused:" in p.stdout
        subprocess.run(["rm", "-rf", str(d)], check=True)
    assert refused > 0  # some damage is caught at open
