"""Pool space: free extents, blocks waiting to be reused, and reference counts of shared blocks.

Databases (keys big-endian so LMDB's order is numeric order):
    FREE     pbn:u64                  -> len:u64       free runs, coalesced
    PENDING  seq:u64 pbn:u64          -> len:u64       freed, not yet reusable
    REFS     pbn:u64                  -> len:u64 refs:u64   runs held by refs >= 2 map records

A block is in exactly one of: FREE, PENDING, held by map records, or at or above the high-water
mark (never used).  Holders of a block: the live and dead map records whose pbn range covers it;
REFS lists only blocks with two or more holders (rollback and clone share blocks between
records), every other allocated block has exactly one.

Why PENDING: a block freed by a map change must not be written again until that change is
durable, or a crash could leave the old map pointing at someone else's data.  Freed blocks wait
in PENDING under the `seq` of the transaction that freed them; `release_pending(upto)` moves
those with seq <= upto to FREE, and the engine calls it only after a sync and with the I/O gate
closed (so no read that began under the old map is still in flight).  On open, everything
PENDING is released: whatever map state survived a crash no longer refers to it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from . import errors
from .native import DB_FREE, DB_META, DB_PENDING, DB_REFS, Txn

KEY = struct.Struct(">Q")
KEY2 = struct.Struct(">QQ")
U64 = struct.Struct("<Q")
U64x2 = struct.Struct("<QQ")


def _totals(t: Txn) -> list[int]:
    raw = t.get(DB_META, b"blocks")
    return list(U64x2.unpack(raw)) if raw else [0, 0]


def _add_totals(t: Txn, free: int = 0, pending: int = 0) -> None:
    f, p = _totals(t)
    t.put(DB_META, b"blocks", U64x2.pack(f + free, p + pending))


def totals(t: Txn) -> tuple[int, int, int, int]:
    """(high-water mark, pool capacity, free, pending) in blocks."""
    hwm, _ = U64x2.unpack(t.get(DB_META, b"alloc") or U64x2.pack(0, 0))
    cap = U64.unpack(t.get(DB_META, b"pool_blocks") or U64.pack(0))[0]
    f, p = _totals(t)
    return hwm, cap, f, p


def allocate(t: Txn, nblocks: int) -> list[tuple[int, int]]:
    """nblocks of pool space as (pbn, len) runs, contiguous where possible: free runs from the
    next-fit hint onwards first, then fresh space at the high-water mark."""
    hwm, hint = U64x2.unpack(t.get(DB_META, b"alloc") or U64x2.pack(0, 0))
    runs: list[tuple[int, int]] = []
    need = nblocks
    taken = 0
    for start in (hint, 0):
        if need == 0:
            break
        with t.cursor(DB_FREE) as cur:
            item = cur.seek(KEY.pack(start))
            while item is not None and need > 0:
                pbn = KEY.unpack(item[0])[0]
                if start == 0 and pbn >= hint:
                    break
                length = U64.unpack(item[1])[0]
                take = min(length, need)
                cur.delete()
                if take < length:
                    t.put(DB_FREE, KEY.pack(pbn + take), U64.pack(length - take))
                runs.append((pbn, take))
                need -= take
                taken += take
                hint = pbn + take
                item = cur.seek(KEY.pack(pbn + take))
    if need:
        cap = U64.unpack(t.get(DB_META, b"pool_blocks") or U64.pack(0))[0]
        if hwm + need > cap:
            raise errors.PoolFull(
                f"pool full: {need} more blocks needed, {cap - hwm} left at the end of the pool")
        runs.append((hwm, need))
        hwm += need
        hint = hwm
    t.put(DB_META, b"alloc", U64x2.pack(hwm, hint))
    if taken:
        _add_totals(t, free=-taken)
    merged: list[tuple[int, int]] = []
    for pbn, n in runs:
        if merged and merged[-1][0] + merged[-1][1] == pbn:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((pbn, n))
    return merged


def _refs_overlapping(t: Txn, pbn: int, end: int) -> list[tuple[int, int, int]]:
    """REFS runs (start, len, refs) overlapping [pbn, end), in order."""
    out = []
    with t.cursor(DB_REFS) as cur:
        item = cur.seek_le(KEY.pack(pbn))
        if item is None:
            item = cur.seek(KEY.pack(pbn))
        while item is not None:
            s = KEY.unpack(item[0])[0]
            if s >= end:
                break
            length, refs = U64x2.unpack(item[1])
            if s + length > pbn:
                out.append((s, length, refs))
            item = cur.next()
    return out


def _split(pbn: int, end: int, runs: list[tuple[int, int, int]]
           ) -> Iterator[tuple[int, int, tuple[int, int, int] | None]]:
    """[pbn, end) cut at REFS run boundaries: (start, stop, the run covering it or None)."""
    pos = pbn
    for run in runs:
        s, length, _ = run
        if s > pos:
            yield pos, min(s, end), None
            pos = min(s, end)
        if pos >= end:
            return
        stop = min(s + length, end)
        if stop > pos:
            yield pos, stop, run
            pos = stop
    if pos < end:
        yield pos, end, None


def _set_refs(t: Txn, run: tuple[int, int, int], start: int, stop: int, refs: int) -> None:
    """Within REFS run `run`, give [start, stop) the count refs (1: drop it from REFS)."""
    s, length, old = run
    t.delete(DB_REFS, KEY.pack(s))
    if s < start:
        t.put(DB_REFS, KEY.pack(s), U64x2.pack(start - s, old))
    if refs >= 2:
        t.put(DB_REFS, KEY.pack(start), U64x2.pack(stop - start, refs))
    if stop < s + length:
        t.put(DB_REFS, KEY.pack(stop), U64x2.pack(s + length - stop, old))


def share(t: Txn, pbn: int, nblocks: int) -> None:
    """One more map record holds [pbn, pbn+nblocks)."""
    end = pbn + nblocks
    for start, stop, run in list(_split(pbn, end, _refs_overlapping(t, pbn, end))):
        if run is None:
            t.put(DB_REFS, KEY.pack(start), U64x2.pack(stop - start, 2))
        else:
            _set_refs(t, run, start, stop, run[2] + 1)


def refs_of(t: Txn, pbn: int, nblocks: int) -> list[tuple[int, int, int]]:
    """[pbn, pbn+nblocks) cut into (start, stop, holders)."""
    end = pbn + nblocks
    return [(a, b, 1 if run is None else run[2])
            for a, b, run in _split(pbn, end, _refs_overlapping(t, pbn, end))]


def release(t: Txn, pbn: int, nblocks: int, freed: list[tuple[int, int]]) -> None:
    """One map record no longer holds [pbn, pbn+nblocks): shared blocks lose a holder, the
    rest go to PENDING (and to `freed`, for the caller to punch after commit)."""
    end = pbn + nblocks
    seq = None
    for start, stop, run in list(_split(pbn, end, _refs_overlapping(t, pbn, end))):
        if run is not None:
            _set_refs(t, run, start, stop, run[2] - 1)
            continue
        if seq is None:
            seq = _txn_seq(t)
        t.put(DB_PENDING, KEY2.pack(seq, start), U64.pack(stop - start))
        _add_totals(t, pending=stop - start)
        freed.append((start, stop - start))


def _txn_seq(t: Txn) -> int:
    """The seq of this transaction's frees: one more than the last committed one."""
    cached = getattr(t, "_free_seq", None)
    if cached is not None:
        return int(cached)
    seq = U64.unpack(t.get(DB_META, b"seq") or U64.pack(0))[0] + 1
    t.put(DB_META, b"seq", U64.pack(seq))
    t._free_seq = seq  # type: ignore[attr-defined]
    return seq


def committed_seq(t: Txn) -> int:
    return int(U64.unpack(t.get(DB_META, b"seq") or U64.pack(0))[0])


def pending_blocks(t: Txn) -> int:
    return _totals(t)[1]


def release_pending(t: Txn, upto_seq: int | None = None) -> int:
    """Move PENDING runs with seq <= upto_seq (None: all) to FREE; returns blocks moved."""
    moved = 0
    items = []
    for k, v in t.scan(DB_PENDING, b""):
        seq, pbn = KEY2.unpack(k)
        if upto_seq is not None and seq > upto_seq:
            break
        items.append((k, pbn, U64.unpack(v)[0]))
    for k, pbn, n in items:
        t.delete(DB_PENDING, k)
        free_run(t, pbn, n)
        moved += n
    if moved:
        _add_totals(t, free=moved, pending=-moved)
    return moved


def free_run(t: Txn, pbn: int, n: int) -> None:
    """Insert [pbn, pbn+n) into FREE, coalescing with its neighbours (totals not touched)."""
    with t.cursor(DB_FREE) as cur:
        before = cur.seek_le(KEY.pack(pbn))
        if before is not None:
            bp = KEY.unpack(before[0])[0]
            bl = U64.unpack(before[1])[0]
            if bp + bl == pbn:
                t.delete(DB_FREE, before[0])
                pbn, n = bp, bl + n
    after = t.get(DB_FREE, KEY.pack(pbn + n))
    if after is not None:
        t.delete(DB_FREE, KEY.pack(pbn + n))
        n += U64.unpack(after)[0]
    t.put(DB_FREE, KEY.pack(pbn), U64.pack(n))
