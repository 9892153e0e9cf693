"""Capacity: what each volume and snapshot uses, references and alone holds.

Built from counters, without scanning the map (COUNTERS gives the dead blocks per
(death, birth), so a snapshot's exclusive size is a window sum; see extmap.py), except where
blocks are shared by rollback or clones: then the dead records asked about are read and their
blocks checked against REFS, because a shared block survives the delete of one holder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from typing import Any

from . import allocator, catalog, extmap, layout
from .catalog import SnapshotInfo
from .layout import BLOCK_SIZE, DB_DEAD, DB_VOLSTATE, INFINITY
from .native import NativeStore, Txn, space_info
from .pool import Pool


def neighbours(epochs: list[int], i: int) -> tuple[int, int]:
    """The snapshots before and after epochs[i] (0 and INFINITY at the ends)."""
    return (epochs[i - 1] if i > 0 else 0), (epochs[i + 1] if i + 1 < len(epochs) else INFINITY)


def snapinfo(t: Txn, volume: str, vol: int, epochs: list[int], i: int, with_usage: bool,
             shared: bool) -> SnapshotInfo:
    epoch = epochs[i]
    rec = catalog.snap_record(t, vol, epoch)
    info = SnapshotInfo(volume, epoch, rec.name, rec.created, rec.kind, rec.policy,
                        rec.size_bytes, rec.referenced_blocks * BLOCK_SIZE,
                        slot=rec.slot, expires=rec.expires)
    if with_usage:
        info.exclusive_bytes = exclusive_blocks(t, vol, epochs, i, shared) * BLOCK_SIZE
    return info


def exclusive_blocks(t: Txn, vol: int, epochs: list[int], i: int, shared: bool) -> int:
    """Blocks that deleting snapshot epochs[i] would free."""
    prev, nxt = neighbours(epochs, i)
    epoch = epochs[i]
    if not shared:
        return extmap.counted_blocks(t, vol, epoch + 1, nxt, prev + 1, epoch)
    # Blocks held by other records too (rollback, clones) would survive the delete.
    recs = extmap.window(t, vol, epoch + 1, nxt, prev + 1, epoch)
    return freed_if_dropped(t, vol, [(lba, birth) for _, birth, lba, _ in recs])


def freed_if_dropped(t: Txn, vol: int, dead: list[tuple[int, int]]) -> int:
    """Blocks freed if the dead records (lba, birth) of vol all went away."""
    freed = 0
    shared_holders: Counter[int] = Counter()
    shared_refs: dict[int, int] = {}
    for lba, birth in dead:
        length, _, pbn, _ = _dead(t, vol, lba, birth)
        for a, b, holders in allocator.refs_of(t, pbn, length):
            if holders == 1:
                freed += b - a
            else:
                for blk in range(a, b):
                    shared_holders[blk] += 1
                    shared_refs[blk] = holders
    return freed + sum(1 for blk, n in shared_holders.items() if n == shared_refs[blk])


def _dead(t: Txn, vol: int, lba: int, birth: int) -> tuple[int, int, int, int]:
    return layout.decode_rec(t.get(DB_DEAD, layout.dead_key(vol, lba, birth)), "dead record")


def list_snapshots(t: Txn, volume: str, with_usage: bool) -> list[SnapshotInfo]:
    vol = catalog.vol_id(t, volume)
    epochs = catalog.snap_epochs(t, vol)
    shared = extmap.has_shared_blocks(t)
    return [snapinfo(t, volume, vol, epochs, i, with_usage, shared) for i in range(len(epochs))]


def snapshot_info(t: Txn, volume: str, snap: str | int) -> SnapshotInfo:
    vol = catalog.vol_id(t, volume)
    epoch = catalog.snap_epoch(t, vol, snap)
    epochs = catalog.snap_epochs(t, vol)
    return snapinfo(t, volume, vol, epochs, epochs.index(epoch), True,
                    extmap.has_shared_blocks(t))


def usage(t: Txn, pool: Pool, volume: str | None = None,
          native: NativeStore | None = None) -> dict[str, Any]:
    """Capacity: per volume its live and snapshot bytes and, per snapshot, the bytes it
    references and the bytes only it holds (what deleting it frees); store totals, and (given
    the store's handle) whether the metadata has run out of room on the filesystem.  The
    filesystem's free space and the warnings are added by the reader (add_space_warnings):
    they change with everything on that filesystem, the rest only with the store."""
    shared = extmap.has_shared_blocks(t)
    ids = [catalog.vol_id(t, volume)] if volume is not None else catalog.volume_ids(t)
    vols: list[dict[str, Any]] = []
    for vol in ids:
        info = catalog.info(t, vol)
        epochs = catalog.snap_epochs(t, vol)
        snaps = [snapinfo(t, info.name, vol, epochs, i, True, shared).to_dict()
                 for i in range(len(epochs))]
        if shared:
            dead = [layout.parse_triple(k, "dead record key")[1:]
                    for k, _ in t.scan_prefix(DB_DEAD, layout.vol_key(vol))]
            snap_blocks = freed_if_dropped(t, vol, dead)
        else:
            snap_blocks = extmap.counted_blocks(t, vol, 0, INFINITY, 0, INFINITY)
        vols.append({"volume": info.name, "size_bytes": info.size_bytes,
                     "live_bytes": info.live_bytes,
                     "snapshots_bytes": snap_blocks * BLOCK_SIZE, "snapshots": snaps})
    hwm, cap, free, pending = allocator.totals(t)
    logical = sum(catalog.VolState.decode(layout.parse_vol_key(k), v).size_bytes
                  for k, v in t.scan(DB_VOLSTATE, b""))
    used = hwm - free - pending
    store = {"pool_bytes": cap * BLOCK_SIZE, "used_bytes": used * BLOCK_SIZE,
             "free_bytes": (cap - used) * BLOCK_SIZE, "pending_bytes": pending * BLOCK_SIZE,
             "logical_bytes": logical,
             "snapshots_bytes": sum(v["snapshots_bytes"] for v in vols) if volume is None
             else None,
             "pool_file_bytes": pool.size_on_disk()}
    if native is not None:  # allocating writes refused: the filesystem is full (xm_space.c)
        store["metadata_space_low"] = bool(space_info(native)["meta_space_low"])
    return {"volumes": vols, "store": store}


# ---- a full filesystem (issue 10 item 1) ------------------------------------------------------
# Writes fail with ENOSPC when the pool is full, and also when the filesystem under the store is:
# the pool file is sparse (a pool larger than the free space is allowed: thin provisioning), and
# the metadata needs room beside it (native/xm_space.c).  `usage` and `status` warn before that.

WARN_FREE_FRACTION = 0.10  # warn when less than this part of the pool is free


def add_space_warnings(store: dict[str, Any], path: str) -> dict[str, Any]:
    """usage()'s store totals with the free space of the filesystem of store `path`'s pool
    file (`filesystem_free_bytes`) and the `warnings` (space_warnings)."""
    pool = os.path.realpath(os.path.join(path, "pool.dat"))
    with contextlib.suppress(OSError):
        store["filesystem_free_bytes"] = shutil.disk_usage(os.path.dirname(pool)).free
    store["warnings"] = space_warnings(store)
    return store


def space_warnings(store: dict[str, Any]) -> list[str]:
    """One sentence per way writes may soon fail with ENOSPC, from usage()'s store totals."""
    out: list[str] = []
    pool, free = store.get("pool_bytes") or 0, store.get("free_bytes") or 0
    if pool and free < pool * WARN_FREE_FRACTION:
        out.append(f"the pool is {100 * (pool - free) // pool}% full ({free} bytes free): "
                   "writes fail with ENOSPC when it is full; delete snapshots or volumes")
    fs_free = store.get("filesystem_free_bytes")
    if store.get("metadata_space_low"):
        out.append("the store's filesystem is full: writes that need new blocks fail with "
                   "ENOSPC; delete snapshots or volumes, or free space on the filesystem")
    elif fs_free is not None:
        # The part of the pool not yet on disk, and the metadata's room, must fit in what the
        # filesystem has left; warn once it has less than that plus a tenth of the pool.
        unwritten = max(0, pool - (store.get("pool_file_bytes") or 0))
        need = min(free, unwritten) + int(pool * WARN_FREE_FRACTION)
        if fs_free < need:
            out.append(f"the store's filesystem has {fs_free} bytes free, less than the "
                       f"{free} bytes the pool still offers: writes may fail with ENOSPC "
                       "before the pool is full; free space there or delete snapshots")
    return out
