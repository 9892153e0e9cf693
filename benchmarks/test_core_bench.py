"""The C core against its plain-Python twins, per routine (pytest-benchmark).

Each pair runs the same input: the C side is called the way the engine calls it (arrays already
in C memory, one cffi call), the Python side on lists of Extent.  `python benchmarks/test_core_bench.py`
prints the ratio table the report uses; the target is >= 10x on each routine.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import timeit
from collections.abc import Callable
from typing import Any

import pytest
from snapdisk._xm import ffi, lib  # type: ignore[import-not-found]

from snapdisk import extmap_ref, native
from snapdisk.native import BLOCK_SIZE, HOLE, MAX_EXTENT, Extent


def scattered(n: int, seed: int = 1) -> list[Extent]:
    """n single-block records over 2n blocks, physically scattered: a random-write history."""
    rng = random.Random(seed)
    lbas = sorted(rng.sample(range(2 * n), n))
    return [Extent(lba, rng.randrange(1 << 30), 1, 1, 0) for lba in lbas]


def cases() -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    exts = scattered(256)
    c_exts = native.to_c(exts)
    out = ffi.new("xm_extent[]", 2 * len(exts) + 2)
    nout = ffi.new("size_t *")
    span = exts[-1].lba + 1
    # insert: a 16-block write over a run of 16 single-block records and its neighbours
    old = [Extent(100 + i, 5000 + 3 * i, 1, 1, 0) for i in range(18)]
    new = Extent(101, 9000, 2, 16, 0)
    c_old, c_new = native.to_c(old), native.to_c([new])
    keep, gone = ffi.new("xm_extent[]", 20), ffi.new("xm_extent[]", 18)
    nk, ng = ffi.new("size_t *"), ffi.new("size_t *")
    return {
        "plan (256 records)": (
            lambda: lib.xm_plan(c_exts, len(exts), 0, span, out, 2 * len(exts) + 2, nout),
            lambda: extmap_ref.plan(exts, 0, span)),
        "extents (256 records)": (
            lambda: lib.xm_extents(c_exts, len(exts), 0, span, out, 2 * len(exts) + 2, nout),
            lambda: extmap_ref.extents(exts, 0, span)),
        "insert (18 records)": (
            lambda: lib.xm_insert(c_old, len(old), c_new, MAX_EXTENT, keep, nk, gone, ng),
            lambda: extmap_ref.insert(old, new, MAX_EXTENT)),
    }


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("routine", list(cases()))
def test_routine(benchmark: Any, routine: str, impl: str) -> None:
    c, py = cases()[routine]
    benchmark.group = routine
    benchmark(c if impl == "c" else py)


class HotPath:
    """A 64 MiB volume written with scattered 4 KiB writes, read 4 KiB at a time through the C
    hot path (one call) and through the Python general path (lookup, plan, pread in Python)."""

    def __init__(self) -> None:
        from snapdisk.store import StoreConfig
        from snapdisk.volume import Engine
        self.dir = tempfile.mkdtemp()
        self.engine = Engine.create(self.dir, StoreConfig(pool_bytes=256 << 20))
        self.vol = self.engine.create_volume("v", 64 << 20).id
        rng = random.Random(2)
        for b in rng.sample(range(16384), 4096):
            self.engine.write(self.vol, b * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
        self.buf = bytearray(BLOCK_SIZE)
        self.rng = random.Random(3)

    def c_read(self) -> None:
        self.engine.read_into(self.vol, self.rng.randrange(16384) * BLOCK_SIZE, self.buf)

    def py_read(self) -> None:
        lba = self.rng.randrange(16384)
        with self.engine.native.txn() as t:
            recs = t.live_overlap(self.vol, lba, 1)
        for r in extmap_ref.plan(recs, lba, 1):
            if r.pbn != HOLE:
                self.buf[:] = self.engine.pool.read(r.pbn, BLOCK_SIZE)

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir)


@pytest.mark.parametrize("impl", ["c", "python"])
def test_hot_path_read(benchmark: Any, impl: str) -> None:
    hp = HotPath()
    try:
        benchmark.group = "4 KiB live read"
        benchmark(hp.c_read if impl == "c" else hp.py_read)
    finally:
        hp.close()


def ratios(seconds: float = 0.3) -> list[tuple[str, float, float, float]]:
    """(routine, C ops/s, Python ops/s, ratio), each the best of 5 timed runs."""
    rows = []
    hp = HotPath()
    try:
        pairs = dict(cases())
        pairs["4 KiB live read (whole hot path)"] = (hp.c_read, hp.py_read)
        for name, (c, py) in pairs.items():
            rates = []
            for f in (c, py):
                n = max(1, int(timeit.timeit(f, number=50) and seconds / (timeit.timeit(f, number=50) / 50)))
                rates.append(n / min(timeit.repeat(f, number=n, repeat=5)))
            rows.append((name, rates[0], rates[1], rates[0] / rates[1]))
    finally:
        hp.close()
    return rows


if __name__ == "__main__":
    print(f"{'routine':36} {'C ops/s':>12} {'Python ops/s':>13} {'C/Python':>9}")
    for name, c, py, r in ratios(float(sys.argv[1]) if len(sys.argv) > 1 else 0.3):
        print(f"{name:36} {c:12,.0f} {py:13,.0f} {r:8.1f}x")
