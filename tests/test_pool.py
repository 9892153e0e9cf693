"""The pool seam (native/xm_pool.c through snapdisk.pool.Pool): whole-block I/O with
read-modify-write of partial blocks, hole punching, ENOSPC from a full filesystem on both the C
and the Python write path, and the redirect-on-write path's order (nothing written in place
before the redirect that can still fail)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdisk import errors
from snapdisk.native import BLOCK_SIZE, NativeStore
from snapdisk.pool import Pool
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
MiB = 1 << 20


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    os.makedirs(tmp_path / "meta")
    st = NativeStore(str(tmp_path / "meta"), str(tmp_path / "pool.dat"), True, False, 1 << 30)
    yield Pool(st)
    st.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards even if the test fails."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_read_write_whole_blocks_and_zeros_past_the_end(pool: Pool) -> None:
    pool.write(3, b"x" * 2 * BS)
    assert pool.read(3, 2 * BS) == b"x" * 2 * BS
    assert pool.read(0, BS) == bytes(BS)  # a hole before
    assert pool.read(100, BS) == bytes(BS)  # past the end of the file


def test_sub_block_write_keeps_the_rest_of_the_block(pool: Pool) -> None:
    pool.write(0, b"a" * 3 * BS)
    pool.write(0, b"b" * 100, 10)  # inside block 0
    pool.write(0, b"c" * (BS + 20), BS - 10)  # the end of block 0, all of 1, the start of 2
    expect = bytearray(b"a" * 3 * BS)
    expect[10:110] = b"b" * 100
    expect[BS - 10:2 * BS + 10] = b"c" * (BS + 20)
    assert pool.read(0, 3 * BS) == expect
    assert pool.read(1, 30, BS - 15) == bytes(expect[2 * BS - 15:2 * BS + 15])  # offset > block
    assert pool.read(0, 5, 8) == b"aabbb"


def test_punch_reads_zeros_and_frees_the_space(pool: Pool) -> None:
    pool.write(0, b"p" * 64 * BS)
    before = pool.size_on_disk()
    pool.punch(16, 32)
    assert pool.read(16, 32 * BS) == bytes(32 * BS)
    assert pool.read(15, BS) == b"p" * BS and pool.read(48, BS) == b"p" * BS
    assert pool.size_on_disk() <= before - 32 * BS


def test_a_damaged_address_is_corrupt_not_a_crash(pool: Pool) -> None:
    with pytest.raises(errors.Corrupt):
        pool.read(1 << 62, BS)
    with pytest.raises(errors.Corrupt):
        pool.write(1 << 62, b"z")


def test_full_filesystem_is_enospc_in_the_seam(tmp_path: Path, small_fs: Path) -> None:
    os.makedirs(tmp_path / "meta")
    st = NativeStore(str(tmp_path / "meta"), str(small_fs / "pool.dat"), True, False, 1 << 30)
    try:
        with pytest.raises(errors.PoolFull) as info:
            Pool(st).write(0, bytes(2 * MiB))
        assert info.value.errno == errno.ENOSPC
    finally:
        st.close()


@pytest.mark.parametrize("path", ["c", "python"])
def test_full_filesystem_is_enospc_on_both_write_paths(
        tmp_path: Path, small_fs: Path, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool file on a 1 MiB filesystem, the metadata elsewhere (LMDB on a full filesystem is
    another matter: issue 10).  Writing 2 MiB is ENOSPC, never EIO, and changes no map record."""
    if path == "python":
        monkeypatch.setenv("SNAPDISK_WRITE_PATH", "python")
    store = tmp_path / "store"
    store.mkdir()
    os.symlink(small_fs / "pool.dat", store / "pool.dat")
    e = Engine.create(str(store), StoreConfig(pool_bytes=64 * MiB))
    try:
        v = e.create_volume("v", 8 * MiB).id
        with pytest.raises(errors.PoolFull) as info:
            e.write(v, 0, b"f" * 2 * MiB)
        assert info.value.errno == errno.ENOSPC
        assert e.read(v, 0, 2 * MiB) == bytes(2 * MiB)
        assert e.block_status(v, 0, 8 * MiB) == [(0, 8 * MiB, False)]
        assert e.check().ok
    finally:
        e.close()


def test_row_write_refused_writes_nothing_in_place(tmp_path: Path) -> None:
    """A write over an in-place block and a snapshot-held block, with the pool full: the C
    redirect-on-write path refuses it (ENOSPC -> False) and must not have written the in-place
    block first."""
    e = Engine.create(str(tmp_path / "store"), StoreConfig(pool_bytes=32 * BS))
    try:
        v = e.create_volume("v", MiB).id
        e.write(v, 0, b"a" * 16 * BS)
        e.create_snapshot("v")
        e.write(v, BS, b"b" * BS)  # block 1 redirected: the volume's own now
        e.write(v, 16 * BS, b"f" * 15 * BS)  # the pool is full: 32 of 32 blocks
        assert not e.native.write_row(v, BS, b"c" * 2 * BS)  # block 2 needs a new block
        assert e.read(v, BS, 2 * BS) == b"b" * BS + b"a" * BS
        assert e.check().ok
    finally:
        e.close()
