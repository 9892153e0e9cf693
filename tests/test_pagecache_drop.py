"""native/xm_drop.c: a block that a batch moved from the live map to a snapshot's dead list has
its cached pool pages dropped.  A hint only: the contents are checked throughout, and
page-cache residency is read with mincore(2) over a mapping of pool.dat."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
MiB = 1 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(path: str, pbn: int, n: int) -> int:
    """How many of pool blocks [pbn, pbn+n) the page cache holds (mincore of a mapping)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, n * BS, mmap.PROT_READ, mmap.MAP_SHARED, fd, pbn * BS)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(n)
            assert libc.mincore(addr, n * BS, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, n * BS)
    finally:
        os.close(fd)


def pbns(e: Engine, vol: int, lba: int, n: int) -> list[int]:
    """The pool block of each of live blocks [lba, lba+n)."""
    out = {}
    with e.native.txn() as t:
        for r in t.live_overlap(vol, lba, n):
            for i in range(r.len):
                out[r.lba + i] = r.pbn + i
    return [out[lba + i] for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    path = str(tmp_path / "s")
    e = Engine.create(path, StoreConfig(pool_bytes=256 * MiB))
    try:
        yield e, os.path.join(path, "pool.dat")
    finally:
        e.close()


def pattern(i: int) -> bytes:
    return (i.to_bytes(4, "little") * (BS // 4))


def test_superseded_blocks_leave_the_page_cache_and_the_snapshot_still_reads_them(
        store: tuple[Engine, str]) -> None:
    e, pool = store
    vol = e.create_volume("v", 64 * MiB).id
    n = 256
    for i in range(n):
        e.write(vol, i * BS, pattern(i))
    e.flush()  # the pool's pages are clean: the kernel drops only clean ones
    old = pbns(e, vol, 0, n)
    assert old == list(range(old[0], old[0] + n))  # one run: resident() reads it whole
    os.sync()
    assert resident(pool, old[0], n) == n
    snap = e.create_snapshot("v")
    before = e.native.stats()["dropped_runs"]
    for i in range(n):  # every block redirected: the old ones go to the snapshot's dead list
        e.write(vol, i * BS, pattern(1000 + i))
    e.flush()  # applies the batch, which hands the dead blocks to the drop thread
    assert pbns(e, vol, 0, n) != old
    wait_until(lambda: e.native.stats()["dropped_runs"] > before, what="the drops")
    wait_until(lambda: resident(pool, old[0], n) == 0, what="the old pages to leave the cache")
    # the snapshot reads its blocks from the disk, the volume its new ones
    assert all(e.read_snapshot(vol, snap.id, i * BS, BS) == pattern(i) for i in range(n))
    assert all(e.read(vol, i * BS, BS) == pattern(1000 + i) for i in range(n))
    assert e.check().ok


def test_off_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_DROP", "0")
    e = Engine.create(str(tmp_path / "s"), StoreConfig(pool_bytes=64 * MiB))
    try:
        vol = e.create_volume("v", 8 * MiB).id
        for i in range(16):
            e.write(vol, i * BS, pattern(i))
        e.flush()
        e.create_snapshot("v")
        for i in range(16):
            e.write(vol, i * BS, pattern(100 + i))
        e.flush()  # (switched off, no thread exists to drop anything later)
        assert e.native.stats()["dropped_runs"] == 0
        assert all(e.read(vol, i * BS, BS) == pattern(100 + i) for i in range(16))
    finally:
        e.close()
