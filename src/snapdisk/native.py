"""Thin bindings over the C core (snapdisk._xm, built by cffi from native/).

Every return code goes through `check`; LMDB and C-core codes become snapdisk errors there and
nowhere else.  Extents cross the boundary as `Extent` tuples.  The classes here (and the pool
seam's wrapper in pool.py) are the only Python code that touches cffi objects.  The on-disk
constants come from native/xm_layout.h through cffi; snapdisk.layout is their Python home.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from . import errors
from ._xm import ffi, lib

BLOCK_SIZE: int = lib.XM_BLOCK_SIZE
MAX_EXTENT: int = lib.XM_MAX_EXTENT
HOLE: int = lib.XM_HOLE
F_SHARED: int = lib.XM_F_SHARED
VS_BIRTH_INDEXED: int = lib.XM_VS_BIRTH_INDEXED
VS_SHARED: int = lib.XM_VS_SHARED
VS_ENCRYPTED: int = lib.XM_VS_ENCRYPTED
INFINITY: int = lib.XM_INFINITY
FORMAT_VERSION: int = lib.XM_FORMAT_VERSION

DB_META: int = lib.XM_DB_META
DB_VOLUMES: int = lib.XM_DB_VOLUMES
DB_VOLSTATE: int = lib.XM_DB_VOLSTATE
DB_NAMES: int = lib.XM_DB_NAMES
DB_SNAPS: int = lib.XM_DB_SNAPS
DB_LIVE: int = lib.XM_DB_LIVE
DB_LIVEBIRTH: int = lib.XM_DB_LIVEBIRTH
DB_DEAD: int = lib.XM_DB_DEAD
DB_DEADIDX: int = lib.XM_DB_DEADIDX
DB_REFS: int = lib.XM_DB_REFS
DB_FREE: int = lib.XM_DB_FREE
DB_PENDING: int = lib.XM_DB_PENDING
DB_COUNTERS: int = lib.XM_DB_COUNTERS
DB_COUNT: int = lib.XM_DB_COUNT


def db_name(db: int) -> str:
    """LMDB's name of database number db (xm_layout.h's table)."""
    name = lib.xm_db_name(db)
    if name == ffi.NULL:
        raise ValueError(f"no database number {db}")
    return str(ffi.string(name).decode())


ESLOW: int = lib.XM_ESLOW


class Extent(NamedTuple):
    """A run of `len` blocks at logical block `lba`, stored at physical block `pbn`."""

    lba: int
    pbn: int
    birth: int
    len: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.lba + self.len


def native_error(rc: int, what: str) -> errors.NativeError:
    return errors.NativeError(f"{what}: {ffi.string(lib.xm_strerror(rc)).decode()} ({rc})", rc)


def check(rc: int, what: str) -> None:
    """Raise the snapdisk error that rc stands for (0 is success)."""
    if rc == 0:
        return
    if rc == lib.XM_ERANGE:
        raise errors.OutOfRange(f"{what}: I/O past the end of the volume")
    if rc == lib.XM_EBUSY:
        raise errors.StoreLocked(f"{what}: the store is already open in this process")
    if rc == _errno.ENOSPC:
        raise errors.PoolFull(f"{what}: no space left on the pool's filesystem")
    if rc == lib.XM_EMAPFULL:
        raise errors.MetadataFull(
            f"{what}: the store's metadata map (LMDB) is full: delete snapshots or volumes to "
            "make room, or give the store a larger map")
    if rc == _errno.EROFS:
        raise errors.ReadOnly(f"{what}: read-only")
    if rc == lib.XM_ECORRUPT:
        raise errors.Corrupt(f"{what}: corrupt metadata (run `snapdisk check`)")
    if rc == lib.XM_ELOCKED:
        raise errors.BadKey(f"{what}: the volume is encrypted and locked (`snapdisk key unlock`)")
    if rc == lib.XM_EREVOKED:
        raise errors.StaleConnection(
            f"{what} was rolled back with force while this client was connected: what it has "
            "cached is stale; reconnect")
    raise native_error(rc, what)


# ---- extent arrays ------------------------------------------------------------------------

def to_c(extents: Sequence[Extent]) -> Any:
    arr = ffi.new("xm_extent[]", max(1, len(extents)))
    for i, e in enumerate(extents):
        c = arr[i]
        c.lba, c.pbn, c.birth, c.len, c.flags = e.lba, e.pbn, e.birth, e.len, e.flags
    return arr


def from_c(arr: Any, n: int) -> list[Extent]:
    return [Extent(arr[i].lba, arr[i].pbn, arr[i].birth, arr[i].len, arr[i].flags) for i in range(n)]


def plan(extents: Sequence[Extent], lba: int, nblocks: int) -> list[Extent]:
    """C xm_plan: the request cut into mapped runs and holes (see extmap_ref.plan)."""
    cap = 2 * len(extents) + 2 + nblocks // 0xFFFFFFFF
    out = ffi.new("xm_extent[]", cap)
    n = ffi.new("size_t *")
    check(lib.xm_plan(to_c(extents), len(extents), lba, nblocks, out, cap, n), "plan")
    return from_c(out, n[0])


def extents(exts: Sequence[Extent], lba: int, nblocks: int) -> list[Extent]:
    """C xm_extents: allocated runs (pbn 0) and holes (pbn HOLE)."""
    cap = 2 * len(exts) + 2 + nblocks // 0xFFFFFFFF
    out = ffi.new("xm_extent[]", cap)
    n = ffi.new("size_t *")
    check(lib.xm_extents(to_c(exts), len(exts), lba, nblocks, out, cap, n), "extents")
    return from_c(out, n[0])


def insert(old: Sequence[Extent], new: Extent, max_len: int = MAX_EXTENT
           ) -> tuple[list[Extent], list[Extent]]:
    """C xm_insert: (records replacing old, parts of old that new covers)."""
    keep = ffi.new("xm_extent[]", len(old) + 2)
    gone = ffi.new("xm_extent[]", max(1, len(old)))
    nk, ng = ffi.new("size_t *"), ffi.new("size_t *")
    check(lib.xm_insert(to_c(old), len(old), to_c([new]), max_len, keep, nk, gone, ng), "insert")
    return from_c(keep, nk[0]), from_c(gone, ng[0])


# ---- the store handle -------------------------------------------------------------------

class NativeStore:
    """This process's handle on one store's LMDB environment and pool file."""

    def __init__(self, meta_dir: str, pool_path: str, create: bool, sync_commits: bool,
                 map_bytes: int):
        # sync_commits=False is the unsafe opt-in (MDB_NOSYNC); commits are synced otherwise
        flags = (lib.XM_OPEN_CREATE if create else 0) | (0 if sync_commits else lib.XM_OPEN_UNSAFE_NOSYNC)
        p = ffi.new("xm_store **")
        rc = lib.xm_open(meta_dir.encode(), pool_path.encode(), flags, map_bytes, p)
        if rc == lib.XM_ECORRUPT:
            raise errors.Corrupt(f"open store {os.path.dirname(meta_dir)}: the metadata's page "
                                 "structure (LMDB) is damaged: restore the store from a copy")
        check(rc, f"open store {os.path.dirname(meta_dir)}")
        self.ptr: Any = p[0]

    def close(self) -> None:
        if self.ptr is not None:
            lib.xm_close(self.ptr)
            self.ptr = None

    def txn(self, write: bool = False, deferred: bool = False, catalog: bool = False) -> Txn:
        """A transaction; a write one is durable when it commits, unless deferred (then call
        env_sync() before reporting it).  catalog: a read of volumes, snapshots and config
        only, which does not apply the pending redirected writes first (the scheduler's
        periodic look must not force a batch)."""
        return Txn(self, write, deferred, catalog)

    def sync(self) -> None:
        check(lib.xm_sync(self.ptr), "sync")

    def env_sync(self) -> None:
        """Make every committed transaction durable (a no-op if none since the last sync)."""
        check(lib.xm_env_sync(self.ptr), "sync")

    def stats(self) -> dict[str, int]:
        s = ffi.new("xm_stats *")
        lib.xm_get_stats(self.ptr, s)
        return {f: int(getattr(s, f)) for f in
                ("records_read", "cursor_steps", "fast_reads", "fast_writes", "slow_writes",
                 "redirected_writes", "dropped_runs")}

    def env_info(self) -> tuple[int, int, int]:
        a, b, c = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        check(lib.xm_env_info(self.ptr, a, b, c), "env info")
        return int(a[0]), int(b[0]), int(c[0])

    def verify(self) -> None:
        """Raise Corrupt if an LMDB page reachable from the current meta page is damaged in a
        way that could crash LMDB itself (xm_verify); `check` and the server's start call it
        before walking the store."""
        bad = ffi.new("uint64_t *")
        rc = lib.xm_verify(self.ptr, bad)
        if rc == lib.XM_ECORRUPT:
            raise errors.Corrupt(f"metadata page {bad[0]} is damaged (LMDB structure)")
        check(rc, "verify")

    def map_size(self) -> int:
        """LMDB's map size in bytes: the most metadata the store holds until it is grown."""
        return int(lib.xm_map_size(self.ptr))

    def set_map_size(self, nbytes: int) -> None:
        """Grow the LMDB map (after MetadataFull).  LMDB's rule (mdb_env_set_mapsize): no
        transaction may be active in this process, so call it inside gate_exclusive() with no
        Txn open; values read before are invalid after."""
        check(lib.xm_set_mapsize(self.ptr, nbytes), "set map size")

    # The I/O gate (see xm.h).
    def gate_enter(self) -> None:
        lib.xm_gate_enter(self.ptr)

    def gate_leave(self) -> None:
        lib.xm_gate_leave(self.ptr)

    def gate_close(self) -> None:
        lib.xm_gate_close(self.ptr)

    def gate_open(self) -> None:
        lib.xm_gate_open(self.ptr)

    @contextmanager
    def punch_hold(self) -> Iterator[None]:
        """The punch guard (xm.h): hold it from before a commit that frees blocks to after
        their punch, so that no FLUSH makes them FREE (and a write reuses them) before the
        punch is done."""
        lib.xm_punch_hold(self.ptr)
        try:
            yield
        finally:
            lib.xm_punch_release(self.ptr)

    def punch_wait(self) -> None:
        """Wait until no punch is pending (before PENDING moves to FREE)."""
        lib.xm_punch_wait(self.ptr)

    def punch_holders(self) -> int:
        return int(lib.xm_punch_holders(self.ptr))

    @contextmanager
    def gate_shared(self) -> Iterator[None]:
        """Hold the I/O gate shared (I/O): snapshot and rollback wait for the block to end."""
        lib.xm_gate_enter(self.ptr)
        try:
            yield
        finally:
            lib.xm_gate_leave(self.ptr)

    @contextmanager
    def gate_exclusive(self) -> Iterator[None]:
        """Hold the I/O gate exclusively: waits for in-flight I/O and keeps new I/O out.  Not
        recursive: code inside must not enter a gated entry point."""
        lib.xm_gate_close(self.ptr)
        try:
            yield
        finally:
            lib.xm_gate_open(self.ptr)

    def vol_config(self, vol: int, size_bytes: int, max_snap: int, writable: bool) -> None:
        check(lib.xm_vol_config(self.ptr, vol, size_bytes, max_snap, 1 if writable else 0),
              "volume config")

    def vol_forget(self, vol: int) -> None:
        lib.xm_vol_forget(self.ptr, vol)

    # The hot path: one C call per request, GIL released for all of it.  The return code is
    # tested inline (check() only on failure): a Python call less per request.
    def read_into(self, vol: int, offset: int, buf: Any) -> None:
        """Fill buf (a writable buffer) from the live view of vol at offset."""
        rc = lib.xm_read(self.ptr, vol, offset, len(buf), ffi.from_buffer(buf, require_writable=True))
        if rc:
            check(rc, "read")

    def write_inplace(self, vol: int, offset: int, data: Any) -> bool:
        """Write in place (no map change) if every block may be; False if not, with nothing
        written: the redirect-on-write path must do it."""
        rc = lib.xm_write_inplace(self.ptr, vol, offset, len(data), ffi.from_buffer(data))
        if rc:
            if rc == ESLOW:
                return False
            check(rc, "write")
        return True

    def write_row(self, vol: int, offset: int, data: Any) -> bool:
        """Write with redirect-on-write in one C call; False, with nothing written in place, if
        the general path must do it (a huge or fragmented request, fragmented free space, or a
        full pool that needs reclaiming)."""
        rc = lib.xm_write_row(self.ptr, vol, offset, len(data), ffi.from_buffer(data))
        if rc in (ESLOW, _errno.ENOSPC):
            return False
        check(rc, "write")
        return True

    def block_status(self, vol: int, lba: int, nblocks: int, cap: int = 1024) -> list[Extent]:
        out = ffi.new("xm_extent[]", cap)
        n = ffi.new("size_t *")
        check(lib.xm_block_status(self.ptr, vol, lba, nblocks, out, cap, n), "block status")
        return from_c(out, n[0])


    # ---- encrypted volumes (xm_crypt.c): key slots of the pool seam ---------------------------
    # Call these with the gate closed (gate_exclusive), as vol_config.

    def vol_set_key(self, vol: int, key: bytearray) -> None:
        """Load vol's 64-byte XTS data key into the pool seam.  The caller wipes its bytearray
        after; C keeps only OpenSSL's expanded key, cleansed on lock and close."""
        check(lib.xm_vol_set_key(self.ptr, vol, ffi.from_buffer(key), len(key)), "set key")

    def vol_lock(self, vol: int) -> None:
        """Wipe vol's key from the seam: its I/O fails with BadKey until a key is set."""
        check(lib.xm_vol_lock(self.ptr, vol), "lock volume")

    def vol_mark_encrypted(self, vol: int, encrypted: bool) -> None:
        """encrypted: LOCKED unless a key is loaded already; else PLAIN."""
        check(lib.xm_vol_mark_encrypted(self.ptr, vol, 1 if encrypted else 0), "mark encrypted")

    def vol_key_state(self, vol: int) -> int:
        """KEY_PLAIN, KEY_LOCKED or KEY_UNLOCKED."""
        return int(lib.xm_vol_key_state(self.ptr, vol))


# ---- encrypted volumes (xm_crypt.c) ----------------------------------------------------------

KEY_PLAIN: int = lib.XM_KEY_PLAIN
KEY_LOCKED: int = lib.XM_KEY_LOCKED
KEY_UNLOCKED: int = lib.XM_KEY_UNLOCKED
KEY_BYTES: int = lib.XM_KEY_BYTES


# ---- raw send of encrypted volumes (xm_crypt.c): tweak mode, raw I/O -------------------------

TWEAK_PBN: int = lib.XM_TWEAK_PBN
TWEAK_LBA: int = lib.XM_TWEAK_LBA
NO_LBA: int = lib.XM_NO_LBA


def vol_set_tweak(ns: NativeStore, vol: int, lba: bool) -> None:
    """vol's XTS tweak: the logical block (lba) or the physical one (legacy); before its key,
    with the gate closed."""
    check(lib.xm_vol_set_tweak(ns.ptr, vol, TWEAK_LBA if lba else TWEAK_PBN), "set tweak")


@contextmanager
def raw_io() -> Iterator[None]:
    """The calling thread's pool I/O of encrypted volumes moves ciphertext as stored (no
    cipher; locked volumes too; whole blocks only) inside the block: send, backup, receive and
    restore only (xm_crypt.c)."""
    lib.xm_raw_io(1)
    try:
        yield
    finally:
        lib.xm_raw_io(0)


# The bindings of the store's operations beyond the handle (a full filesystem, bulk walks,
# group commit) live in native_ops.py, to keep this module about the core; re-exported here
# because callers know them as native.X.  (Imported last: native_ops imports this module.)

from .native_ops import RollbackPlan as RollbackPlan  # noqa: E402
from .native_ops import batch_commit as batch_commit  # noqa: E402
from .native_ops import batch_config as batch_config  # noqa: E402
from .native_ops import batch_pending as batch_pending  # noqa: E402
from .native_ops import bulk_clone_step as bulk_clone_step  # noqa: E402
from .native_ops import bulk_del_range as bulk_del_range  # noqa: E402
from .native_ops import bulk_drop_volume as bulk_drop_volume  # noqa: E402
from .native_ops import bulk_drop_window as bulk_drop_window  # noqa: E402
from .native_ops import bulk_ops as bulk_ops  # noqa: E402
from .native_ops import pool_datasync as pool_datasync  # noqa: E402
from .native_ops import space_check_grow as space_check_grow  # noqa: E402
from .native_ops import space_info as space_info  # noqa: E402
from .native_txn import Cursor as Cursor  # noqa: E402  (native_txn.py: transactions, cursors)
from .native_txn import Txn as Txn  # noqa: E402

# ---- backups: many pieces of a snapshot in one call (issue 13, xm_multiread.c) -------------

def snap_readv(store: NativeStore, vol: int, epoch: int, pieces: Sequence[tuple[int, int]],
               buf: Any) -> None:
    """Snapshot epoch of vol at pieces ((offset, length) in bytes, block aligned, sorted),
    back to back into buf (writable, at least their total length).  Gate held shared."""
    n = len(pieces)
    offs = ffi.new("uint64_t[]", [o for o, _ in pieces])
    lens = ffi.new("uint64_t[]", [m for _, m in pieces])
    if sum(m for _, m in pieces) > len(buf):
        raise errors.InvalidArgument("snap_readv: the buffer is shorter than the pieces")
    check(lib.xm_snap_readv(store.ptr, vol, epoch, offs, lens, n,
                            ffi.from_buffer(buf, require_writable=True)), "snapshot read")
