"""The C routines and their plain-Python twins agree on random inputs (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapdisk import extmap_ref, native
from snapdisk.errors import Corrupt
from snapdisk.native import HOLE, Extent


@st.composite
def extent_lists(draw: st.DrawFn, max_len: int = 40) -> list[Extent]:
    """Sorted, disjoint records: random gaps and lengths; pbns often contiguous so merges
    happen; a few births and flags so merge rules are exercised."""
    n = draw(st.integers(0, 12))
    out = []
    lba = draw(st.integers(0, 20))
    pbn = draw(st.integers(0, 1000))
    for _ in range(n):
        lba += draw(st.integers(0, 6))
        length = draw(st.integers(1, max_len))
        pbn = pbn if draw(st.booleans()) else draw(st.integers(0, 5000))
        out.append(Extent(lba, pbn, draw(st.integers(1, 3)), length, draw(st.sampled_from([0, 1]))))
        lba += length
        pbn += length
    return out


ranges = st.tuples(st.integers(0, 400), st.integers(1, 400))


@settings(max_examples=400, deadline=None)
@given(extent_lists(), ranges)
def test_plan_matches_reference(exts: list[Extent], rng: tuple[int, int]) -> None:
    lba, n = rng
    c = native.plan(exts, lba, n)
    assert c == extmap_ref.plan(exts, lba, n)
    assert sum(r.len for r in c) == n  # it covers the request exactly
    assert c[0].lba == lba


@settings(max_examples=400, deadline=None)
@given(extent_lists(), ranges)
def test_extents_match_reference(exts: list[Extent], rng: tuple[int, int]) -> None:
    lba, n = rng
    c = native.extents(exts, lba, n)
    assert c == extmap_ref.extents(exts, lba, n)
    assert all(a.pbn != b.pbn for a, b in zip(c, c[1:]))  # alternating


@settings(max_examples=600, deadline=None)
@given(extent_lists(), st.integers(0, 400), st.integers(1, 64), st.integers(0, 6000),
       st.integers(1, 3), st.booleans(), st.sampled_from([8, 64, 1024]))
def test_insert_matches_reference(exts: list[Extent], lba: int, n: int, pbn: int, birth: int,
                                  hole: bool, max_len: int) -> None:
    # xm_insert is called with the records that overlap or touch the new extent
    old = [e for e in exts if e.lba <= lba + n and e.lba + e.len >= lba]
    new = Extent(lba, HOLE if hole else pbn, birth, n, 0)
    c_keep, c_gone = native.insert(old, new, max_len)
    p_keep, p_gone = extmap_ref.insert(old, new, max_len)
    assert (c_keep, c_gone) == (p_keep, p_gone)
    # and the result means what it should: the new view is old outside, new inside
    def view(recs: list[Extent]) -> dict[int, int]:
        return {r.lba + i: r.pbn + i for r in recs for i in range(r.len)}
    before, after = view(old), view(c_keep)
    for b in range(lba - 2, lba + n + 2):
        if lba <= b < lba + n:
            assert after.get(b) == (None if hole else pbn + b - lba)
            assert (b in before) == any(g.lba <= b < g.lba + g.len for g in c_gone)
        else:
            assert after.get(b) == before.get(b)


def test_corrupt_input_is_refused_by_both() -> None:
    overlapping = [Extent(0, 10, 1, 5, 0), Extent(3, 50, 1, 5, 0)]
    for f in (native.plan, extmap_ref.plan):
        with pytest.raises(Corrupt):
            f(overlapping, 0, 10)
    with pytest.raises(Corrupt):
        native.insert(overlapping, Extent(1, 5, 1, 1, 0))
    with pytest.raises(Corrupt):
        extmap_ref.insert(overlapping, Extent(1, 5, 1, 1, 0), 1024)
