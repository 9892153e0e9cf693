"""The hot path in one C call (issue 9 item 4): xm_conn_read and xm_conn_write count the request
in flight and refuse a revoked connection, exactly as their Python twin (Connections.enter/leave)
does; xm_conn_write writes in place or redirects, and declines (XM_ESLOW, nothing written) what
only the general path may do."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from snapdisk._xm import ffi, lib

from snapdisk import errors, native
from snapdisk.connections import Connection, Connections
from snapdisk.engine import Engine
from snapdisk.native import check

MIB = 1 << 20


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine.create(str(tmp_path / "store"))
    e.create_volume("v", 4 * MIB)
    return e


def _conn(reg: Connections, e: Engine, counted: bool, export: str = "v") -> Connection:
    vol = e.volume_id(export)
    c = Connection(export, vol, None, 4 * MIB, False)
    reg.register(c)
    c.read, c.write = e.live_io(vol)
    if counted:
        c.bind_counted(e.native.ptr, row=True)
    return c


def _read(reg: Connections, c: Connection, offset: int, buf: bytearray) -> None:
    """What nbd_plugin.pread does."""
    assert c.read is not None
    if c.counted:
        rc = lib.xm_conn_read(c.cstore, c.cconn, c.vol, offset, len(buf),
                              ffi.from_buffer("uint8_t[]", buf, True))
        if rc:
            check(rc, f"export {c.export!r}")
        return
    reg.enter(c)
    try:
        c.read(offset, buf)
    finally:
        reg.leave(c)


@pytest.mark.parametrize("counted", [False, True], ids=["python-twin", "c"])
def test_read_then_revoked(engine: Engine, counted: bool) -> None:
    data = os.urandom(8192)
    engine.write(1, 4096, data)
    reg = Connections(wait_seconds=2)
    c = _conn(reg, engine, counted)
    buf = bytearray(8192)
    _read(reg, c, 4096, buf)
    assert bytes(buf) == data
    with pytest.raises(errors.OutOfRange):
        _read(reg, c, 4 * MIB, bytearray(4096))
    with reg.reserve(1, "rollback", live_only=True, force=True) as n:
        assert n == 1
    with pytest.raises(errors.StaleConnection):
        _read(reg, c, 0, bytearray(4096))
    assert not c.busy()  # a refused read leaves no count behind
    fresh = _conn(reg, engine, counted)  # a new connection gets the new generation
    _read(reg, fresh, 4096, buf)
    assert bytes(buf) == data
    engine.close()


@pytest.mark.parametrize("counted", [False, True], ids=["python-twin", "c"])
def test_revocation_waits_for_the_read_in_flight(engine: Engine, counted: bool) -> None:
    reg = Connections(wait_seconds=5)
    c = _conn(reg, engine, counted)
    # A request in flight: the count the read takes first (C: xm_conn.inflight).
    if counted:
        c.cconn.inflight += 1
    else:
        c.inflight.append(None)
    done = threading.Event()

    def revoke() -> None:
        with reg.reserve(1, "rollback", live_only=True, force=True):
            done.set()
    t = threading.Thread(target=revoke)
    t.start()
    time.sleep(0.2)
    assert not done.is_set()  # reserve() waits for it
    if counted:
        c.cconn.inflight -= 1
    else:
        c.inflight.pop()
    t.join(5)
    assert done.is_set()
    engine.close()


def _conn_write(c: Connection, offset: int, data: bytes, row: int = 1) -> int:
    """What nbd_plugin.pwrite's C call is: the return code, 0 when written."""
    rc: int = lib.xm_conn_write(c.cstore, c.cconn, c.vol, offset, len(data),
                                ffi.from_buffer("uint8_t[]", data), row)
    return rc


def _redirected(e: Engine) -> int:
    st = ffi.new("xm_stats *")
    lib.xm_get_stats(e.native.ptr, st)
    return int(st.redirected_writes)


def test_write_in_place_then_redirected(engine: Engine) -> None:
    reg = Connections(wait_seconds=2)
    c = _conn(reg, engine, True)
    old, new = os.urandom(8192), os.urandom(8192)
    assert _conn_write(c, 4096, old) == 0  # a hole: redirected (new blocks)
    assert _conn_write(c, 4096, old) == 0  # now the volume's own: in place
    snap = engine.create_snapshot("v", "s")
    # After the snapshot the blocks are the snapshot's: redirect-on-write in the same call.
    before = _redirected(engine)
    assert _conn_write(c, 4096, new) == 0
    assert _redirected(engine) == before + 1
    assert engine.read(1, 4096, 8192) == new
    assert engine.read_snapshot(1, snap.id, 4096, 8192) == old
    # After a redirect the next write tries xm_write_row first: a block still the snapshot's
    # redirects, and one that is now the volume's own is written in place, which switches the
    # guess back.
    assert c.cconn.row_first == 1
    assert _conn_write(c, 0, old[:4096]) == 0
    assert _redirected(engine) == before + 2 and c.cconn.row_first == 1
    newer = os.urandom(8192)
    assert _conn_write(c, 4096, newer) == 0
    assert _redirected(engine) == before + 2 and c.cconn.row_first == 0
    assert engine.read(1, 0, 12288) == old[:4096] + newer
    assert engine.read_snapshot(1, snap.id, 4096, 8192) == old
    assert not c.busy()
    engine.close()


def test_write_declined_writes_nothing(engine: Engine) -> None:
    reg = Connections(wait_seconds=2)
    c = _conn(reg, engine, True)
    old = os.urandom(4096)
    engine.write(1, 0, old)
    snap = engine.create_snapshot("v", "s")
    # row = 0 (the Python write path): a redirect is declined, nothing is written.
    assert _conn_write(c, 0, os.urandom(4096), row=0) == lib.XM_ESLOW
    assert engine.read(1, 0, 4096) == old
    # A clone's blocks are SHARED: redirected in C as well (its batch releases the old block)
    engine.clone("v", "s", "w")
    cw = _conn(reg, engine, True, "w")
    w = cw.vol
    new = os.urandom(4096)
    assert _conn_write(cw, 0, new) == 0
    assert engine.read(w, 0, 4096) == new and engine.read(1, 0, 4096) == old
    # A request bigger than half the overlay's bound is declined, with nothing written
    native.batch_config(engine.native, 0, 256)
    before = engine.read(w, 0, 130 * 4096)
    assert _conn_write(cw, 0, os.urandom(129 * 4096)) == lib.XM_ESLOW
    assert engine.read(w, 0, 130 * 4096) == before
    assert engine.read_snapshot(1, snap.id, 0, 4096) == old
    assert not cw.busy()
    engine.close()


def test_write_refused_once_revoked(engine: Engine) -> None:
    reg = Connections(wait_seconds=2)
    c = _conn(reg, engine, True)
    old = os.urandom(4096)
    engine.write(1, 0, old)
    with reg.reserve(1, "rollback", live_only=True, force=True) as n:
        assert n == 1
    assert _conn_write(c, 0, os.urandom(4096)) == lib.XM_EREVOKED
    assert engine.read(1, 0, 4096) == old
    assert not c.busy()
    engine.close()


def test_a_write_the_redirect_path_declines_goes_back_to_in_place_first(engine: Engine) -> None:
    """xm_write_row declines a request over half the overlay's bound (the general path takes
    it in one transaction); after a redirect the next write tries xm_write_row first, so a
    big write is declined once, and the one after it tries in place first again."""
    native.batch_config(engine.native, 0, 256)  # a "huge" request: over 128 blocks
    reg = Connections(wait_seconds=2)
    c = _conn(reg, engine, True)
    big = os.urandom(MIB)  # 256 blocks
    engine.write(1, 0, big)  # the volume's own blocks
    engine.create_snapshot("v", "s")
    assert _conn_write(c, 2 * MIB, os.urandom(4096)) == 0  # a hole: redirected
    assert c.cconn.row_first == 1
    big2 = os.urandom(MIB)
    assert _conn_write(c, 0, big2) == lib.XM_ESLOW  # the snapshot's blocks, too big for the overlay
    assert c.cconn.row_first == 0 and engine.read(1, 0, MIB) == big
    engine.write(1, 0, big2)  # what the plugin does then: the general path
    assert _conn_write(c, 0, big) == 0  # now the volume's own: in place, first try
    assert c.cconn.row_first == 0 and engine.read(1, 0, MIB) == big
    engine.close()
