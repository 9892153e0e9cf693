"""Changed blocks between two points in a volume's history, from the map, never from data.

A snapshot at epoch e sees the records with birth <= e that were not dead by then (live, or
dead with death > e; layout.py).  So between a base snapshot A and a later target B of the
same volume, a block's mapping differs exactly where

    a record visible at A is not visible at B:   birth <= A,   A < death <= B
    a record visible at B is not visible at A:   A < birth <= B, and live or death > B

and both sets are read through the indexes built for snapshot delete: DEADIDX (vol, death,
birth, lba) gives the dead records of a (death, birth) window with one seek per death epoch
(extmap.window), LIVEBIRTH (vol, birth, lba) the live records born after A.  The work follows
the records changed, not the volume size (tests/test_diff.py counts it).  With the live volume
as target, B is "now": deaths after A, births after A.

The ranges are the union of those records' ranges, merged and clipped to the target's size.
They can include blocks whose bytes happen to be equal (a block rewritten with the same data,
or a rollback that brought back old content as new records): the map cannot know, and the
promise is "at least every block that differs, at most the blocks written".

Two different volumes (a clone's snapshot against its origin's, or any pair) share no epochs;
there the two views are compared block by block on their physical block numbers, which is
O(records mapped by either view), not O(changed).  Equal pbns mean equal bytes: a block that
a snapshot or a clone still holds is never written in place (volume.py's in-place rule).

Group commit: a live target's map is read after applying the overlay (engine.commit_batch);
snapshot views never include overlay records (they are born in the current epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import bulk, catalog, errors, extmap, layout
from .layout import BLOCK_SIZE, INFINITY
from .native import Extent, Txn

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True)
class Change:
    """One merged changed range, in bytes, block aligned."""

    offset: int
    length: int

    def to_dict(self) -> dict[str, int]:
        return {"offset": self.offset, "length": self.length}


@dataclass(frozen=True)
class Point:
    """A volume's snapshot (epoch) or its live state (epoch None)."""

    vol: int
    epoch: int | None
    size_bytes: int


def changed_ranges(engine: Engine, volume: str, base: str | int | None,
                   target: str | int | None, base_volume: str | None = None) -> list[Change]:
    """What changed from `base` (a snapshot of base_volume, default `volume`; None: an empty
    volume) to `target` (a snapshot of `volume`; None: its live state)."""
    return changed_and_data(engine, volume, base, target, base_volume)[0]


def changed_and_data(engine: Engine, volume: str, base: str | int | None,
                     target: str | int | None, base_volume: str | None = None
                     ) -> tuple[list[Change], list[Change]]:
    """changed_ranges, and the part of them where the target has data (mapped blocks; the
    rest of the changed ranges are holes there), both from the map in O(changed)."""
    if target is None:
        engine.commit_batch()
    with engine.native.txn() as t:
        to = _point(t, volume, target)
        if base is None:
            ranges = data = _mapped(t, to)
        else:
            frm = _point(t, base_volume or volume, base)
            if frm.epoch is None:
                raise errors.InvalidArgument("the base of a diff is a snapshot (VOL@SNAP)")
            if frm.vol == to.vol:
                if to.epoch is not None and to.epoch < frm.epoch:
                    raise errors.InvalidArgument(
                        f"snapshot {base!r} is newer than {target!r}: give the older one first")
                gone, data = _same_volume(t, to.vol, frm.epoch, to.epoch)
                ranges = gone + data
            else:
                view = _view(t, to)
                ranges = compare_views(_view(t, frm), view)
                data = extmap.intersect_ranges(ranges, _ranges(view))
    return _finish(ranges, to.size_bytes), _finish(data, to.size_bytes)


def _point(t: Txn, volume: str, snap: str | int | None) -> Point:
    vol = catalog.vol_id(t, volume)
    if bulk.busy_volume(t, vol) and snap is None:
        raise errors.Busy(f"volume {volume!r} is being rolled back or cloned: try again when "
                          "that ends")
    if snap is None:
        return Point(vol, None, catalog.state(t, vol).size_bytes)
    epoch = catalog.snap_epoch(t, vol, snap)
    return Point(vol, epoch, catalog.snap_record(t, vol, epoch).size_bytes)


def same_volume(t: Txn, vol: int, a: int, b: int | None) -> list[tuple[int, int]]:
    """Block ranges [lo, hi) whose mapping differs between epoch a and epoch b (None: live),
    from the indexes: O(changed records + death epochs after a)."""
    gone, born = _same_volume(t, vol, a, b)
    return gone + born


def _same_volume(t: Txn, vol: int, a: int, b: int | None
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(ranges of records visible at a and gone by b, ranges of records born after a and
    visible at b).  The second set is where b has data inside the changed ranges; the rest of
    them is a hole at b (two records visible at one epoch never overlap, so a record visible
    at b that is not born after a was visible at a too, and is in neither set)."""
    hi = INFINITY if b is None else b
    gone: list[tuple[int, int]] = []
    born: list[tuple[int, int]] = []
    # Visible at a, gone by b.
    for _, _, lba, n in extmap.window(t, vol, a + 1, hi, 0, a):
        gone.append((lba, lba + n))
    # Born after a, visible at b: live ones through LIVEBIRTH ...
    vs = catalog.state(t, vol)
    if vs.flags & layout.VS_BIRTH_INDEXED:
        stop = layout.livebirth_key(vol, hi, INFINITY)
        for k, v in t.scan(layout.DB_LIVEBIRTH, layout.livebirth_key(vol, a + 1, 0), stop):
            _, _, lba = layout.parse_triple(k, "birth index key")
            born.append((lba, lba + layout.decode_len(v, "birth index entry")))
    # ... and, for a snapshot target, dead ones that died after it.
    if b is not None:
        for _, _, lba, n in extmap.window(t, vol, b + 1, INFINITY, a + 1, b):
            born.append((lba, lba + n))
    return gone, born


def _view(t: Txn, p: Point) -> list[Extent]:
    nblocks = -(-p.size_bytes // BLOCK_SIZE)
    if p.epoch is None:
        recs = t.live_overlap(p.vol, 0, nblocks)
    else:
        recs = extmap.view_at(t, p.vol, p.epoch, 0, nblocks)
    return extmap.clip(sorted(recs), 0, nblocks)


def _ranges(view: list[Extent]) -> list[tuple[int, int]]:
    return [(e.lba, e.lba + e.len) for e in view]


def _mapped(t: Txn, p: Point) -> list[tuple[int, int]]:
    return _ranges(_view(t, p))


def _compare(t: Txn, a: Point, b: Point) -> list[tuple[int, int]]:
    """Ranges where two views map a block to different physical blocks (or one to none)."""
    return compare_views(_view(t, a), _view(t, b))


def compare_views(va: list[Extent], vb: list[Extent]) -> list[tuple[int, int]]:
    """Sweep two sorted, disjoint extent lists; a range differs unless both map it to the same
    pbns.  Also the model twin of same_volume in the tests."""
    cuts = sorted({p for e in va + vb for p in (e.lba, e.lba + e.len)})
    out: list[tuple[int, int]] = []
    ia = ib = 0
    for lo, hi in zip(cuts, cuts[1:]):
        while ia < len(va) and va[ia].lba + va[ia].len <= lo:
            ia += 1
        while ib < len(vb) and vb[ib].lba + vb[ib].len <= lo:
            ib += 1
        pa = _pbn_at(va, ia, lo)
        pb = _pbn_at(vb, ib, lo)
        if pa != pb:
            out.append((lo, hi))
    return out


def _pbn_at(v: list[Extent], i: int, lba: int) -> int | None:
    if i < len(v) and v[i].lba <= lba < v[i].lba + v[i].len:
        return int(v[i].pbn) + (lba - v[i].lba)
    return None


def _finish(ranges: list[tuple[int, int]], size_bytes: int) -> list[Change]:
    nblocks = -(-size_bytes // BLOCK_SIZE)
    out = []
    for lo, hi in extmap.merge_ranges(ranges):
        lo, hi = max(lo, 0), min(hi, nblocks)
        if lo < hi:
            start = lo * BLOCK_SIZE
            out.append(Change(start, min(hi * BLOCK_SIZE, size_bytes) - start))
    return out
