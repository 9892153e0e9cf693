"""The integrity check: every map against the allocator, every index against its table.

It reads one consistent LMDB snapshot and reports, without repairing anything:
  - map records out of order, overlapping, too long, past the volume's end or the pool's
    high-water mark, born in the future, or (dead records) needed by no snapshot;
  - index and counter drift (LIVEBIRTH, DEADIDX, COUNTERS, volume totals, allocator totals);
  - blocks leaked (neither held, free nor pending), held and free at once, held by more or
    fewer records than REFS says;
  - names and snapshots that point at nothing.
Memory: O(map records), since it sorts every held run; it is an offline tool.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from . import allocator, extmap
from .native import (
    BLOCK_SIZE,
    DB_COUNTERS,
    DB_DEAD,
    DB_DEADIDX,
    DB_FREE,
    DB_LIVE,
    DB_LIVEBIRTH,
    DB_NAMES,
    DB_PENDING,
    DB_REFS,
    DB_SNAPS,
    DB_VOLSTATE,
    DB_VOLUMES,
    F_SHARED,
    MAX_EXTENT,
    Txn,
)
from .store import FORMAT_VERSION

U32_BE = struct.Struct(">I")
KEY = struct.Struct(">Q")
KEY2 = struct.Struct(">QQ")
U64 = struct.Struct("<Q")
U64x2 = struct.Struct("<QQ")


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "stats": self.stats,
                "format": FORMAT_VERSION}


def check_store(t: Txn) -> CheckReport:
    rep = CheckReport()
    p = rep.problems.append
    hwm, cap, free_total, pending_total = allocator.totals(t)
    if hwm > cap:
        p(f"allocator: high-water mark {hwm} beyond the pool's {cap} blocks")
    held: list[tuple[int, int, str]] = []  # (pbn, len, who)
    states = {U32_BE.unpack(k)[0]: extmap.VolState(U32_BE.unpack(k)[0], *extmap.VolState.FMT.unpack(v))
              for k, v in t.scan(DB_VOLSTATE, b"")}
    metas = {U32_BE.unpack(k)[0]: json.loads(v) for k, v in t.scan(DB_VOLUMES, b"")}
    for vol in set(states) ^ set(metas):
        p(f"volume {vol}: catalog and state records disagree (one is missing)")
    for k, v in t.scan_prefix(DB_NAMES, b"v"):
        vol = U32_BE.unpack(v)[0]
        if vol not in metas or metas[vol]["name"] != k[1:].decode():
            p(f"name {k[1:].decode()!r} points at volume {vol}, which does not carry it")
    for vol, meta in metas.items():
        if t.get(DB_NAMES, b"v" + meta["name"].encode()) != U32_BE.pack(vol):
            p(f"volume {vol} ({meta['name']!r}) has no name record")
    for vol, vs in states.items():
        _check_volume(t, vs, metas.get(vol, {}), hwm, held, p, rep.stats)
    for k, _ in t.scan(DB_SNAPS, b""):
        vol = U32_BE.unpack(k[:4])[0]
        if vol not in states:
            p(f"snapshot {k[4:].hex()} belongs to missing volume {vol}")
    for k, v in t.scan_prefix(DB_NAMES, b"s"):
        vol = U32_BE.unpack(k[1:5])[0]
        if t.get(DB_SNAPS, k[1:5] + v) is None:
            p(f"snapshot name {k[5:].decode()!r} of volume {vol} points at no snapshot")
    for db, what in ((DB_LIVE, "live"), (DB_DEAD, "dead"), (DB_DEADIDX, "dead index"),
                     (DB_LIVEBIRTH, "birth index"), (DB_COUNTERS, "counter")):
        for k, _ in t.scan(db, b""):
            if U32_BE.unpack(k[:4])[0] not in states:
                p(f"{what} record of missing volume {U32_BE.unpack(k[:4])[0]}")
                break
    _check_blocks(t, hwm, free_total, pending_total, held, p, rep.stats)
    return rep


def _check_volume(t: Txn, vs: extmap.VolState, meta: dict[str, Any], hwm: int,
                  held: list[tuple[int, int, str]], p: Any, stats: dict[str, int]) -> None:
    vol = vs.vol
    name = meta.get("name", f"#{vol}")
    prefix = U32_BE.pack(vol)
    nblocks = -(-vs.size_bytes // BLOCK_SIZE)
    epochs = [struct.unpack(">IQ", k)[1] for k, _ in t.scan_prefix(DB_SNAPS, prefix)]
    kinds: dict[str | None, int] = defaultdict(int)
    for e in epochs:
        raw = t.get(DB_SNAPS, struct.pack(">IQ", vol, e))
        kinds[json.loads(raw or b"{}").get("kind")] += 1
        if e >= vs.epoch:
            p(f"volume {name}: snapshot {e} is not older than the volume's epoch {vs.epoch}")
    if len(epochs) != vs.nsnaps or (max(epochs) if epochs else 0) != vs.max_snap:
        p(f"volume {name}: state says {vs.nsnaps} snapshots, newest {vs.max_snap}; "
          f"found {len(epochs)}, newest {max(epochs) if epochs else 0}")
    for kind in ("manual", "auto"):
        if meta and meta.get(f"snapshots_{kind}") != kinds.get(kind, 0):
            p(f"volume {name}: {kind} snapshot count {meta.get(f'snapshots_{kind}')} "
              f"but {kinds.get(kind, 0)} found")
    live_blocks = 0
    prev_end = 0
    live = {}
    for k, v in t.scan_prefix(DB_LIVE, prefix):
        lba = struct.unpack(">IQ", k)[1]
        length, flags, pbn, birth = extmap.REC.unpack(v)
        live[lba] = (length, birth)
        where = f"volume {name}: live record at block {lba}"
        if lba < prev_end:
            p(f"{where} overlaps the one before it")
        if not 0 < length <= MAX_EXTENT:
            p(f"{where} has length {length}")
        if lba + length > nblocks:
            p(f"{where} runs past the volume's end ({nblocks} blocks)")
        if birth > vs.epoch or birth == 0:
            p(f"{where} was born in epoch {birth}, the volume is at {vs.epoch}")
        if pbn + length > hwm:
            p(f"{where} points past the pool's high-water mark ({pbn}+{length} > {hwm})")
        if not flags & F_SHARED and any(h > 1 for _, _, h in allocator.refs_of(t, pbn, length)):
            # the hot path writes unflagged records in place: they must be the only holder
            p(f"{where} shares its blocks but is not flagged SHARED")
        prev_end = lba + length
        live_blocks += length
        held.append((pbn, length, where))
    if live_blocks != vs.live_blocks:
        p(f"volume {name}: {live_blocks} live blocks mapped, the state says {vs.live_blocks}")
    for k, v in t.scan_prefix(DB_LIVEBIRTH, prefix):
        _, birth, lba = extmap.TRIPLE_KEY.unpack(k)
        if live.get(lba) != (extmap.U32.unpack(v)[0], birth):
            p(f"volume {name}: birth index names block {lba} born {birth}, no such live record")
    counters: dict[tuple[int, int], int] = defaultdict(int)
    nd = 0
    for k, v in t.scan_prefix(DB_DEAD, prefix):
        _, lba, birth = extmap.TRIPLE_KEY.unpack(k)
        length, flags, pbn, death = extmap.REC.unpack(v)
        where = f"volume {name}: dead record at block {lba} born {birth}"
        nd += 1
        if not any(birth <= e < death for e in epochs):
            p(f"{where} (died {death}) is needed by no snapshot: leaked")
        if death > vs.epoch or birth >= death:
            p(f"{where} died in epoch {death} (volume at {vs.epoch})")
        if not 0 < length <= MAX_EXTENT:
            p(f"{where} has length {length}")
        if pbn + length > hwm:
            p(f"{where} points past the pool's high-water mark")
        if t.get(DB_DEADIDX, extmap.DEADIDX_KEY.pack(vol, death, birth, lba)) != extmap.U32.pack(length):
            p(f"{where} is missing from the dead index")
        counters[(death, birth)] += length
        held.append((pbn, length, where))
    for k, _ in t.scan_prefix(DB_DEADIDX, prefix):
        _, death, birth, lba = extmap.DEADIDX_KEY.unpack(k)
        raw = t.get(DB_DEAD, extmap.TRIPLE_KEY.pack(vol, lba, birth))
        if raw is None or extmap.REC.unpack(raw)[3] != death:
            p(f"volume {name}: dead index names block {lba} born {birth} died {death}: no such record")
    for k, v in t.scan_prefix(DB_COUNTERS, prefix):
        _, death, birth = extmap.TRIPLE_KEY.unpack(k)
        if counters.pop((death, birth), 0) != U64.unpack(v)[0]:
            p(f"volume {name}: counter ({death}, {birth}) is {U64.unpack(v)[0]}, records disagree")
    for (death, birth), n in counters.items():
        p(f"volume {name}: no counter for {n} dead blocks ({death}, {birth})")
    _check_views(t, vol, name, epochs, p)
    stats["dead_records"] = stats.get("dead_records", 0) + nd
    stats["live_records"] = stats.get("live_records", 0) + len(live)


def _check_views(t: Txn, vol: int, name: str, epochs: list[int], p: Any) -> None:
    """Each snapshot's view must be disjoint (one version of a block per snapshot)."""
    dead = [(extmap.TRIPLE_KEY.unpack(k)[1:], extmap.REC.unpack(v))
            for k, v in t.scan_prefix(DB_DEAD, U32_BE.pack(vol))]
    if not dead:
        return
    live = [(struct.unpack(">IQ", k)[1], extmap.REC.unpack(v))
            for k, v in t.scan_prefix(DB_LIVE, U32_BE.pack(vol))]
    for e in epochs:
        runs = sorted([(lba, lba + r[0]) for (lba, birth), r in dead if birth <= e < r[3]] +
                      [(lba, lba + r[0]) for lba, r in live if r[3] <= e])
        for (_, b), (c, _) in zip(runs, runs[1:]):
            if c < b:
                p(f"volume {name}: snapshot {e} sees two versions of block {c}")
                break


def _check_blocks(t: Txn, hwm: int, free_total: int, pending_total: int,
                  held: list[tuple[int, int, str]], p: Any, stats: dict[str, int]) -> None:
    events: list[tuple[int, int, int, int, int]] = []  # (pos, dheld, dfree, dpending, drefs)
    for pbn, n, _ in held:
        events += [(pbn, 1, 0, 0, 0), (pbn + n, -1, 0, 0, 0)]
    nfree = npend = 0
    for k, v in t.scan(DB_FREE, b""):
        pbn, n = KEY.unpack(k)[0], U64.unpack(v)[0]
        nfree += n
        events += [(pbn, 0, 1, 0, 0), (pbn + n, 0, -1, 0, 0)]
        if pbn + n > hwm:
            p(f"free run {pbn}+{n} lies past the high-water mark {hwm}")
    for k, v in t.scan(DB_PENDING, b""):
        pbn, n = KEY2.unpack(k)[1], U64.unpack(v)[0]
        npend += n
        events += [(pbn, 0, 0, 1, 0), (pbn + n, 0, 0, -1, 0)]
    for k, v in t.scan(DB_REFS, b""):
        pbn = KEY.unpack(k)[0]
        n, refs = U64x2.unpack(v)
        events += [(pbn, 0, 0, 0, refs - 1), (pbn + n, 0, 0, 0, -(refs - 1))]
    if nfree != free_total or npend != pending_total:
        p(f"allocator totals say {free_total} free, {pending_total} pending; "
          f"found {nfree} free, {npend} pending")
    events.sort()
    h = f = pe = extra = 0
    pos = 0
    reported = 0
    i = 0
    while i < len(events) or pos < hwm:
        nxt = events[i][0] if i < len(events) else hwm
        if pos < nxt and pos < hwm:
            stop = min(nxt, hwm)
            expect_holders = 1 + extra
            if h == 0 and f + pe == 0 and reported < 20:
                p(f"blocks {pos}-{stop - 1} leaked: not held, free or pending")
                reported += 1
            elif h > 0 and f + pe > 0 and reported < 20:
                p(f"blocks {pos}-{stop - 1} are held and also free/pending")
                reported += 1
            elif f + pe > 1 and reported < 20:
                p(f"blocks {pos}-{stop - 1} are free or pending twice")
                reported += 1
            elif h > 0 and h != expect_holders and reported < 20:
                p(f"blocks {pos}-{stop - 1} are held by {h} records, the refcount says "
                  f"{expect_holders}")
                reported += 1
            elif h == 0 and extra and reported < 20:
                p(f"blocks {pos}-{stop - 1} have a refcount but no holder")
                reported += 1
        if pos >= hwm and h:
            p(f"blocks from {pos} are held past the high-water mark {hwm}")
            break
        pos = nxt
        while i < len(events) and events[i][0] == pos:
            _, dh, df, dp, dr = events[i]
            h, f, pe, extra = h + dh, f + df, pe + dp, extra + dr
            i += 1
        if i >= len(events) and pos >= hwm:
            break
    stats["held_runs"] = len(held)
    stats["free_blocks"] = nfree
    stats["pending_blocks"] = npend
    stats["high_water_mark"] = hwm
