"""The data path: read, write, trim, zero, flush and block status of volumes and snapshots.

Concurrency (nbdkit calls in from many threads, the control server from others):
  * Live reads and in-place writes are one C call each (xm_read / xm_write_inplace), which takes
    the I/O gate shared and releases the GIL; redirected writes are one more (xm_write).
  * What C declines (shared blocks, a full pool) runs here in one LMDB write transaction,
    begun and committed on the calling thread (LMDB's rule), holding the gate shared.
  * Operations that change what the hot path may do (snapshots.py, volume resize and delete)
    and the reuse of freed blocks hold the gate exclusively.  Order is always gate, then
    transaction, so the two cannot deadlock; code holding the gate never calls back into a
    gated entry point (the gate is not recursive).

Compatibility: `snapdisk.volume.Engine`, `SnapshotInfo` and `VolumeInfo` still import from
here (the control server, plugin, CLI and benchmarks use that path); their homes are
snapdisk.engine and snapdisk.catalog.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import allocator, catalog, errors, extmap
from .catalog import SnapshotInfo, VolState, VolumeInfo
from .layout import BLOCK_SIZE, F_SHARED, MAX_EXTENT, VS_ENCRYPTED
from .native import HOLE, Extent, NativeStore, Txn, extents, pool_datasync, space_check_grow
from .pool import Pool

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["DataPath", "Engine", "SnapshotInfo", "VolumeInfo", "configure"]

PUNCH_BULK_MIN_BLOCKS = 256  # 1 MiB: see DataPath.punch
RELEASE_CHUNK = 2048  # PENDING runs moved to FREE per transaction (release_pending)

Freed = list[tuple[int, int]]


def __getattr__(name: str) -> Any:
    if name == "Engine":  # lazily: engine.py imports this module
        from .engine import Engine
        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def configure(native: NativeStore, vs: VolState) -> None:
    """Tell the hot path about vs.  Call with the gate closed: the table may be resized."""
    native.vol_config(vs.vol, vs.size_bytes, vs.max_snap, True)
    # An encrypted volume the pool seam does not know yet starts locked (a loaded key stays).
    native.vol_mark_encrypted(vs.vol, bool(vs.flags & VS_ENCRYPTED))


class DataPath:
    """The I/O of one open store's volumes."""

    def __init__(self, native: NativeStore, pool: Pool, c_redirect: bool = True):
        self.native = native
        self.pool = pool
        # False sends every redirected write through the Python twin of xm_write, so the
        # model test can check both (SNAPDISK_WRITE_PATH=python, Engine._c_redirect).
        self.c_redirect = c_redirect

    # ---- live view ------------------------------------------------------------------------

    def read(self, vol: int, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.native.read_into(vol, offset, buf)
        return bytes(buf)

    def live_io(self, vol: int) -> tuple[Callable[[int, Any], None],
                                         Callable[[int, Any, bool], None]]:
        """(read_into(offset, buf), write(offset, data, fua)) for vol's live view, bound once
        per NBD connection: per request they cost one Python call over the C call (the
        nbdkit Python plugin's whole budget is ~20 us a request; see nbd_plugin)."""
        read = functools.partial(self.native.read_into, vol)
        write_inplace = functools.partial(self.native.write_inplace, vol)

        def write(offset: int, data: Any, fua: bool) -> None:
            if not write_inplace(offset, data):
                self.write_moved(vol, offset, data)
            if fua:
                self.flush()

        return read, write

    def write(self, vol: int, offset: int, data: Any, fua: bool = False) -> None:
        """In place (no map change, no LMDB writer lock) when possible; else redirect-on-write
        in C (shared blocks too); else (a huge request, a full pool) the general path in
        Python."""
        if not self.native.write_inplace(vol, offset, data):
            self.write_moved(vol, offset, data)
        if fua:
            self.flush()

    def write_moved(self, vol: int, offset: int, data: Any) -> None:
        """The write the in-place path declined: redirect-on-write in C, else in Python.
        Also for writes known never to be in place (a new volume maps nothing: receive,
        restore), which skip the in-place attempt."""
        if not self.c_redirect or not self.native.write_row(vol, offset, data):
            self._gated_write(vol, offset, data)

    def _gated_write(self, vol: int, offset: int, data: Any) -> None:
        space_check_grow(self.native)  # a full filesystem: ENOSPC before the txn (xm_space.c)
        for attempt in (0, 1):
            freed: Freed = []
            try:
                with self.native.gate_shared(), self.native.txn(write=True) as t:
                    vs = catalog.state(t, vol)
                    check_io(vs, offset, len(data))
                    self._write_locked(t, vs, offset, memoryview(data).cast("B"), freed)
                    vs.save(t)
                    pool_datasync(self.native)  # data before the (synced) map commit
                return
            except errors.PoolFull:
                if attempt:
                    raise
            if not self.reclaim():
                raise errors.PoolFull(f"pool full writing {len(data)} bytes")

    def _write_locked(self, t: Txn, vs: VolState, offset: int, data: memoryview,
                      freed: Freed) -> None:
        """Write data at offset: in place where the blocks are the volume's own and newer than
        its newest snapshot, else redirect to new blocks.  Called with the gate held."""
        end = offset + len(data)
        lo, hi = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        redirect: list[tuple[int, int, Extent | None]] = []  # (block, block end, old record)
        for a, b, e in _segments(t.live_overlap(vs.vol, lo, hi - lo), lo, hi):
            if e is not None and _in_place_ok(vs, e):
                s, x = max(a * BLOCK_SIZE, offset), min(b * BLOCK_SIZE, end)
                self.pool.write(e.pbn + (a - e.lba), data[s - offset:x - offset],
                                s - a * BLOCK_SIZE, vol=vs.vol, lba=a)
            else:
                redirect.append((a, b, e))
        for a, b, buf in self._runs_to_redirect(vs.vol, redirect, offset, data):
            pos = 0
            for pbn, n in allocator.allocate(t, b - a):
                self.pool.write(pbn, buf[pos * BLOCK_SIZE:(pos + n) * BLOCK_SIZE], vol=vs.vol,
                                lba=a + pos)
                for k in range(0, n, MAX_EXTENT):
                    m = min(MAX_EXTENT, n - k)
                    new = Extent(a + pos + k, pbn + k, vs.epoch, m, 0)
                    for piece in extmap.overlay(t, vs, new):
                        extmap.kill(t, vs, piece, freed)
                    vs.live_blocks += m
                pos += n

    def _runs_to_redirect(self, vol: int, segs: list[tuple[int, int, Extent | None]],
                          offset: int, data: memoryview) -> Iterator[tuple[int, int, bytearray]]:
        """Contiguous block runs of segs with their full-block content: the new data, and the
        old content of partly written first and last blocks (read-modify-write)."""
        end = offset + len(data)
        i = 0
        while i < len(segs):
            j = i
            while j + 1 < len(segs) and segs[j + 1][0] == segs[j][1]:
                j += 1
            a, b = segs[i][0], segs[j][1]
            buf = bytearray((b - a) * BLOCK_SIZE)
            for sa, sb, e in segs[i:j + 1]:
                for blk in {sa, sb - 1}:  # only edge blocks can be partly written
                    bs, be = blk * BLOCK_SIZE, (blk + 1) * BLOCK_SIZE
                    if e is not None and (bs < offset or be > end):
                        buf[bs - a * BLOCK_SIZE:be - a * BLOCK_SIZE] = self.pool.read(
                            e.pbn + (blk - e.lba), BLOCK_SIZE, vol=vol, lba=blk)
            s, x = max(a * BLOCK_SIZE, offset), min(b * BLOCK_SIZE, end)
            buf[s - a * BLOCK_SIZE:x - a * BLOCK_SIZE] = data[s - offset:x - offset]
            yield a, b, buf
            i = j + 1

    def trim(self, vol: int, offset: int, length: int, zero: bool = False, fua: bool = False
             ) -> None:
        """Unmap the whole blocks in the range (they read as zeros and free their space where
        nothing else holds them).  zero=True also zeroes the partial blocks at its edges;
        trim leaves those alone (TRIM is advisory)."""
        freed: Freed = []
        # The punch guard (native.punch_hold), from before the commit to after the punch.
        # Taken inside the gate: a snapshot that closes the gate may wait for a FLUSH in
        # flight, which waits for the guard's holders.
        with contextlib.ExitStack() as guard:
            with self.native.gate_shared():
                guard.enter_context(self.native.punch_hold())
                with self.native.txn(write=True) as t:
                    vs = catalog.state(t, vol)
                    check_io(vs, offset, length)
                    end = offset + length
                    lo, hi = -(-offset // BLOCK_SIZE), end // BLOCK_SIZE
                    if lo < hi:
                        extmap.holes_over(t, vs, lo, hi, freed)
                    if zero:
                        edges = ([(offset, end)] if lo >= hi else
                                 [(offset, lo * BLOCK_SIZE), (hi * BLOCK_SIZE, end)])
                        for s, x in edges:
                            if s < x:
                                self._write_locked(t, vs, s, memoryview(bytes(x - s)), freed)
                        pool_datasync(self.native)  # data before the (synced) map commit
                    vs.save(t)
            self.punch(freed)
        if fua:
            self.flush()

    def zero(self, vol: int, offset: int, length: int, fua: bool = False) -> None:
        self.trim(vol, offset, length, zero=True, fua=fua)

    def block_status(self, vol: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, allocated) runs covering [offset, offset+length), block-aligned
        outwards.  Unwritten and trimmed ranges are holes that read as zeros."""
        lo, hi = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
        out = []
        pos = lo
        while pos < hi:
            runs = self.native.block_status(vol, pos, hi - pos)
            if not runs:
                break
            for r in runs:
                out.append((r.lba * BLOCK_SIZE, r.len * BLOCK_SIZE, r.pbn != HOLE))
            pos = runs[-1].lba + runs[-1].len
        return out

    def volume_size(self, vol: int) -> int:
        with self.native.txn() as t:
            return catalog.state(t, vol).size_bytes

    # ---- durability and freed space ----------------------------------------------------------

    def flush(self) -> None:
        """Everything written before this call is durable when it returns; then blocks freed
        before the sync become reusable."""
        with self.native.txn() as t:
            seq = allocator.committed_seq(t)
            pending = allocator.pending_blocks(t)
        self.native.sync()
        if pending:  # on a full filesystem (xm_space.c) the next flush releases them
            with contextlib.suppress(errors.PoolFull):
                self.release_pending(seq)

    def release_pending(self, upto_seq: int | None) -> int:
        """In transactions of RELEASE_CHUNK runs, each under the closed I/O gate: after a large
        delete PENDING holds tens of thousands of runs (~17 us each here), and one transaction
        for all of them held every client's I/O at the next FLUSH for a second or more."""
        moved = 0
        # a free whose commit this sync covered may not be punched yet (native.punch_hold):
        # its blocks become FREE, and writable, only after the punch
        self.native.punch_wait()
        while True:
            with self.native.gate_exclusive(), self.native.txn(write=True) as t:
                n = allocator.release_pending(t, upto_seq, RELEASE_CHUNK)
            moved += n
            if n == 0:
                return moved

    def reclaim(self) -> bool:
        """Make pending blocks reusable now (sync first); False if there were none."""
        with self.native.txn() as t:
            seq = allocator.committed_seq(t)
        self.native.sync()
        return self.release_pending(seq) > 0

    def punch(self, freed: Freed, min_blocks: int = 1) -> None:
        """Give freed runs' space back to the pool's filesystem.  Bulk frees (snapshot and
        volume delete, rollback) pass min_blocks=PUNCH_BULK_MIN_BLOCKS: ext4 takes ~0.4 ms a
        punch (measured: 6 of the 8 s of deleting a snapshot that owned 32k scattered
        blocks), and each small hole splits pool.dat's extent tree.  Smaller freed runs stay
        allocated in the file; they are free in the allocator and the next writes reuse them."""
        for pbn, n in extmap.merge_ranges([(p, p + n) for p, n in freed]):
            if n - pbn >= min_blocks:
                self.pool.punch(pbn, n - pbn)

    # ---- snapshots ---------------------------------------------------------------------------

    def snapshot_reader(self, vol: int, epoch: int) -> Callable[[int, Any], None]:
        """read_into(offset, buf) for snapshot epoch of vol."""
        def read(offset: int, buf: Any) -> None:
            buf[:] = self.read_snapshot(vol, epoch, offset, len(buf))
        return read

    def read_snapshot(self, vol: int, epoch: int, offset: int, length: int) -> bytes:
        """Read from snapshot `epoch` of vol: live records born by then plus the dead records
        of its time (see extmap.view_at)."""
        buf = bytearray(length)
        with self.native.gate_shared(), self.native.txn() as t:
            size_bytes = catalog.snap_record(t, vol, epoch).size_bytes
            if offset < 0 or length < 0 or offset + length > size_bytes:
                raise errors.OutOfRange(
                    f"I/O at {offset}+{length} past the end of the snapshot ({size_bytes} bytes)")
            lo, hi = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
            for r in extmap.clip(extmap.view_at(t, vol, epoch, lo, hi), lo, hi):
                s = max(r.lba * BLOCK_SIZE, offset)
                x = min((r.lba + r.len) * BLOCK_SIZE, offset + length)
                buf[s - offset:x - offset] = self.pool.read(
                    r.pbn + (s // BLOCK_SIZE - r.lba), x - s, s % BLOCK_SIZE, vol=vol,
                    lba=s // BLOCK_SIZE)
        return bytes(buf)

    def snapshot_block_status(self, vol: int, epoch: int, offset: int, length: int
                              ) -> list[tuple[int, int, bool]]:
        lo, hi = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
        with self.native.txn() as t:
            recs = extmap.view_at(t, vol, epoch, lo, hi)
        return [(r.lba * BLOCK_SIZE, r.len * BLOCK_SIZE, r.pbn != HOLE)
                for r in extents(recs, lo, hi - lo)]

    def snapshot_size(self, vol: int, epoch: int) -> int:
        with self.native.txn() as t:
            return catalog.snap_record(t, vol, epoch).size_bytes


def check_io(vs: VolState, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > vs.size_bytes:
        raise errors.OutOfRange(
            f"I/O at {offset}+{length} past the end of the volume ({vs.size_bytes} bytes)")


def _segments(recs: list[Extent], lo: int, hi: int) -> Iterator[tuple[int, int, Extent | None]]:
    """[lo, hi) cut by record: (start, end, record or None for a hole)."""
    pos = lo
    for e in recs:
        if e.lba + e.len <= pos or e.lba >= hi:
            continue
        if e.lba > pos:
            yield pos, e.lba, None
        x = min(e.lba + e.len, hi)
        yield max(e.lba, pos), x, e
        pos = x
    if pos < hi:
        yield pos, hi, None


def _in_place_ok(vs: VolState, e: Extent) -> bool:
    """A record born after the newest snapshot that no other record holds.  A SHARED record is
    redirected even when its other holders have gone since (its release then frees the old
    block): the C write path (xm_row.c) decides without reading REFS, and this is its twin."""
    return e.birth > vs.max_snap and not e.flags & F_SHARED
