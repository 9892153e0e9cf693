"""The NBD side of the server: nbdkit + snapdisk's plugin, driven with libnbd, nbdinfo and
nbdcopy, each test on its own store and server (conftest.served_store stops it by pid)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from conftest import Served, make_store

MiB = 1 << 20
BS = 4096


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 7 + i * 13) & 0xFF for i in range(251)) * (n // 251) + bytes(n % 251)


def extents(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
    """base:allocation as (offset, length, flags) runs from offset."""
    out: list[tuple[int, int, int]] = []

    def cb(meta: str, off: int, entries: list[int], err: int) -> int:
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        pos = off
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    return out


def state_at(runs: list[tuple[int, int, int]], offset: int) -> int:
    for o, n, f in runs:
        if o <= offset < o + n:
            return f
    raise AssertionError(f"no extent covers {offset}: {runs}")


HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


def nbdinfo_list(s: Served) -> dict[str, dict]:  # type: ignore[type-arg]
    out = subprocess.run(["nbdinfo", "--list", "--json", s.uri()], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return {e["export-name"]: e for e in json.loads(out)["exports"]}


@pytest.fixture
def two_volumes(tmp_path: Path, served: Callable[..., Served]) -> Served:
    store = make_store(tmp_path / "store", volumes={"vm1": 64 * MiB, "small": MiB + 512})
    return served(store)


def test_exports_sizes_and_flags(two_volumes: Served) -> None:
    s = two_volumes
    s.call("snapshot.create", volume="vm1", name="base")
    exports = nbdinfo_list(s)
    assert set(exports) == {"vm1", "small", "vm1@base"}
    vm1, small, snap = exports["vm1"], exports["small"], exports["vm1@base"]
    assert vm1["export-size"] == 64 * MiB and small["export-size"] == MiB + 512
    assert snap["export-size"] == 64 * MiB
    for e in (vm1, small):
        assert e["is_read_only"] is False
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                     "can_multi_conn"):
            assert e[flag] is True, flag
    assert snap["is_read_only"] is True and snap["can_multi_conn"] is True
    assert snap["can_trim"] is False and snap["can_zero"] is False
    assert (vm1["block_size_minimum"], vm1["block_size_preferred"], vm1["block_size_maximum"]) \
        == (512, 4096, 32 * MiB)
    assert "base:allocation" in vm1["contexts"]


def test_default_export(tmp_path: Path, served: Callable[..., Served]) -> None:
    s = served(make_store(tmp_path / "store", volumes={"only": MiB}))
    h = nbd.NBD()
    h.set_full_info(True)
    h.connect_uri(s.uri(""))
    assert h.get_size() == MiB and h.get_canonical_export_name() == "only"
    h.shutdown()
    s.call("volume.create", name="second", size_bytes=MiB)
    h2 = nbd.NBD()
    with pytest.raises(nbd.Error):
        h2.connect_uri(s.uri(""))  # two volumes: the client must name one


def test_read_write_flush_fua(two_volumes: Served) -> None:
    s = two_volumes
    h = s.connect("vm1")
    assert h.pread(BS, 0) == bytes(BS)  # never written: zeros
    data = pattern(1, 256 * 1024)
    h.pwrite(data, 1 * MiB)
    h.pwrite(pattern(2, BS), 10 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(len(data), 1 * MiB) == data
    assert h.pread(BS, 10 * MiB) == pattern(2, BS)
    # Reads spanning written and unwritten blocks.
    assert h.pread(2 * BS, 1 * MiB - BS) == bytes(BS) + data[:BS]
    h.shutdown()
    # Another connection (and a different volume) sees the same store.
    h2 = s.connect("small")
    h2.pwrite(b"\xaa" * 512, MiB)  # the last, partial 4 KiB block of a MiB+512 volume
    assert h2.pread(512, MiB) == b"\xaa" * 512
    h2.shutdown()
    assert s.connect("vm1").pread(BS, 10 * MiB) == pattern(2, BS)


def test_unaligned_512_byte_io(two_volumes: Served) -> None:
    h = two_volumes.connect("vm1")
    base = pattern(3, 4 * BS)
    h.pwrite(base, 0)
    for off in (512, 1536, 4096 + 3584, 3 * BS + 512):
        h.pwrite(b"\x55" * 512, off)
        base = base[:off] + b"\x55" * 512 + base[off + 512:]
    h.pwrite(b"\x66" * 1024, 7 * 512)  # 3584..4608 straddles blocks 0 and 1
    base = base[:3584] + b"\x66" * 1024 + base[4608:]
    assert h.pread(4 * BS, 0) == base
    assert h.pread(512, 1536) == b"\x55" * 512
    # Unwritten region, unaligned write: the rest of the block stays zero.
    h.pwrite(b"\x77" * 512, 20 * BS + 1024)
    assert h.pread(BS, 20 * BS) == bytes(1024) + b"\x77" * 512 + bytes(BS - 1536)


def test_zero_trim_and_block_status(two_volumes: Served) -> None:
    h = two_volumes.connect("vm1")
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    runs = extents(h, 64 * MiB, 0)
    assert runs[0][0] == 0 and all(f == HOLE_ZERO for _, _, f in runs)  # all unwritten
    h.pwrite(pattern(4, 1 * MiB), 0)
    runs = extents(h, 2 * MiB, 0)
    assert state_at(runs, 0) == 0 and state_at(runs, MiB - 1) == 0
    assert state_at(runs, MiB) == HOLE_ZERO
    h.trim(256 * 1024, 256 * 1024)
    runs = extents(h, MiB, 0)
    assert state_at(runs, 0) == 0
    assert state_at(runs, 256 * 1024) == HOLE_ZERO and state_at(runs, 512 * 1024 - 1) == HOLE_ZERO
    assert state_at(runs, 512 * 1024) == 0
    assert h.pread(256 * 1024, 256 * 1024) == bytes(256 * 1024)
    # Zero with fast-zero and FUA, unaligned at both ends: the edges are written, the rest is
    # unmapped.
    h.zero(3 * BS, 600 * 1024 + 512, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
    got = h.pread(4 * BS, 600 * 1024)
    want = pattern(4, MiB)[600 * 1024:600 * 1024 + 4 * BS]
    assert got == want[:512] + bytes(3 * BS) + want[3 * BS + 512:]
    runs = extents(h, 4 * BS, 600 * 1024)
    assert state_at(runs, 600 * 1024 + BS) == HOLE_ZERO
    # REQ_ONE: a single extent.
    assert len(extents(h, MiB, 0, nbd.CMD_FLAG_REQ_ONE)) == 1
    h.flush()


def test_snapshot_export_is_read_only_and_keeps_old_data(two_volumes: Served) -> None:
    s = two_volumes
    live = s.connect("vm1")
    old = pattern(5, 128 * 1024)
    live.pwrite(old, 0)
    s.call("snapshot.create", volume="vm1", name="before")
    snap = s.connect("vm1@before")
    assert snap.is_read_only() and snap.get_size() == 64 * MiB
    new = pattern(6, 64 * 1024)
    live.pwrite(new, 32 * 1024)
    live.trim(32 * 1024, 96 * 1024)
    assert snap.pread(len(old), 0) == old
    assert live.pread(32 * 1024, 0) == old[:32 * 1024]
    assert live.pread(64 * 1024, 32 * 1024) == new
    # Writes to the snapshot export fail: libnbd refuses them client-side (read-only export);
    # with strict checks off the server answers EPERM (nbdkit sends EROFS as EPERM).
    with pytest.raises(nbd.Error) as e:
        snap.pwrite(b"x" * 512, 0)
    assert e.value.errnum in (errno.EPERM, errno.EROFS, errno.EINVAL)
    snap.set_strict_mode(0)
    with pytest.raises(nbd.Error) as e:
        snap.pwrite(b"x" * 512, 0)
    assert e.value.errnum in (errno.EPERM, errno.EROFS)
    assert snap.pread(512, 0) == old[:512]
    # Block status of the snapshot: written then, hole beyond.
    runs = extents(snap, MiB, 0)
    assert state_at(runs, 0) == 0 and state_at(runs, 128 * 1024) == HOLE_ZERO
    # By id too.
    sid = s.call("snapshot.info", volume="vm1", snapshot="before")["id"]  # type: ignore[index]
    assert s.connect(f"vm1@{sid}").pread(512, 0) == old[:512]


@pytest.mark.parametrize("threads", ["serialized"])
def test_several_connections_at_once(tmp_path: Path, served: Callable[..., Served],
                                     threads: str) -> None:
    """The thread model (serve --threads: parallel is refused, see test_server) keeps every
    connection's writes."""
    s = served(make_store(tmp_path / "store", volumes={"vm1": 64 * MiB}), threads=threads)
    nthreads, chunk, rounds = 4, 64 * 1024, 16
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            h = s.connect("vm1")
            assert h.can_multi_conn()
            for r in range(rounds):
                h.pwrite(pattern(t * 100 + r, chunk), (t * rounds + r) * chunk)
            h.flush()
            h.shutdown()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    h = s.connect("vm1")
    for t in range(nthreads):
        for r in range(rounds):
            assert h.pread(chunk, (t * rounds + r) * chunk) == pattern(t * 100 + r, chunk), (t, r)


def test_a_stalled_handshake_does_not_stop_other_clients(two_volumes: Served) -> None:
    """Why the default thread model is per-connection serialization, not nbdkit's
    SERIALIZE_ALL_REQUESTS: under that, a client that connects and says nothing holds the
    server's one request lock, and every other client hangs."""
    import socket
    lurker = socket.socket(socket.AF_UNIX)
    lurker.connect(two_volumes.nbd_socket or "")
    try:
        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append(two_volumes.connect("vm1").pread(BS, 0)),
                             daemon=True)
        t.start()
        t.join(20)
        assert result == [bytes(BS)], "a second client could not connect while one stalled"
    finally:
        lurker.close()


def test_exports_follow_the_store(two_volumes: Served) -> None:
    s = two_volumes
    s.call("volume.create", name="late", size_bytes=2 * MiB)
    assert "late" in nbdinfo_list(s)
    h = s.connect("late")
    h.pwrite(b"L" * BS, 0)
    h.shutdown()
    s.call("volume.resize", name="late", size_bytes=4 * MiB)
    assert nbdinfo_list(s)["late"]["export-size"] == 4 * MiB
    s.call("snapshot.create", volume="late", name="s")
    assert "late@s" in nbdinfo_list(s)
    s.call("volume.delete", name="late")
    assert not {"late", "late@s"} & set(nbdinfo_list(s))
    with pytest.raises(nbd.Error):
        s.connect("late")
    with pytest.raises(nbd.Error):
        s.connect("nosuch@snap")


def test_nbdcopy_in_and_out(two_volumes: Served, tmp_path: Path) -> None:
    s = two_volumes
    src = tmp_path / "src.img"
    data = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(MiB)
    src.write_bytes(data + bytes(64 * MiB - len(data)))
    subprocess.run(["nbdcopy", str(src), s.uri("vm1")], check=True, timeout=60)
    s.call("snapshot.create", volume="vm1", name="copied")
    h = s.connect("vm1")
    h.pwrite(b"\xff" * MiB, 0)  # change the live volume after the snapshot
    out = tmp_path / "out.img"
    subprocess.run(["nbdcopy", s.uri("vm1@copied"), str(out)], check=True, timeout=60)
    assert out.read_bytes()[:len(data)] == data
    # nbdcopy skipped the zeros: the 2 MiB gap and the tail are holes in the volume.
    runs = extents(s.connect("vm1@copied"), 64 * MiB, 0)
    assert state_at(runs, 3 * MiB + BS) & nbd.STATE_ZERO
    assert state_at(runs, 10 * MiB) == HOLE_ZERO


def test_errors_reach_the_client_as_errno(tmp_path: Path, served: Callable[..., Served]) -> None:
    # A pool of 64 blocks, a volume of 1 MiB (256 blocks): it fills up.
    s = served(make_store(tmp_path / "store", pool_bytes=64 * BS, volumes={"v": MiB}))
    h = s.connect("v")
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"\x01" * MiB, 0)
    assert e.value.errnum == errno.ENOSPC
    # Past the end, sent anyway (libnbd's own bounds check off): EINVAL.
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as e:
        h.pread(BS, MiB)
    assert e.value.errnum in (errno.EINVAL, errno.EIO)
    # The connection and the store are fine afterwards.
    h.pwrite(b"\x02" * BS, 0)
    assert h.pread(BS, 0) == b"\x02" * BS
    with s.client() as c:
        assert c.call("check")["ok"]


def test_data_survives_stop_and_restart(tmp_path: Path, served: Callable[..., Served]) -> None:
    store = make_store(tmp_path / "store", volumes={"v": 8 * MiB})
    s = served(store)
    h = s.connect("v")
    h.pwrite(pattern(9, MiB), 3 * MiB)
    h.shutdown()
    from snapdisk import daemon as srv
    srv.stop(store, timeout=10)
    s2 = served(store)
    assert s2.connect("v").pread(MiB, 3 * MiB) == pattern(9, MiB)
