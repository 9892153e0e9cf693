"""Bulk metadata work in bounded chunks: snapshot delete, rollback, volume delete.

Each long operation first commits a *mark* (a work item in META `bulk`, together with whatever
makes its effect visible at once), then does its walk in chunks: one LMDB write transaction of
at most CHUNK map records each (SNAPDISK_BULK_CHUNK, default 10000; up to 4 times that while
no request is served, bulk_pace.py), so LMDB's writer lock is held for tens of milliseconds at
a time (about 40 ms at 10000 records here) and I/O on every other volume goes on between
chunks.  The walks take what is left from the committed map, never a saved position (rollback
keeps one: the block up to which it has restored), so a crash between chunks is resumed by
`Engine.open` (recover -> `finish_all`), and a cancel stops cleanly between two chunks, leaving
the rest marked.

    drop_window    a deleted snapshot's dead records: p < birth <= t < death <= n.  The mark
                   drops the snapshot record and its name (the name is free at once); the
                   window's records are needed by no existing snapshot (the windows of two
                   snapshots never overlap, see extmap.py), so nobody reads them meanwhile.
    unindex        LIVEBIRTH entries born by `birth_hi` once a volume's last snapshot is gone.
    delete_volume  the mark drops the volume's names, records and snapshots; the chunks release
                   its live and dead records.  Volume ids are never reused.
    rollback       the volume is forgotten by the hot path (reads and writes refused, ENOVOL)
                   while it is marked; each chunk restores whole merged ranges up to a position
                   kept in META `bulk:<vol>`.
    clone          the mark creates the volume; each step copies CLONE_STEP blocks of the
                   snapshot's view (position in META `bulk:<vol>`); the hot path learns the
                   volume at the end.

The chunks run in C (xm_bulk.c) or, with SNAPDISK_BULK_PATH=python, as the Python twins below,
which leave the same databases (tests/test_extmap_diff.py compares every database; C may order
its operations differently, e.g. a delete's frees are settled in pbn order, merged, at the end
of the chunk: allocator.release_sorted).  While requests are served beside it, a walk paces
itself between chunks (bulk_pace.py).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any

from . import allocator, catalog, errors, extmap, layout, native
from .bulk_pace import Pacer
from .catalog import VolState
from .layout import DB_COUNTERS, DB_DEAD, DB_LIVE, DB_LIVEBIRTH, DB_META, INFINITY
from .native import Extent, NativeStore, Txn
from .volume import PUNCH_BULK_MIN_BLOCKS, DataPath, Freed, configure

CHUNK = int(os.environ.get("SNAPDISK_BULK_CHUNK", "10000"))
CLONE_STEP = 64 * layout.MAX_EXTENT  # blocks of the snapshot a clone copies per transaction
Item = dict[str, Any]


def c_path() -> bool:
    return os.environ.get("SNAPDISK_BULK_PATH") != "python"


# ---- the work list (META bulk) -------------------------------------------------------------

def _load(t: Txn) -> dict[str, Any]:
    raw = t.get(DB_META, layout.META_BULK)
    if raw is None:
        return {"next": 1, "items": []}
    try:
        doc = json.loads(raw)
        assert isinstance(doc, dict) and isinstance(doc["items"], list)
        return doc
    except (ValueError, KeyError, AssertionError) as e:
        raise errors.Corrupt(f"META bulk (marked bulk work) cannot be read: {e}") from e


def _save(t: Txn, doc: dict[str, Any]) -> None:
    if doc["items"]:
        t.put(DB_META, layout.META_BULK, json.dumps(doc, sort_keys=True).encode())
    else:
        t.delete(DB_META, layout.META_BULK)  # no work left: the key is gone (check.py)


def pending(t: Txn) -> list[Item]:
    return list(_load(t)["items"])


def mark(t: Txn, item: Item) -> Item:
    """Add a work item in t (the caller's mark transaction); returns it with its id."""
    doc = _load(t)
    item = {**item, "id": doc["next"]}
    doc["next"] += 1
    doc["items"].append(item)
    _save(t, doc)
    return item


def _unmark(t: Txn, item: Item) -> None:
    doc = _load(t)
    doc["items"] = [i for i in doc["items"] if i["id"] != item["id"]]
    _save(t, doc)


def _update(t: Txn, item: Item) -> None:
    doc = _load(t)
    doc["items"] = [item if i["id"] == item["id"] else i for i in doc["items"]]
    _save(t, doc)


def busy_volume(t: Txn, vol: int) -> bool:
    """True while vol is being rolled back (its map is half restored), is a clone being
    copied, or is the source of one (its snapshot must stay)."""
    return any((i["op"] in ("rollback", "clone") and i["vol"] == vol)
               or (i["op"] == "clone" and i["src"] == vol) for i in _load(t)["items"])


# ---- the Python twins of xm_bulk.c ---------------------------------------------------------

def py_drop_window(t: Txn, vol: int, window: list[int], limit: int, freed: Freed) -> int:
    """Twin of xm_bulk_drop_window."""
    dlo, dhi, blo, bhi = window
    entries = extmap.window(t, vol, dlo, dhi, blo, bhi, limit)
    runs = []
    for death, birth, lba, _ in entries:
        e = extmap.drop_dead(t, vol, lba, birth, death)
        runs.append((e.pbn, e.len))
    allocator.release_sorted(t, runs, freed)
    return len(entries)


def py_drop_volume(t: Txn, vol: int, limit: int, freed: Freed) -> int:
    """Twin of xm_bulk_drop_volume: live records (and LIVEBIRTH), then dead ones (and
    DEADIDX), their blocks released together at the end."""
    prefix = layout.vol_key(vol)
    live: list[tuple[int, tuple[int, int, int, int]]] = []
    for k, v in t.scan_prefix(DB_LIVE, prefix):
        if len(live) >= limit:
            break
        live.append((layout.parse_live_key(k)[1], layout.decode_rec(v, "live record")))
    runs = []
    for lba, (length, _, pbn, birth) in live:
        runs.append((pbn, length))
        t.delete(DB_LIVE, layout.live_key(vol, lba))
        t.delete(DB_LIVEBIRTH, layout.livebirth_key(vol, birth, lba))
    dead: list[tuple[tuple[int, int, int], tuple[int, int, int, int]]] = []
    if len(live) < limit:
        for k, v in t.scan_prefix(DB_DEAD, prefix):
            if len(live) + len(dead) >= limit:
                break
            dead.append((layout.parse_triple(k, "dead record key"),
                         layout.decode_rec(v, "dead record")))
    for (_, lba, birth), (length, _, pbn, death) in dead:
        runs.append((pbn, length))
        t.delete(DB_DEAD, layout.dead_key(vol, lba, birth))
        t.delete(layout.DB_DEADIDX, layout.deadidx_key(vol, death, birth, lba))
    allocator.release_sorted(t, runs, freed)
    return len(live) + len(dead)


def py_del_range(t: Txn, db: int, lo: bytes, hi: bytes, limit: int) -> int:
    """Twin of xm_bulk_del_range."""
    keys: list[bytes] = []
    for k, _ in t.scan(db, lo, hi):
        if len(keys) >= limit:
            break
        keys.append(k)
    for k in keys:
        t.delete(db, k)
    return len(keys)


# ---- the driver -----------------------------------------------------------------------------

Step = Callable[[int], None]


class Bulk:
    """Runs marked work chunk by chunk.  One walk at a time (a lock): two walks would only
    take turns at LMDB's writer lock anyway."""

    def __init__(self, ns: NativeStore, io: DataPath):
        self.native = ns
        self.io = io
        self.lock = threading.Lock()
        self.c = c_path()

    def finish_all(self, blocking: bool = True) -> None:
        """Finish every marked item (open, check; after each walk, leftovers of a cancelled
        one).  blocking=False: not if another walk runs now (it may be long)."""
        if not self.lock.acquire(blocking):
            return
        try:
            while True:
                with self.native.txn() as t:
                    items = pending(t)
                if not items:
                    return
                self._run(items[0], lambda n: None)
        finally:
            self.lock.release()

    def run(self, item: Item, step: Step, total: Step | None = None) -> None:
        """Run item to its end; step(records) after each chunk; total(records) once known
        (rollback: from its plan)."""
        with self.lock:
            self._run(item, step, total)

    def _run(self, item: Item, step: Step, total: Step | None = None) -> None:
        op = item["op"]
        if op == "rollback":
            self._rollback(item, step, total or (lambda n: None))
            return
        if op == "clone":
            self._clone(item, step)
            return
        pace = Pacer(self.native, CHUNK)
        while True:
            n = pace(lambda limit: self._chunk(item, limit))
            step(n)
            if n < pace.last:
                break
        with self.native.txn(write=True) as t:
            self._finish(t, item)

    def _chunk(self, item: Item, limit: int) -> int:
        op, vol = item["op"], item["vol"]
        if self.c:
            if op == "drop_window":
                return native.bulk_drop_window(self.native, vol, item["window"], limit,
                                               PUNCH_BULK_MIN_BLOCKS)
            if op == "delete_volume":
                return native.bulk_drop_volume(self.native, vol, limit, PUNCH_BULK_MIN_BLOCKS)
            lo, hi = _unindex_range(item)
            return native.bulk_del_range(self.native, DB_LIVEBIRTH, lo, hi, limit)

        def body(t: Txn, freed: Freed) -> int:
            if op == "drop_window":
                return py_drop_window(t, vol, item["window"], limit, freed)
            if op == "delete_volume":
                return py_drop_volume(t, vol, limit, freed)
            lo, hi = _unindex_range(item)
            return py_del_range(t, DB_LIVEBIRTH, lo, hi, limit)
        return self._py_punched(body)

    def _py_punched(self, body: Callable[[Txn, Freed], int]) -> int:
        """A Python twin's chunk: body(t, freed) in one write transaction, then the punch of
        what it freed, under the punch guard from before the commit to after the punch (xm.h,
        as bk_end does in C); body's result."""
        freed: Freed = []
        with self.native.punch_hold():
            with self.native.txn(write=True) as t:
                n = body(t, freed)
            self.io.punch(freed, PUNCH_BULK_MIN_BLOCKS)
        return n

    def _finish(self, t: Txn, item: Item) -> None:
        """The walk is done: what is left is O(snapshots) (counters, the index flag)."""
        vol = item["vol"]
        if item["op"] == "delete_volume":
            for db in (DB_COUNTERS, DB_LIVEBIRTH):
                t.delete_prefix(db, layout.vol_key(vol))
        elif item["op"] == "unindex":
            vs = VolState.load(t, vol)
            with t.cursor(DB_LIVEBIRTH) as cur:
                hit = cur.seek(layout.vol_key(vol))
            left = hit is not None and hit[0][:4] == layout.vol_key(vol)
            if vs is not None and vs.nsnaps == 0 and not left:
                vs.flags &= ~layout.VS_BIRTH_INDEXED
                vs.save(t)
        _unmark(t, item)


    def _rollback(self, item: Item, step: Step, total: Step) -> None:
        """Restore whole merged ranges (holes over them, then copies of the snapshot's records
        there) a chunk at a time, from the saved position on.  The plan is recomputed from the
        committed map: below the position it is restored (what differs there now are only the
        copies, born after t, which lie inside restored ranges), above it untouched."""
        vol, epoch = item["vol"], item["epoch"]
        with self.native.txn() as t:
            vs = catalog.state(t, vol)
            raw = t.get(DB_META, _pos_key(vol))
            pos = layout.decode_u64(raw, "rollback position") if raw is not None else 0
            if not self.c:
                ranges, targets = py_rollback_plan(t, vs, epoch, pos)
        pace = Pacer(self.native, CHUNK)
        if self.c:
            plan = native.RollbackPlan(self.native, vol, epoch,
                                       bool(vs.flags & layout.VS_BIRTH_INDEXED), pos)
            total(plan.weight)
            while n := pace(lambda limit: plan.apply(limit, _pos_key(vol), PUNCH_BULK_MIN_BLOCKS)):
                step(n)
        else:
            total(sum(w for _, _, w in ranges))
            plan_py = _Slices(ranges, targets)
            while n := pace(lambda limit: self._py_rollback_chunk(vol, plan_py, limit)):
                step(n)
        with self.native.gate_exclusive():
            with self.native.txn(write=True) as t:
                vs = catalog.state(t, vol)
                vs.size_bytes = catalog.snap_record(t, vol, epoch).size_bytes
                vs.save(t)
                t.delete(DB_META, _pos_key(vol))
                _unmark(t, item)
            configure(self.native, vs)

    def _py_rollback_chunk(self, vol: int, plan: _Slices, limit: int) -> int:
        """One chunk of the Python twin of a rollback; its weight, 0 when done."""
        got = plan.take(limit)
        if got is None:
            return 0
        chunk, recs, n = got

        def body(t: Txn, freed: Freed) -> int:
            py_rollback_apply(t, vol, chunk, recs, chunk[-1][1], freed)
            return n
        return self._py_punched(body)

    def _clone(self, item: Item, step: Step) -> None:
        """Copy the snapshot's view into the new volume CLONE_STEP blocks at a time, from the
        saved position on; then the hot path learns the volume."""
        dst, src, epoch = item["vol"], item["src"], item["epoch"]
        with self.native.txn() as t:
            raw = t.get(DB_META, _pos_key(dst))
            pos = layout.decode_u64(raw, "clone position") if raw is not None else 0
            nblocks = -(-catalog.state(t, dst).size_bytes // layout.BLOCK_SIZE)
        for lo in range(pos, nblocks, CLONE_STEP):
            hi = min(lo + CLONE_STEP, nblocks)
            if self.c:
                native.bulk_clone_step(self.native, src, epoch, dst, lo, hi, _pos_key(dst))
            else:
                with self.native.txn(write=True) as t:
                    py_clone_step(t, src, epoch, dst, lo, hi)
            step(1)
        with self.native.gate_exclusive():
            with self.native.txn(write=True) as t:
                vs = catalog.state(t, dst)
                t.delete(DB_META, _pos_key(dst))
                _unmark(t, item)
            configure(self.native, vs)


def py_clone_step(t: Txn, src_vol: int, epoch: int, dst: int, lo: int, hi: int) -> None:
    """Twin of xm_bulk_clone_step."""
    src = catalog.state(t, src_vol)
    vs = catalog.state(t, dst)
    recs = extmap.view_at(t, src_vol, epoch, lo, hi)
    _mark_live_shared(t, src, recs)
    extmap.copy_in(t, vs, extmap.clip(recs, lo, hi), 1)
    src.flags |= layout.VS_SHARED
    src.save(t)
    vs.save(t)
    t.put(DB_META, _pos_key(dst), layout.encode_u64(hi))


def _mark_live_shared(t: Txn, vs: VolState, recs: list[Extent]) -> None:
    """Source records still live get SHARED, so no later write (even once the snapshot is
    gone and they look unshared by birth) rewrites them in place under the clone."""
    for e in recs:
        if e.flags & layout.F_SHARED:
            continue
        raw = t.get(DB_LIVE, layout.live_key(vs.vol, e.lba))
        if raw is not None and layout.decode_rec(raw) == (e.len, e.flags, e.pbn, e.birth):
            extmap.put_live(t, vs, e._replace(flags=e.flags | layout.F_SHARED))


def _pos_key(vol: int) -> bytes:
    """META key of a rollback's position (the block below which it has restored)."""
    return layout.META_BULK + b":" + layout.vol_key(vol)


class _Slices:
    """Chunks of a rollback plan (xm_bulk_rollback_apply's slicing): take(limit) is the next
    ranges while none is taken or their weight is under limit, with the targets inside them,
    and the weight; None at the end."""

    def __init__(self, ranges: list[tuple[int, int, int]], targets: list[Extent]):
        self.ranges, self.targets = ranges, targets
        self.k = self.ti = 0

    def take(self, limit: int) -> tuple[list[tuple[int, int]], list[Extent], int] | None:
        ranges, targets = self.ranges, self.targets
        if self.k >= len(ranges):
            return None
        chunk: list[tuple[int, int]] = []
        n = 0
        while self.k < len(ranges) and (not chunk or n < limit):
            chunk.append(ranges[self.k][:2])
            n += ranges[self.k][2]
            self.k += 1
        start = self.ti
        while self.ti < len(targets) and targets[self.ti].lba < chunk[-1][1]:
            self.ti += 1
        return chunk, targets[start:self.ti], n


def py_rollback_plan(t: Txn, vs: VolState, epoch: int, pos: int
                     ) -> tuple[list[tuple[int, int, int]], list[Extent]]:
    """Twin of xm_bulk_rollback_plan: merged ranges at or above pos (start, end, records
    starting in it) and the snapshot's records there to copy back, sorted."""
    targets = sorted(extmap.dead_record(t, vs.vol, lba, birth) for _, birth, lba, _
                     in extmap.window(t, vs.vol, epoch + 1, INFINITY, 0, epoch))
    raw = sorted(list(extmap.live_ranges_born_after(t, vs, epoch))
                 + [(e.lba, e.lba + e.len) for e in targets])
    out: list[tuple[int, int, int]] = []
    for a, b in raw:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b), out[-1][2] + 1)
        else:
            out.append((a, b, 1))
    return [r for r in out if r[0] >= pos], [e for e in targets if e.lba >= pos]


def py_rollback_apply(t: Txn, vol: int, ranges: list[tuple[int, int]], recs: list[Extent],
                      pos: int, freed: Freed) -> None:
    """Twin of xm_bulk_rollback_apply."""
    vs = catalog.state(t, vol)
    for a, b in ranges:
        extmap.holes_over(t, vs, a, b, freed)
    extmap.copy_in(t, vs, recs, vs.epoch)
    vs.save(t)
    t.put(DB_META, _pos_key(vol), layout.encode_u64(pos))


def _unindex_range(item: Item) -> tuple[bytes, bytes]:
    vol = item["vol"]
    return (layout.livebirth_key(vol, 0, 0),
            layout.livebirth_key(vol, min(item["birth_hi"] + 1, INFINITY), 0))

