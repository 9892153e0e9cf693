"""Bindings of the C core's store operations beyond the handle (native.py keeps the core):
room for the metadata on a full filesystem (xm_space.c), the bulk metadata walks (xm_bulk*.c)
and group commit (xm_batch.c).  Every return code goes through native.check.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence

from . import errors
from ._xm import ffi, lib
from .native import NativeStore, check

# ---- a full filesystem under the store (native/xm_space.c) --------------------------------

def space_info(store: NativeStore) -> dict[str, int | bool]:
    """The metadata's room on its filesystem: free space there, data.mdb used and reserved
    (given real blocks ahead of LMDB's use), the headroom kept, and whether it is low
    (allocating writes are refused with ENOSPC until the filesystem has room again)."""
    s = ffi.new("xm_space *")
    check(lib.xm_space_info(store.ptr, s), "space info")
    return {"fs_free_bytes": int(s.fs_free_bytes), "meta_used_bytes": int(s.meta_used_bytes),
            "meta_reserved_bytes": int(s.meta_reserved_bytes),
            "meta_ahead_bytes": int(s.ahead_bytes), "meta_space_low": bool(s.low),
            "no_fallocate": bool(s.no_fallocate)}


def space_check_grow(store: NativeStore) -> None:
    """PoolFull (ENOSPC) if a write that allocates may not begin: the filesystem has no room
    left for the metadata it adds (xm_space_check)."""
    if lib.xm_space_check(store.ptr, lib.XM_SPACE_GROW) == _errno.ENOSPC:
        raise errors.PoolFull("no space left on the store's filesystem for the metadata of "
                              "new blocks: delete snapshots or volumes, or free space there")


# ---- bulk metadata walks (xm_bulk.c): one bounded write transaction per call ----------------

def bulk_drop_window(ns: NativeStore, vol: int, window: Sequence[int], limit: int,
                     punch_min: int) -> int:
    """Drop up to limit dead records of a deleted snapshot's window (death_lo, death_hi,
    birth_lo, birth_hi); returns how many (fewer than limit: the window is empty)."""
    n = ffi.new("uint64_t *")
    dlo, dhi, blo, bhi = window
    check(lib.xm_bulk_drop_window(ns.ptr, vol, dlo, dhi, blo, bhi, limit, punch_min, n),
          "snapshot delete")
    return int(n[0])


def bulk_drop_volume(ns: NativeStore, vol: int, limit: int, punch_min: int) -> int:
    """Release and remove up to limit map records of a deleted volume; returns how many."""
    n = ffi.new("uint64_t *")
    check(lib.xm_bulk_drop_volume(ns.ptr, vol, limit, punch_min, n), "volume delete")
    return int(n[0])


def bulk_del_range(ns: NativeStore, db: int, lo: bytes, hi: bytes, limit: int) -> int:
    """Delete up to limit keys of db in [lo, hi); returns how many."""
    n = ffi.new("uint64_t *")
    check(lib.xm_bulk_del_range(ns.ptr, db, lo, len(lo), hi, len(hi), limit, n), "range delete")
    return int(n[0])


def bulk_ops() -> int:
    """Key/value operations the C walks have done in this process (tests/test_work.py)."""
    return int(lib.xm_bulk_ops())


class RollbackPlan:
    """xm_bulk_rollback_plan's arrays, kept in C form for the chunks (no per-record Python)."""

    def __init__(self, ns: NativeStore, vol: int, epoch: int, birth_indexed: bool, pos: int):
        nr, nt, w = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("uint64_t *")
        r, t = ffi.new("xm_extent **"), ffi.new("xm_extent **")
        check(lib.xm_bulk_rollback_plan(ns.ptr, vol, epoch, 1 if birth_indexed else 0, pos,
                                        r, nr, t, nt, w), "rollback plan")
        self.ranges = ffi.gc(r[0], lib.xm_bulk_free)
        self.targets = ffi.gc(t[0], lib.xm_bulk_free)
        self.ns, self.vol = ns, vol
        self.nr, self.nt, self.weight = int(nr[0]), int(nt[0]), int(w[0])
        self._k, self._ti = ffi.new("size_t *"), ffi.new("size_t *")

    def apply(self, limit: int, pos_key: bytes, punch_min: int) -> int:
        """The next chunk (xm_bulk_rollback_apply); returns its weight, 0 when done."""
        n = ffi.new("uint64_t *")
        check(lib.xm_bulk_rollback_apply(self.ns.ptr, self.vol, self.ranges, self.nr,
                                         self.targets, self.nt, self._k, self._ti, limit,
                                         pos_key, len(pos_key), punch_min, n), "rollback")
        return int(n[0])


def bulk_clone_step(ns: NativeStore, src: int, epoch: int, dst: int, lo: int, hi: int,
                    pos_key: bytes) -> int:
    """One clone step in one write transaction (xm_bulk_clone_step); returns the records."""
    n = ffi.new("uint64_t *")
    check(lib.xm_bulk_clone_step(ns.ptr, src, epoch, dst, lo, hi, pos_key, len(pos_key), n),
          "clone")
    return int(n[0])
# ---- group commit (issue 9): the overlay of redirected writes (native/xm_batch.c) ----------

def batch_commit(store: NativeStore) -> None:
    """Apply the pending redirected writes now, in one synced transaction."""
    check(lib.xm_batch_commit(store.ptr), "group commit")


def batch_config(store: NativeStore, interval_us: int, max_blocks: int) -> None:
    """When the committer applies a batch: its oldest entry interval_us old (0: only on
    demand) or max_blocks / 2 pending; max_blocks bounds the overlay."""
    check(lib.xm_batch_config(store.ptr, interval_us, max_blocks), "group commit config")


def batch_pending(store: NativeStore) -> int:
    """Blocks of redirected writes in the overlay, not yet in LMDB."""
    return int(lib.xm_batch_pending(store.ptr))


def pool_datasync(store: NativeStore) -> None:
    """fdatasync(pool.dat): data before the map commit that points at it (the Python path)."""
    check(lib.xm_pool_datasync(store.ptr), "fdatasync pool")
