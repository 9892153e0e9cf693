"""Pool space: free extents, blocks waiting to be reused, and reference counts of shared blocks.

Databases (encodings in layout.py):
    FREE     pbn -> len          free runs, coalesced
    PENDING  (seq, pbn) -> len   freed, not yet reusable
    REFS     pbn -> (len, refs)  runs held by refs >= 2 map records
META `alloc` (high-water mark, next-fit hint), `pool_blocks`, `seq` and `blocks` (FREE and
PENDING totals) are this module's too.

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

from collections.abc import Iterator

from . import errors, layout
from .layout import (
    DB_FREE,
    DB_META,
    DB_PENDING,
    DB_REFS,
    META_ALLOC,
    META_BLOCKS,
    META_POOL_BLOCKS,
    META_SEQ,
    decode_pair,
    decode_u64,
    encode_pair,
    encode_u64,
    parse_pbn_key,
    pbn_key,
)
from .native import Txn


def _meta_pair(t: Txn, key: bytes) -> tuple[int, int]:
    raw = t.get(DB_META, key)
    return decode_pair(raw, "allocator META record") if raw is not None else (0, 0)


def _meta_u64(t: Txn, key: bytes) -> int:
    raw = t.get(DB_META, key)
    return decode_u64(raw, "allocator META record") if raw is not None else 0


def _totals(t: Txn) -> tuple[int, int]:
    return _meta_pair(t, META_BLOCKS)


def _add_totals(t: Txn, free: int = 0, pending: int = 0) -> None:
    f, p = _totals(t)
    t.put(DB_META, META_BLOCKS, encode_pair(f + free, p + pending))


def totals(t: Txn) -> tuple[int, int, int, int]:
    """(high-water mark, pool capacity, free, pending) in blocks."""
    hwm, _ = _meta_pair(t, META_ALLOC)
    cap = _meta_u64(t, META_POOL_BLOCKS)
    f, p = _totals(t)
    return hwm, cap, f, p


def allocate(t: Txn, nblocks: int) -> list[tuple[int, int]]:
    """nblocks of pool space as (pbn, len) runs, contiguous where possible: free runs from the
    next-fit hint onwards first, then fresh space at the high-water mark."""
    hwm, hint = _meta_pair(t, META_ALLOC)
    runs: list[tuple[int, int]] = []
    need = nblocks
    taken = 0
    for start in (hint, 0):
        if need == 0:
            break
        with t.cursor(DB_FREE) as cur:
            item = cur.seek(pbn_key(start))
            while item is not None and need > 0:
                pbn = parse_pbn_key(item[0])
                if start == 0 and pbn >= hint:
                    break
                length = decode_u64(item[1], "free run")
                take = min(length, need)
                cur.delete()
                if take < length:
                    t.put(DB_FREE, pbn_key(pbn + take), encode_u64(length - take))
                runs.append((pbn, take))
                need -= take
                taken += take
                hint = pbn + take
                item = cur.seek(pbn_key(pbn + take))
    if need:
        cap = _meta_u64(t, META_POOL_BLOCKS)
        if hwm + need > cap:
            raise errors.PoolFull(
                f"pool full: {need} more blocks needed, {cap - hwm} left at the end of the pool")
        runs.append((hwm, need))
        hwm += need
        hint = hwm
    t.put(DB_META, META_ALLOC, encode_pair(hwm, hint))
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
        item = cur.seek_le(pbn_key(pbn))
        if item is None:
            item = cur.seek(pbn_key(pbn))
        while item is not None:
            s = parse_pbn_key(item[0])
            if s >= end:
                break
            length, refs = layout.decode_refs(item[1])
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
    t.delete(DB_REFS, pbn_key(s))
    if s < start:
        t.put(DB_REFS, pbn_key(s), encode_pair(start - s, old))
    if refs >= 2:
        t.put(DB_REFS, pbn_key(start), encode_pair(stop - start, refs))
    if stop < s + length:
        t.put(DB_REFS, pbn_key(stop), encode_pair(s + length - stop, old))


def share(t: Txn, pbn: int, nblocks: int) -> None:
    """One more map record holds [pbn, pbn+nblocks)."""
    end = pbn + nblocks
    for start, stop, run in list(_split(pbn, end, _refs_overlapping(t, pbn, end))):
        if run is None:
            t.put(DB_REFS, pbn_key(start), encode_pair(stop - start, 2))
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
    seq = None
    for start, n in _unhold(t, pbn, pbn + nblocks):
        if seq is None:
            seq = _txn_seq(t)
        t.put(DB_PENDING, layout.pending_key(seq, start), encode_u64(n))
        _add_totals(t, pending=n)
        freed.append((start, n))


def release_sorted(t: Txn, runs: list[tuple[int, int]], freed: list[tuple[int, int]]) -> None:
    """release() of many (pbn, nblocks) runs at once, the twin of the bulk walks' C frees
    (xm_bulk_chunk.c): in pbn order, the free pieces merged where adjacent and put in PENDING
    as one run each, META `blocks` counted up once.  A block freed twice is a damaged map."""
    pieces = [p for pbn, n in sorted(runs) for p in _unhold(t, pbn, pbn + n)]
    merged: list[tuple[int, int]] = []
    for a, n in sorted(pieces):
        if merged and a <= merged[-1][0] + merged[-1][1]:
            if a < merged[-1][0] + merged[-1][1]:
                raise errors.Corrupt(f"block {a} is freed twice (map records overlap)")
            merged[-1] = (merged[-1][0], a + n - merged[-1][0])
        else:
            merged.append((a, n))
    if not merged:
        return
    seq = _txn_seq(t)
    for a, n in merged:
        t.put(DB_PENDING, layout.pending_key(seq, a), encode_u64(n))
    _add_totals(t, pending=sum(n for _, n in merged))
    freed.extend(merged)


def _unhold(t: Txn, pbn: int, end: int) -> list[tuple[int, int]]:
    """[pbn, end) loses one holder: shared runs count one less (REFS); the pieces no one else
    holds are returned, (start, nblocks), for PENDING."""
    pieces = []
    for start, stop, run in list(_split(pbn, end, _refs_overlapping(t, pbn, end))):
        if run is not None:
            _set_refs(t, run, start, stop, run[2] - 1)
        else:
            pieces.append((start, stop - start))
    return pieces


def _txn_seq(t: Txn) -> int:
    """The seq of this transaction's frees: one more than the last committed one."""
    cached = getattr(t, "_free_seq", None)
    if cached is not None:
        return int(cached)
    seq = _meta_u64(t, META_SEQ) + 1
    t.put(DB_META, META_SEQ, encode_u64(seq))
    t._free_seq = seq  # type: ignore[attr-defined]
    return seq


def committed_seq(t: Txn) -> int:
    return _meta_u64(t, META_SEQ)


def pending_blocks(t: Txn) -> int:
    return _totals(t)[1]


def release_pending(t: Txn, upto_seq: int | None = None, limit: int | None = None) -> int:
    """Move PENDING runs with seq <= upto_seq (None: all) to FREE, at most `limit` runs (None:
    all); returns blocks moved."""
    moved = 0
    items: list[tuple[bytes, int, int]] = []
    for k, v in t.scan(DB_PENDING, b""):
        seq, pbn = layout.parse_pending_key(k)
        if (upto_seq is not None and seq > upto_seq) or (limit is not None and len(items) >= limit):
            break
        items.append((k, pbn, decode_u64(v, "pending run")))
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
        before = cur.seek_le(pbn_key(pbn))
        if before is not None:
            bp = parse_pbn_key(before[0])
            bl = decode_u64(before[1], "free run")
            if bp + bl == pbn:
                t.delete(DB_FREE, before[0])
                pbn, n = bp, bl + n
    after = t.get(DB_FREE, pbn_key(pbn + n))
    if after is not None:
        t.delete(DB_FREE, pbn_key(pbn + n))
        n += decode_u64(after, "free run")
    t.put(DB_FREE, pbn_key(pbn), encode_u64(n))
