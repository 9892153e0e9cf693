"""Plain-Python twins of the pure C routines in native/xm_map.c.

They exist to be compared with the C versions (tests/test_extmap_diff.py) and to benchmark the
C gain (benchmarks/test_core_bench.py); the engine itself calls the C versions.  Keep each
function a line-for-line match of its C twin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import Corrupt
from .native import HOLE, Extent

_U32 = 0xFFFFFFFF


def _plan_emit(out: list[Extent], r: Extent) -> None:
    if out:
        p = out[-1]
        if p.pbn == HOLE and r.pbn == HOLE:
            out[-1] = p._replace(len=p.len + r.len)
            return
        if p.pbn != HOLE and r.pbn != HOLE and p.pbn + p.len == r.pbn:
            out[-1] = p._replace(len=p.len + r.len)
            return
    out.append(r)


def _status_emit(out: list[Extent], r: Extent) -> None:
    r = Extent(r.lba, HOLE if r.pbn == HOLE else 0, 0, r.len, 0)
    if out and out[-1].pbn == r.pbn and out[-1].len + r.len <= _U32:
        out[-1] = out[-1]._replace(len=out[-1].len + r.len)
        return
    out.append(r)


def _walk(ext: Sequence[Extent], lba: int, nblocks: int,
          emit: Callable[[list[Extent], Extent], None]) -> list[Extent]:
    pos, end, prev_end = lba, lba + nblocks, 0
    out: list[Extent] = []
    for i, e in enumerate(ext):
        e_end = e.lba + e.len
        if e.len == 0 or (i > 0 and e.lba < prev_end):
            raise Corrupt("overlapping or empty extents")
        prev_end = e_end
        if e_end <= pos:
            continue
        if e.lba >= end:
            break
        if e.lba > pos:
            emit(out, Extent(pos, HOLE, 0, e.lba - pos, 0))
        s = max(e.lba, pos)
        t = min(e_end, end)
        emit(out, Extent(s, e.pbn + (s - e.lba), e.birth, t - s, e.flags))
        pos = t
    while pos < end:
        n = min(end - pos, _U32)
        emit(out, Extent(pos, HOLE, 0, n, 0))
        pos += n
    return out


def plan(ext: Sequence[Extent], lba: int, nblocks: int) -> list[Extent]:
    """[lba, lba+nblocks) cut into mapped runs (physically contiguous ones merged) and holes."""
    return _walk(ext, lba, nblocks, _plan_emit)


def extents(ext: Sequence[Extent], lba: int, nblocks: int) -> list[Extent]:
    """Block status: allocated runs (pbn 0) and holes (pbn HOLE)."""
    return _walk(ext, lba, nblocks, _status_emit)


def _mergeable(a: Extent, b: Extent, max_len: int) -> bool:
    return (a.pbn != HOLE and b.pbn != HOLE and a.lba + a.len == b.lba and a.pbn + a.len == b.pbn
            and a.birth == b.birth and a.flags == b.flags and a.len + b.len <= max_len)


def insert(old: Sequence[Extent], nw: Extent, max_len: int) -> tuple[list[Extent], list[Extent]]:
    """Overlay nw on old: (records that replace old, parts of old that nw covers)."""
    a, b = nw.lba, nw.lba + nw.len
    keep: list[Extent] = []
    gone: list[Extent] = []
    placed = nw.pbn == HOLE
    if nw.len == 0:
        raise Corrupt("empty extent")
    for i, o in enumerate(old):
        o_end = o.lba + o.len
        if o.len == 0 or (i > 0 and o.lba < old[i - 1].lba + old[i - 1].len):
            raise Corrupt("overlapping or empty extents")
        if not placed and o.lba >= a:
            keep.append(nw)
            placed = True
        if o_end <= a or o.lba >= b:
            keep.append(o)
            continue
        if o.lba < a:
            keep.append(o._replace(len=a - o.lba))
        s, t = max(o.lba, a), min(o_end, b)
        gone.append(Extent(s, o.pbn + (s - o.lba), o.birth, t - s, o.flags))
        if not placed:
            keep.append(nw)
            placed = True
        if o_end > b:
            keep.append(Extent(b, o.pbn + (b - o.lba), o.birth, o_end - b, o.flags))
    if not placed:
        keep.append(nw)
    merged: list[Extent] = []
    for e in keep:
        if merged and _mergeable(merged[-1], e, max_len):
            merged[-1] = merged[-1]._replace(len=merged[-1].len + e.len)
        else:
            merged.append(e)
    return merged, gone
