"""Engine-level figures (in-process, no NBD): snapshot-create latency with little and much data
written, rollback and snapshot-delete time against the data changed, live 4 KiB read rate with
0 and 255 snapshots, redirect-on-write rate right after a snapshot, and RSS while writing
random 4 KiB blocks.

    python benchmarks/engine_figures.py [--quick] [--json OUT]

Times are wall-clock on a shared machine: each figure is the median of repeated runs and the
report shows the spread; the assertions on *work* live in tests/test_work.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from typing import Any

from snapdisk.native import BLOCK_SIZE
from snapdisk.store import StoreConfig
from snapdisk.volume import Engine

BS = BLOCK_SIZE
BLOCK = os.urandom(BS)


def rss_bytes(kind: str = "VmRSS") -> int:
    """VmRSS, or RssAnon (this process's own memory) or RssFile (mapped file pages: LMDB's map,
    page cache the kernel can drop at will)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) * 1024
    return 0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def fill_random(e: Engine, vol: int, nblocks: int, space: int, seed: int,
                sample: list[tuple[float, int, int]] | None = None) -> None:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for i, b in enumerate(rng.sample(range(space), nblocks)):
        e.write(vol, b * BS, BLOCK)
        if sample is not None and i % 16384 == 0:
            sample.append((time.perf_counter() - t0, i * BS, rss_bytes()))


def fill_seq(e: Engine, vol: int, nbytes: int) -> None:
    chunk = BLOCK * 256
    for off in range(0, nbytes, len(chunk)):
        e.write(vol, off, chunk[:min(len(chunk), nbytes - off)])


def snapshot_latency(e: Engine, name: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        e.create_snapshot(name)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    q = args.quick
    big = (256 << 20) if q else (4 << 30)
    res: dict[str, Any] = {"quick": q}
    d = tempfile.mkdtemp(prefix="snapdisk-fig-", dir=args.dir)
    try:
        e = Engine.create(d, StoreConfig(pool_bytes=3 * big + (1 << 30)))
        # 1. RSS while writing random 4 KiB blocks over the whole of a big volume
        rss_vol = e.create_volume("rss", big).id
        rss0 = rss_bytes()
        samples: list[tuple[float, int, int]] = []
        t = time.perf_counter()
        fill_random(e, rss_vol, big // BS, big // BS, 1, samples)
        dt = time.perf_counter() - t
        res["random_fill"] = {"bytes": big, "seconds": dt, "writes_per_s": big // BS / dt,
                              "rss_start": rss0,
                              "rss_max": max(s[2] for s in samples + [(0, 0, rss_bytes())]),
                              "rss_anon_end": rss_bytes("RssAnon"),
                              "rss_file_end": rss_bytes("RssFile"), "samples": samples}
        # 2. snapshot latency: 64 MiB written vs the big volume (all of it written)
        small = e.create_volume("small", 64 << 20).id
        fill_seq(e, small, 64 << 20)
        n = 20 if q else 100
        lat = {"64MiB": snapshot_latency(e, "small", n), "big": snapshot_latency(e, "rss", n)}
        res["snapshot_create"] = {k: {"p50_ms": statistics.median(v) * 1e3,
                                      "p99_ms": pct(v, 99) * 1e3, "max_ms": max(v) * 1e3}
                                  for k, v in lat.items()}
        res["snapshot_create"]["big_bytes"] = big
        # 3. live 4 KiB random reads with 0 and 255 snapshots
        reads = e.create_volume("reads", 256 << 20).id
        fill_random(e, reads, 32768, 65536, 2)
        rng = random.Random(3)
        buf = bytearray(BS)

        def read_rate() -> float:
            m = 20000 if q else 200000
            offs = [rng.randrange(65536) * BS for _ in range(m)]
            t = time.perf_counter()
            for off in offs:
                e.read_into(reads, off, buf)
            return m / (time.perf_counter() - t)

        r0 = [read_rate() for _ in range(3)]
        for _ in range(255):
            e.create_snapshot("reads")
            for b in rng.sample(range(65536), 16):
                e.write(reads, b * BS, BLOCK)
        r255 = [read_rate() for _ in range(3)]
        res["live_read_4k"] = {"snapshots_0": statistics.median(r0),
                               "snapshots_255": statistics.median(r255),
                               "ratio": statistics.median(r255) / statistics.median(r0)}
        # 4. redirect-on-write: first writes after a snapshot, vs in place
        row = e.create_volume("row", 256 << 20).id
        fill_seq(e, row, 256 << 20)
        blocks = random.Random(4).sample(range(65536), 20000 if q else 60000)
        t = time.perf_counter()
        for b in blocks:
            e.write(row, b * BS, BLOCK)
        inplace = len(blocks) / (time.perf_counter() - t)
        e.create_snapshot("row")
        t = time.perf_counter()
        for b in blocks:
            e.write(row, b * BS, BLOCK)
        redirected = len(blocks) / (time.perf_counter() - t)
        res["write_4k"] = {"in_place_per_s": inplace, "after_snapshot_per_s": redirected}
        # 5. rollback and snapshot delete against the share of the volume changed
        vol_bytes = (256 << 20) if q else (1 << 30)
        res["rollback"] = []
        for share in (0.01, 0.10, 0.50):
            name = f"rb{int(share * 100)}"
            vid = e.create_volume(name, vol_bytes).id
            fill_seq(e, vid, vol_bytes)
            e.create_snapshot(name, "base")
            fill_random(e, vid, int(vol_bytes // BS * share), vol_bytes // BS, 5)
            e.create_snapshot(name, "after")
            t = time.perf_counter()
            e.rollback(name, "base")
            t_rb = time.perf_counter() - t
            t = time.perf_counter()
            e.delete_snapshot(name, "after")
            t_del = time.perf_counter() - t
            res["rollback"].append({"volume_bytes": vol_bytes, "changed": share,
                                    "rollback_s": t_rb, "delete_snapshot_s": t_del})
            e.delete_volume(name)
            e.flush()
        res["check_ok"] = e.check().ok
        e.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def print_table(r: dict[str, Any]) -> None:
    f = r["random_fill"]
    print(f"random 4 KiB fill of {f['bytes'] >> 20} MiB: {f['writes_per_s']:,.0f} writes/s, "
          f"RSS {f['rss_start'] >> 20} -> max {f['rss_max'] >> 20} MiB "
          f"(at the end {f['rss_anon_end'] >> 20} MiB anonymous + {f['rss_file_end'] >> 20} MiB "
          "mapped LMDB/file pages)")
    s = r["snapshot_create"]
    print(f"snapshot create, 64 MiB written:  p50 {s['64MiB']['p50_ms']:.2f} ms  "
          f"p99 {s['64MiB']['p99_ms']:.2f} ms  max {s['64MiB']['max_ms']:.2f} ms")
    print(f"snapshot create, {s['big_bytes'] >> 20} MiB written: p50 {s['big']['p50_ms']:.2f} ms  "
          f"p99 {s['big']['p99_ms']:.2f} ms  max {s['big']['max_ms']:.2f} ms  "
          f"(p50 ratio {s['big']['p50_ms'] / s['64MiB']['p50_ms']:.2f}x)")
    lr = r["live_read_4k"]
    print(f"live 4 KiB random read: {lr['snapshots_0']:,.0f}/s with 0 snapshots, "
          f"{lr['snapshots_255']:,.0f}/s with 255 ({lr['ratio']:.2f}x)")
    w = r["write_4k"]
    print(f"4 KiB random write: {w['in_place_per_s']:,.0f}/s in place, "
          f"{w['after_snapshot_per_s']:,.0f}/s right after a snapshot (redirected)")
    for rb in r["rollback"]:
        print(f"rollback of {rb['volume_bytes'] >> 20} MiB with {rb['changed']:.0%} changed: "
              f"{rb['rollback_s'] * 1e3:.0f} ms; delete of the later snapshot "
              f"{rb['delete_snapshot_s'] * 1e3:.0f} ms")
    print(f"integrity check after all of it: {'ok' if r['check_ok'] else 'FAILED'}")


if __name__ == "__main__":
    main()
