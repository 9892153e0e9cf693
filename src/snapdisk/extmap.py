"""The redirect-on-write extent map: a volume's blocks, now and at each of its snapshots.

Model
-----
Each volume counts epochs.  Writes happen in the volume's current epoch E; taking a snapshot
names the current epoch (snapshot t = E) and moves the volume to E+1.  Every map record carries
the epoch its data was written in (`birth`); a record that has been overwritten, trimmed or
rolled back also carries the epoch it stopped being current in (`death`).  A record is part of
the view of snapshot t exactly when  birth <= t < death  (live records: death = infinity).  So a
snapshot is a number, and creating one touches no record (O(1)): this is ZFS's birth-time
scheme, kept in LMDB, with the dead lists indexed by (death, birth).

    live record   (vol, lba) -> len, flags, pbn, birth          current view, one lookup
    dead record   (vol, lba, birth) -> len, flags, pbn, death   kept while a snapshot needs it

Writes (redirect-on-write).  Writing a block whose record was born after the newest snapshot,
and whose blocks no other record holds, rewrites it in place: no map change at all (the C hot
path, xm_write_inplace).  Otherwise the data goes to newly allocated blocks, the new record (born
now) replaces the covered part of the old one, and the covered part is *killed*: it becomes a
dead record if some snapshot needs it (birth <= newest snapshot), else its blocks are released.
Nothing is ever copied.

Reads.  The live view is the live records: the read cost does not depend on how many snapshots
exist.  Reading snapshot t merges live records with birth <= t and dead records with
birth <= t < death; the dead scan starts MAX_EXTENT blocks before the range (no record is
longer), so it costs O(dead versions of the range), growing with the number of snapshots that
changed it.

Snapshot deletion.  Dead record r is needed while some snapshot s has birth <= s < death.
Deleting snapshot t (previous snapshot p, next n) frees exactly the dead records with
p < birth <= t and t < death <= n: found through DEADIDX (vol, death, birth, lba), at a cost in
proportion to what is freed.  COUNTERS keeps the blocks per (vol, death, birth), so the exclusive
size of a snapshot is a sum over a few counters, no map scan.

Rollback to t.  The blocks that differ between the live view and snapshot t are the live records
born after t (LIVEBIRTH (vol, birth, lba), kept only while the volume has snapshots) and the
dead records with birth <= t < death.  Those ranges are overlaid with copies of t's records
(born now, flagged SHARED, their blocks' holder counts raised); the live records there are
killed.  Cost: O(changed since t), whatever the volume size.  Later snapshots survive.

Clone of snapshot t: a new volume whose live map is a copy of t's view (SHARED, holders raised):
O(metadata of t), no data copied.  Blocks stay alive until their last holder goes (allocator.py).

Databases: LIVE, LIVEBIRTH, DEAD, DEADIDX, COUNTERS; their keys and values are in layout.py.

Invariants (checked by check.py): live records of a volume are disjoint, no longer than
MAX_EXTENT, inside the volume, born at or before its epoch; each dead record is needed by an
existing snapshot, disjoint from the other records visible at any snapshot, and mirrored in
DEADIDX and COUNTERS; every block is held by exactly as many records as REFS says (1 if absent).

Crash semantics: every change here happens inside one LMDB write transaction together with the
allocation it needs, so after a crash either all of a write's map change is there or none, and
new data is written to its new blocks before the transaction that points at them commits.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import allocator, layout
from .catalog import VolState
from .layout import (
    DB_COUNTERS,
    DB_DEAD,
    DB_DEADIDX,
    DB_LIVE,
    DB_LIVEBIRTH,
    DB_REFS,
    F_SHARED,
    INFINITY,
    MAX_EXTENT,
    VS_BIRTH_INDEXED,
    VS_SHARED,
)
from .native import HOLE, Extent, Txn, insert


def vol_prefix(vol: int) -> bytes:
    return layout.vol_key(vol)


# ---- live records ---------------------------------------------------------------------------

def put_live(t: Txn, vs: VolState, e: Extent) -> None:
    t.put(DB_LIVE, layout.live_key(vs.vol, e.lba), layout.encode_rec(e.len, e.flags, e.pbn, e.birth))
    if vs.nsnaps > 0:  # only a rollback to an existing snapshot can ask for it
        t.put(DB_LIVEBIRTH, layout.livebirth_key(vs.vol, e.birth, e.lba), layout.encode_len(e.len))
        vs.flags |= VS_BIRTH_INDEXED


def del_live(t: Txn, vs: VolState, e: Extent) -> None:
    t.delete(DB_LIVE, layout.live_key(vs.vol, e.lba))
    if vs.flags & VS_BIRTH_INDEXED:
        t.delete(DB_LIVEBIRTH, layout.livebirth_key(vs.vol, e.birth, e.lba))


def overlay(t: Txn, vs: VolState, new: Extent) -> list[Extent]:
    """Make `new` current over its range (a hole if new.pbn is HOLE); returns the parts of the
    old records it covers, which the caller must kill."""
    old = t.live_overlap(vs.vol, new.lba, new.len)
    keep, gone = insert(old, new, MAX_EXTENT)
    kept = set(keep)
    olds = set(old)
    for o in old:
        if o not in kept:
            del_live(t, vs, o)
    for k in keep:
        if k not in olds:
            put_live(t, vs, k)
    return gone


def kill(t: Txn, vs: VolState, piece: Extent, freed: list[tuple[int, int]]) -> None:
    """`piece` stops being current now: keep it for the snapshots that need it, else release."""
    vs.live_blocks -= piece.len
    if piece.birth <= vs.max_snap:
        add_dead(t, vs.vol, piece, vs.epoch)
    else:
        allocator.release(t, piece.pbn, piece.len, freed)


# ---- dead records ---------------------------------------------------------------------------

def add_dead(t: Txn, vol: int, e: Extent, death: int) -> None:
    t.put(DB_DEAD, layout.dead_key(vol, e.lba, e.birth),
          layout.encode_rec(e.len, e.flags, e.pbn, death))
    t.put(DB_DEADIDX, layout.deadidx_key(vol, death, e.birth, e.lba), layout.encode_len(e.len))
    _count(t, vol, death, e.birth, e.len)


def drop_dead(t: Txn, vol: int, lba: int, birth: int, death: int) -> Extent:
    """Forget a dead record (its blocks are the caller's to release); returns it."""
    e = dead_record(t, vol, lba, birth)
    t.delete(DB_DEAD, layout.dead_key(vol, lba, birth))
    t.delete(DB_DEADIDX, layout.deadidx_key(vol, death, birth, lba))
    _count(t, vol, death, birth, -e.len)
    return e


def dead_record(t: Txn, vol: int, lba: int, birth: int) -> Extent:
    raw = t.get(DB_DEAD, layout.dead_key(vol, lba, birth))
    if raw is None:
        from .errors import Corrupt
        raise Corrupt(f"volume {vol}: DEADIDX names a missing dead record at block {lba}")
    length, flags, pbn, _ = layout.decode_rec(raw, "dead record")
    return Extent(lba, pbn, birth, length, flags)


def _count(t: Txn, vol: int, death: int, birth: int, delta: int) -> None:
    key = layout.counter_key(vol, death, birth)
    raw = t.get(DB_COUNTERS, key)
    n = (layout.decode_u64(raw, "dead block counter") if raw else 0) + delta
    if n:
        t.put(DB_COUNTERS, key, layout.encode_u64(n))
    elif raw:
        t.delete(DB_COUNTERS, key)


def window(t: Txn, vol: int, death_lo: int, death_hi: int, birth_lo: int, birth_hi: int,
           limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """Dead records with death_lo <= death <= death_hi and birth_lo <= birth <= birth_hi, as
    (death, birth, lba, len), at most limit of them.  It seeks past births outside the window,
    so the cost follows what it returns plus one seek per death epoch in range (the twin of
    xm_bulk.c's window)."""
    out: list[tuple[int, int, int, int]] = []
    with t.cursor(DB_DEADIDX) as cur:
        item = cur.seek(layout.deadidx_key(vol, death_lo, birth_lo, 0))
        while item is not None and (limit is None or len(out) < limit):
            v, death, birth, lba = layout.parse_deadidx_key(item[0])
            if v != vol or death > death_hi:
                break
            if birth < birth_lo:
                item = cur.seek(layout.deadidx_key(vol, death, birth_lo, 0))
            elif birth > birth_hi:
                if death >= INFINITY:
                    break
                item = cur.seek(layout.deadidx_key(vol, death + 1, birth_lo, 0))
            else:
                out.append((death, birth, lba, layout.decode_len(item[1], "dead index entry")))
                item = cur.next()
    return out


def counted_blocks(t: Txn, vol: int, death_lo: int, death_hi: int, birth_lo: int,
                   birth_hi: int) -> int:
    """Sum of COUNTERS over the window: dead blocks, no map scan."""
    total = 0
    hi_key = layout.counter_key(vol, death_hi, birth_hi)
    for k, v in t.scan(DB_COUNTERS, layout.counter_key(vol, death_lo, 0)):
        if k > hi_key:
            break
        _, death, birth = layout.parse_triple(k, "counter key")
        if birth_lo <= birth <= birth_hi and death_lo <= death <= death_hi:
            total += layout.decode_u64(v, "dead block counter")
    return total


def has_shared_blocks(t: Txn) -> bool:
    with t.cursor(DB_REFS) as cur:
        return cur.seek(b"") is not None


# ---- views ----------------------------------------------------------------------------------

def view_at(t: Txn, vol: int, epoch: int, lo: int, hi: int) -> list[Extent]:
    """Records of snapshot `epoch`'s view overlapping [lo, hi), sorted (not clipped)."""
    recs = [e for e in t.live_overlap(vol, lo, hi - lo)
            if e.birth <= epoch and e.lba < hi and e.lba + e.len > lo]
    start = layout.dead_key(vol, max(0, lo - MAX_EXTENT + 1), 0)
    stop = layout.dead_key(vol, hi, 0)
    for k, v in t.scan(DB_DEAD, start, stop):
        _, lba, birth = layout.parse_triple(k, "dead record key")
        length, flags, pbn, death = layout.decode_rec(v, "dead record")
        if birth <= epoch < death and lba + length > lo:
            recs.append(Extent(lba, pbn, birth, length, flags))
    recs.sort()
    return recs


def clip(recs: list[Extent], lo: int, hi: int) -> list[Extent]:
    out = []
    for e in recs:
        s, x = max(e.lba, lo), min(e.lba + e.len, hi)
        if s < x:
            out.append(Extent(s, e.pbn + (s - e.lba), e.birth, x - s, e.flags))
    return out


def live_ranges_born_after(t: Txn, vs: VolState, epoch: int) -> Iterator[tuple[int, int]]:
    if not vs.flags & VS_BIRTH_INDEXED:
        return
    stop = layout.livebirth_key(vs.vol, INFINITY, INFINITY)
    for k, v in t.scan(DB_LIVEBIRTH, layout.livebirth_key(vs.vol, epoch + 1, 0), stop):
        _, _, lba = layout.parse_triple(k, "birth index key")
        yield lba, lba + layout.decode_len(v, "birth index entry")


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def intersect_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]
                     ) -> list[tuple[int, int]]:
    """The overlap of two lists of [lo, hi) ranges (each merged and sorted first)."""
    a, b = merge_ranges(a), merge_ranges(b)
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def holes_over(t: Txn, vs: VolState, lo: int, hi: int, freed: list[tuple[int, int]]) -> None:
    """Unmap [lo, hi) of the live view, killing what was there."""
    pos = lo
    while pos < hi:
        n = min(hi - pos, 1 << 20)
        for piece in overlay(t, vs, Extent(pos, HOLE, 0, n, 0)):
            kill(t, vs, piece, freed)
        pos += n


def copy_in(t: Txn, vs: VolState, recs: list[Extent], birth: int) -> None:
    """Add copies of recs (already clipped to holes of the live view) as live records that
    share their blocks."""
    for e in recs:
        pos = 0
        while pos < e.len:
            n = min(e.len - pos, MAX_EXTENT)
            put_live(t, vs, Extent(e.lba + pos, e.pbn + pos, birth, n, F_SHARED))
            allocator.share(t, e.pbn + pos, n)
            pos += n
        vs.live_blocks += e.len
    if recs:
        vs.flags |= VS_SHARED
