"""Bulk metadata work in bounded chunks: snapshot delete, rollback, volume delete.

Each long operation first commits a *mark* (a work item in META `bulk`, together with whatever
makes its effect visible at once), then does its walk in chunks: one LMDB write transaction of
at most CHUNK map records each (SNAPDISK_BULK_CHUNK, default 10000), so LMDB's writer lock is
held for milliseconds and I/O on every other volume goes on between chunks.  The walks take
what is left from the committed map, never a saved position (rollback keeps one: the block up
to which it has restored), so a crash between chunks is resumed by `Engine.open` (recover ->
`finish_all`), and a cancel stops cleanly between two chunks, leaving the rest marked.

    drop_window    a deleted snapshot's dead records: p < birth <= t < death <= n.  The mark
                   drops the snapshot record and its name (the name is free at once); the
                   window's records are needed by no existing snapshot (the windows of two
                   snapshots never overlap, see extmap.py), so nobody reads them meanwhile.
    unindex        LIVEBIRTH entries born by `birth_hi` once a volume's last snapshot is gone.
    delete_volume  the mark drops the volume's names, records and snapshots; the chunks release
                   its live and dead records.  Volume ids are never reused.
    rollback       the volume is forgotten by the hot path (reads and writes refused, ENOVOL)
                   while it is marked; each chunk restores whole merged ranges up to `pos`.

The chunks run in C (xm_bulk.c) or, with SNAPDISK_BULK_PATH=python, as the Python twins below,
which do the same database operations in the same order (tests/test_extmap_diff.py compares
every database).  Rollback's chunks are Python only for now.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from collections.abc import Callable
from typing import Any

from . import allocator, catalog, errors, extmap, layout, native
from .catalog import VolState
from .layout import DB_COUNTERS, DB_DEAD, DB_LIVE, DB_LIVEBIRTH, DB_META, INFINITY
from .native import Extent, NativeStore, Txn
from .volume import PUNCH_BULK_MIN_BLOCKS, DataPath, Freed, configure

CHUNK = int(os.environ.get("SNAPDISK_BULK_CHUNK", "10000"))
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
    """True while vol is being rolled back (its map is half restored)."""
    return any(i["op"] == "rollback" and i["vol"] == vol for i in _load(t)["items"])


# ---- the Python twins of xm_bulk.c ---------------------------------------------------------

def py_drop_window(t: Txn, vol: int, window: list[int], limit: int, freed: Freed) -> int:
    """Twin of xm_bulk_drop_window."""
    dlo, dhi, blo, bhi = window
    entries = extmap.window(t, vol, dlo, dhi, blo, bhi, limit)
    for death, birth, lba, _ in entries:
        e = extmap.drop_dead(t, vol, lba, birth, death)
        allocator.release(t, e.pbn, e.len, freed)
    return len(entries)


def py_drop_volume(t: Txn, vol: int, limit: int, freed: Freed) -> int:
    """Twin of xm_bulk_drop_volume: live records (and LIVEBIRTH), then dead ones (and
    DEADIDX)."""
    prefix = layout.vol_key(vol)
    live: list[tuple[int, tuple[int, int, int, int]]] = []
    for k, v in t.scan_prefix(DB_LIVE, prefix):
        if len(live) >= limit:
            break
        live.append((layout.parse_live_key(k)[1], layout.decode_rec(v, "live record")))
    for lba, (length, _, pbn, birth) in live:
        allocator.release(t, pbn, length, freed)
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
        allocator.release(t, pbn, length, freed)
        t.delete(DB_DEAD, layout.dead_key(vol, lba, birth))
        t.delete(layout.DB_DEADIDX, layout.deadidx_key(vol, death, birth, lba))
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

    def finish_all(self) -> None:
        """Finish every marked item (open, check, and before a new bulk mark)."""
        with self.lock:
            while True:
                with self.native.txn() as t:
                    items = pending(t)
                if not items:
                    return
                self._run(items[0], lambda n: None)

    def run(self, item: Item, step: Step) -> None:
        with self.lock:
            self._run(item, step)

    def _run(self, item: Item, step: Step) -> None:
        op = item["op"]
        if op == "rollback":
            self._rollback(item, step)
            return
        while True:
            n = self._chunk(item)
            step(n)
            if n < CHUNK:
                break
        with self.native.txn(write=True) as t:
            self._finish(t, item)

    def _chunk(self, item: Item) -> int:
        op, vol = item["op"], item["vol"]
        if self.c:
            if op == "drop_window":
                return native.bulk_drop_window(self.native, vol, item["window"], CHUNK,
                                               PUNCH_BULK_MIN_BLOCKS)
            if op == "delete_volume":
                return native.bulk_drop_volume(self.native, vol, CHUNK, PUNCH_BULK_MIN_BLOCKS)
            lo, hi = _unindex_range(item)
            return native.bulk_del_range(self.native, DB_LIVEBIRTH, lo, hi, CHUNK)
        freed: Freed = []
        with self.native.txn(write=True) as t:
            if op == "drop_window":
                n = py_drop_window(t, vol, item["window"], CHUNK, freed)
            elif op == "delete_volume":
                n = py_drop_volume(t, vol, CHUNK, freed)
            else:
                lo, hi = _unindex_range(item)
                n = py_del_range(t, DB_LIVEBIRTH, lo, hi, CHUNK)
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


    def _rollback(self, item: Item, step: Step) -> None:
        """Restore whole merged ranges (extmap.holes_over, then copy_in of the snapshot's records
        there) a chunk at a time, from item["pos"] on.  The ranges and targets are recomputed
        from the committed map: below pos they are restored (what differs there now are only the
        copies, born after t, which lie inside restored ranges), at or above pos untouched."""
        vol, epoch = item["vol"], item["epoch"]
        with self.native.txn() as t:
            vs = catalog.state(t, vol)
            targets = sorted(extmap.dead_record(t, vol, lba, birth) for _, birth, lba, _
                             in extmap.window(t, vol, epoch + 1, INFINITY, 0, epoch))
            live = list(extmap.live_ranges_born_after(t, vs, epoch))
        ranges = extmap.merge_ranges(live + [(e.lba, e.lba + e.len) for e in targets])
        ranges = [r for r in ranges if r[0] >= item["pos"]]
        starts = sorted(a for a, _ in live)
        ti = 0
        while ti < len(targets) and targets[ti].lba < item["pos"]:
            ti += 1
        k = 0
        while k < len(ranges):
            chunk: list[tuple[int, int]] = []
            recs: list[Extent] = []
            n = 0
            while k < len(ranges) and (not chunk or n < CHUNK):
                a, b = ranges[k]
                chunk.append((a, b))
                n += bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)
                while ti < len(targets) and targets[ti].lba < b:
                    recs.append(targets[ti])
                    ti += 1
                    n += 1
                k += 1
            freed: Freed = []
            with self.native.txn(write=True) as t:
                vs = catalog.state(t, vol)
                for a, b in chunk:
                    extmap.holes_over(t, vs, a, b, freed)
                extmap.copy_in(t, vs, recs, vs.epoch)
                vs.save(t)
                item = {**item, "pos": chunk[-1][1]}
                _update(t, item)
            self.io.punch(freed, PUNCH_BULK_MIN_BLOCKS)
            step(n)
        with self.native.gate_exclusive():
            with self.native.txn(write=True) as t:
                vs = catalog.state(t, vol)
                vs.size_bytes = catalog.snap_record(t, vol, epoch).size_bytes
                vs.save(t)
                _unmark(t, item)
            configure(self.native, vs)


def rollback_total(t: Txn, vs: VolState, epoch: int) -> int:
    """Records a rollback to epoch will touch (progress total)."""
    return (len(extmap.window(t, vs.vol, epoch + 1, INFINITY, 0, epoch))
            + sum(1 for _ in extmap.live_ranges_born_after(t, vs, epoch)))


def _unindex_range(item: Item) -> tuple[bytes, bytes]:
    vol = item["vol"]
    return (layout.livebirth_key(vol, 0, 0),
            layout.livebirth_key(vol, min(item["birth_hi"] + 1, INFINITY), 0))

