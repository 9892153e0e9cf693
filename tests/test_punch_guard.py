"""The punch guard (native/xm.h, xm_pool.c): a freed block is punched out of pool.dat after the
commit that freed it, while it waits in PENDING; a FLUSH makes PENDING blocks FREE, and a write
may take one at once.  Without the guard a FLUSH between a free's commit and its punch let a
write land on a block that the punch then zeroed.  Here: the FLUSH's move waits for every
holder, and every path that punches after a commit holds the guard while it punches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from snapdisk import allocator
from snapdisk.native import BLOCK_SIZE
from snapdisk.pool import Pool
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
MiB = 1 << 20


@pytest.fixture(params=["c", "python"])
def engine(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    if request.param == "python":
        monkeypatch.setenv("SNAPDISK_BULK_PATH", "python")
    e = Engine.create(str(tmp_path / "s"), StoreConfig(pool_bytes=64 * MiB))
    try:
        yield e
    finally:
        e.close()


def pending(e: Engine) -> int:
    with e.native.txn() as t:
        return allocator.pending_blocks(t)


def test_a_flush_makes_pending_blocks_free_only_after_the_punches_in_progress(
        engine: Engine) -> None:
    e = engine
    vol = e.create_volume("v", 8 * MiB).id
    e.write(vol, 0, bytes(range(256)) * (512 * BS // 256))
    e.flush()
    e.trim(vol, 0, 512 * BS)  # 512 blocks to PENDING (trim punches them itself)
    assert pending(e) == 512
    done = threading.Event()
    with e.native.punch_hold():  # as a free whose punch has not run yet
        th = threading.Thread(target=lambda: (e.flush(), done.set()))
        th.start()
        assert not done.wait(0.5), "the flush made PENDING blocks FREE during a punch"
        assert pending(e) == 512
    th.join(10)
    assert done.is_set() and pending(e) == 0
    assert e.native.punch_holders() == 0


def test_every_punch_after_a_commit_holds_the_guard(engine: Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine
    seen: list[tuple[int, int]] = []
    real = Pool.punch

    def spy(self: Pool, pbn: int, nblocks: int) -> None:
        seen.append((nblocks, e.native.punch_holders()))
        real(self, pbn, nblocks)

    monkeypatch.setattr(Pool, "punch", spy)
    vol = e.create_volume("v", 16 * MiB).id
    data = bytes(range(256)) * (1024 * BS // 256)
    e.write(vol, 0, data)
    e.flush()
    e.trim(vol, 0, 512 * BS)  # trim
    e.create_snapshot("v", "a")
    e.write(vol, 512 * BS, data[:512 * BS])  # 512 blocks only snapshot a holds now
    e.flush()
    e.delete_snapshot("v", "a")  # a bulk walk (the Python twin punches through Pool)
    e.write(vol, 0, data)
    e.flush()
    e.create_snapshot("v", "b")
    e.write(vol, 0, data)
    e.flush()
    e.rollback("v", "b")  # frees the 1024 blocks written after b
    assert seen, "nothing was punched"
    assert all(holders >= 1 for _, holders in seen), seen
    assert e.native.punch_holders() == 0
    assert e.check().ok


def test_the_c_walks_leave_no_holder_behind(engine: Engine) -> None:
    e = engine
    vol = e.create_volume("v", 16 * MiB).id
    for name in ("a", "b"):
        e.write(vol, 0, bytes([7]) * (1024 * BS))
        e.flush()
        e.create_snapshot("v", name)
    e.write(vol, 0, bytes([9]) * (1024 * BS))
    e.flush()
    e.delete_snapshot("v", "b")
    e.rollback("v", "a")
    e.delete_volume("v")
    wait_until(lambda: e.native.punch_holders() == 0, what="no punch guard holder")
