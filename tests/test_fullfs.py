"""A full filesystem under the store (issue 10 item 1), through the real server and libnbd.

Each test makes its own small tmpfs and unmounts it afterwards, even on failure (the server on
it is stopped by pid first).  What must hold when the filesystem fills: the client sees ENOSPC,
never EIO; the server does not die (LMDB's MDB_WRITEMAP map would SIGBUS on a sparse page the
filesystem cannot back: native/xm_space.c); reads keep working; a snapshot is created or
refused cleanly; deleting a snapshot makes writes work again; nothing acknowledged is lost and
`check` passes; `init`, `usage` and `status` warn before it happens.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Served, served_store
from e2e_helpers import run_cli

from snapdisk import daemon as srv
from snapdisk.engine import Engine
from snapdisk.store import default_pool_bytes

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
KiB4 = 4096


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """small_fs("16m") -> a fresh tmpfs of that size; every one is unmounted at teardown."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                            str(mnt)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        mounted.append(mnt)
        return mnt

    try:
        yield make
    finally:
        for mnt in reversed(mounted):
            subprocess.run(["umount", str(mnt)], check=True)


def pattern(tag: int, n: int) -> bytes:
    return bytes([tag % 251 + 1]) * n


def write(h: Any, offset: int, data: bytes) -> int:
    """0 if the write was acknowledged, else the errno the client got."""
    try:
        h.pwrite(data, offset)
        return 0
    except nbd.Error as e:
        # libnbd's Error names the errno ("ENOSPC"); no errno at all (a dead server) is -1
        return int(getattr(errno, str(e.errno), -1)) if e.errno else -1


class Disk:
    """What the client was told is written: offset -> bytes (acknowledged writes only)."""

    def __init__(self) -> None:
        self.acked: dict[int, bytes] = {}

    def write(self, h: Any, offset: int, data: bytes) -> int:
        rc = write(h, offset, data)
        if rc == 0:
            self.acked[offset] = data
        return rc

    def verify(self, h: Any) -> None:
        for off, data in sorted(self.acked.items()):
            assert h.pread(len(data), off) == data, f"acknowledged data at {off} lost"


def fill(h: Any, disk: Disk, start: int, end: int, tag: int) -> list[int]:
    """1 MiB writes from start until one fails (or end); the errnos of the failures (the first
    one, then two more tries)."""
    errs: list[int] = []
    off = start
    while off < end and len(errs) < 3:
        rc = disk.write(h, off, pattern(tag + off // MiB, MiB))
        if rc:
            errs.append(rc)
        else:
            off += MiB
    return errs


def full_store_scenario(s: Served, store: str, vol_bytes: int) -> None:
    """Fill the store through NBD, then check every promise of issue 10 item 1."""
    pid = s.pid
    disk = Disk()
    h = s.connect("v", meta=False)
    # Some data, a snapshot that holds it, then overwrite it (new blocks) and fill up.
    for i in range(2):
        assert disk.write(h, i * MiB, pattern(100 + i, MiB)) == 0
    h.flush()
    s.call("snapshot.create", volume="v", name="s1")
    errs = fill(h, disk, 0, vol_bytes, 1)
    assert errs, "the store never filled up"
    assert set(errs) == {errno.ENOSPC}, f"a full store must be ENOSPC, got {errs}"
    assert srv._alive(pid), "the server died when the store filled up"
    # A snapshot: created, or refused cleanly (no space).
    try:
        s.call("snapshot.create", volume="v", name="s2")
    except Exception as e:
        assert getattr(e, "code", None) in ("pool-full", "metadata-full"), e
    # Redirected 4 KiB writes (the blocks are held by a snapshot): ENOSPC, never EIO.
    rcs = [disk.write(h, i * 64 * KiB4, pattern(7 + i, KiB4)) for i in range(8)]
    assert set(rcs) <= {0, errno.ENOSPC}, rcs
    assert srv._alive(pid), "the server died on redirected writes to a full store"
    disk.verify(h)  # reads still work, and return what was acknowledged
    # Deleting the snapshots frees their blocks: writes work again.
    for snap in s.call("snapshot.list", volume="v"):  # type: ignore[attr-defined]
        s.call("snapshot.delete", volume="v", snapshot=snap["id"])
    h.flush()
    ok = [disk.write(h, i * 64 * KiB4, pattern(50 + i, KiB4)) for i in range(8)]
    assert ok == [0] * 8, f"writes after deleting the snapshots: {ok}"
    h.flush()
    disk.verify(h)
    h.shutdown()
    assert srv._alive(pid)
    srv.stop(store, timeout=30)
    assert run_cli(store, "check", check=False).returncode == 0
    # Nothing acknowledged was lost across the restart.
    with served_store(store) as s2:
        h2 = s2.connect("v", meta=False)
        disk.verify(h2)
        h2.shutdown()


def test_oversized_pool_on_a_small_filesystem_is_enospc_not_sigbus(
        small_fs: Callable[[str], Path], served: Callable[..., Served]) -> None:
    """Issue 10's first reproduction: a 16 MiB tmpfs, `init --pool-size 64M`, 1 MiB writes,
    a snapshot, redirected 4 KiB writes."""
    store = str(small_fs("16m") / "store")
    r = run_cli(store, "init", "--pool-size", "64M", "--json")
    assert r.json()["warnings"], "a pool larger than the filesystem must warn at init"
    run_cli(store, "volume", "create", "v", "48M")
    full_store_scenario(served(store), store, 48 * MiB)


def test_default_pool_leaves_room_for_the_metadata(
        small_fs: Callable[[str], Path], served: Callable[..., Served]) -> None:
    """Issue 10's second reproduction: a 32 MiB tmpfs and the default pool size."""
    fs = small_fs("32m")
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    store = str(fs / "store")
    r = run_cli(store, "init", "--json").json()
    assert r["pool_bytes"] == default_pool_bytes(free) <= free * 0.9
    assert r["warnings"] == []
    run_cli(store, "volume", "create", "v", "32M")
    full_store_scenario(served(store), store, 32 * MiB)


def test_usage_and_status_warn_before_the_filesystem_is_full(
        small_fs: Callable[[str], Path], served: Callable[..., Served]) -> None:
    store = str(small_fs("16m") / "store")
    run_cli(store, "init", "--pool-size", "64M")
    run_cli(store, "volume", "create", "v", "8M")
    u = run_cli(store, "usage", "--json").json()["store"]
    assert u["filesystem_free_bytes"] < u["free_bytes"]
    assert any("filesystem" in w for w in u["warnings"]), u
    assert "warning:" in run_cli(store, "usage").stdout
    s = served(store)
    st = run_cli(store, "status", "--json").json()
    assert any("filesystem" in w for w in st["warnings"]), st
    assert st["space"]["pool_bytes"] == 64 * MiB
    assert "warning" in run_cli(store, "status").stdout
    # A pool near full warns too (and a roomy one does not).
    big = str(small_fs("64m") / "store")
    run_cli(big, "init", "--pool-size", "1M")
    run_cli(big, "volume", "create", "w", "4M")
    assert run_cli(big, "usage", "--json").json()["store"]["warnings"] == []
    s2 = served(big)
    h = s2.connect("w", meta=False)
    h.pwrite(pattern(1, 15 * MiB // 16), 0)
    h.shutdown()
    warns = run_cli(big, "usage", "--json").json()["store"]["warnings"]
    assert any("pool is" in w for w in warns), warns
    assert s.pid and s2.pid


def hog(path: Path, leave: int = 0) -> None:
    """Fill the filesystem of path with one file, to the last block but `leave` bytes."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (MiB, KiB4, 512):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    os.truncate(path, max(0, os.path.getsize(path) - leave))


def unreserve(store: str) -> None:
    """Make data.mdb sparse past LMDB's last used page, as a store an older snapdisk made
    (or one whose blocks ahead were never given) is."""
    with Engine.open(store) as e:
        _, pages, psize = e.native.env_info()
    data = os.path.join(store, "meta", "data.mdb")
    end = os.path.getsize(data)
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(pages * psize), "--length",
                    str(end - pages * psize), data], check=True)


def test_metadata_without_room_refuses_allocating_writes_and_recovers(
        small_fs: Callable[[str], Path], served: Callable[..., Served]) -> None:
    """The filesystem is (all but) full before the server starts: data.mdb gets (almost) no
    block ahead of use.
    Reads and in-place writes work, allocating writes and snapshot creates are refused with
    ENOSPC before LMDB touches a page (no SIGBUS), and once space is freed everything works."""
    fs = small_fs("32m")
    store = str(fs / "store")
    run_cli(store, "init", "--pool-size", "8M")
    run_cli(store, "volume", "create", "v", "8M")
    disk = Disk()
    with served_store(store) as s:
        h = s.connect("v", meta=False)
        for i in range(2):
            assert disk.write(h, i * MiB, pattern(i, MiB)) == 0
        h.flush()
        h.shutdown()
    unreserve(store)
    hog(fs / "hog", leave=512 << 10)  # room for the pid file and some metadata, not enough
    s = served(store)
    h = s.connect("v", meta=False)
    disk.verify(h)
    assert disk.write(h, 0, pattern(9, KiB4)) == 0  # in place: no new block, no map change
    assert write(h, 4 * MiB, pattern(3, KiB4)) == errno.ENOSPC  # needs a block and records
    try:
        s.call("snapshot.create", volume="v", name="s1")
    except Exception as e:
        assert getattr(e, "code", None) in ("pool-full", "metadata-full"), e
    assert write(h, 5 * MiB, pattern(4, MiB)) == errno.ENOSPC
    assert srv._alive(s.pid)
    assert s.call("usage")["store"]["metadata_space_low"]  # type: ignore[index]
    assert any("filesystem is full" in w
               for w in run_cli(store, "usage", "--json").json()["store"]["warnings"])
    disk.verify(h)
    os.unlink(fs / "hog")  # space freed on the filesystem: writes work again
    assert disk.write(h, 4 * MiB, pattern(5, KiB4)) == 0
    s.call("snapshot.create", volume="v", name="s2")
    assert disk.write(h, 0, pattern(6, 2 * KiB4)) == 0  # redirected: s2 holds the block
    h.flush()
    disk.verify(h)
    assert not s.call("usage")["store"]["metadata_space_low"]  # type: ignore[index]
    h.shutdown()
    srv.stop(store, timeout=30)
    assert run_cli(store, "check", check=False).returncode == 0
