"""LMDB transactions and cursors through the C core's key/value API (native.py keeps the
store handle and re-exports these as native.Txn and native.Cursor).  A write transaction must
end on the thread that began it (LMDB's rule).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._xm import ffi, lib
from .native import Extent, check, from_c

if TYPE_CHECKING:
    from .native import NativeStore


class Txn:
    """An LMDB transaction through the C core.  Use as a context manager: commit on success,
    abort on exception.  A write transaction must end on the thread that began it."""

    def __init__(self, handle: NativeStore, write: bool, deferred: bool = False,
                 catalog: bool = False):
        self._store = handle
        self.write = write
        # deferred: commit without the durability sync (MDB_NOMETASYNC: a system crash may
        # undo the commit); the caller runs NativeStore.env_sync() before it reports success.
        self.deferred = deferred
        p = ffi.new("xm_txn **")
        # catalog: a read that leaves the group-commit overlay alone (xm.h, xm_txn_begin)
        mode = 1 if write else 2 if catalog else 0
        check(lib.xm_txn_begin(handle.ptr, mode, p), "begin transaction")
        self._t: Any = p[0]
        self._val = ffi.new("xm_val *")
        self._kval = ffi.new("xm_val *")
        self.ops = 0  # key/value operations, for tests that count work

    def __enter__(self) -> Txn:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._t is None:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> None:
        t, self._t = self._t, None
        check((lib.xm_txn_commit_deferred if self.deferred else lib.xm_txn_commit)(t), "commit")

    def abort(self) -> None:
        t, self._t = self._t, None
        if t is not None:
            lib.xm_txn_abort(t)

    def get(self, db: int, key: bytes) -> bytes | None:
        self.ops += 1
        rc = lib.xm_get(self._t, db, key, len(key), self._val)
        if rc == lib.XM_ENOTFOUND:
            return None
        check(rc, "get")
        return bytes(ffi.buffer(self._val.data, self._val.len))

    def put(self, db: int, key: bytes, value: bytes) -> None:
        self.ops += 1
        check(lib.xm_put(self._t, db, key, len(key), value, len(value)), "put")

    def delete(self, db: int, key: bytes) -> bool:
        self.ops += 1
        rc = lib.xm_del(self._t, db, key, len(key))
        if rc == lib.XM_ENOTFOUND:
            return False
        check(rc, "delete")
        return True

    def delete_prefix(self, db: int, prefix: bytes) -> int:
        n = ffi.new("uint64_t *")
        check(lib.xm_del_prefix(self._t, db, prefix, len(prefix), n), "delete range")
        self.ops += n[0]
        return int(n[0])

    def cursor(self, db: int) -> Cursor:
        return Cursor(self, db)

    def scan(self, db: int, start: bytes, stop: bytes | None = None
             ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) for start <= key < stop (stop None: to the end)."""
        with self.cursor(db) as cur:
            item = cur.seek(start)
            while item is not None and (stop is None or item[0] < stop):
                yield item
                item = cur.next()

    def scan_prefix(self, db: int, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for k, v in self.scan(db, prefix):
            if not k.startswith(prefix):
                return
            yield k, v

    def live_overlap(self, vol: int, lba: int, nblocks: int) -> list[Extent]:
        """Live records of vol overlapping or touching [lba, lba+nblocks)."""
        cap = 64
        while True:
            out = ffi.new("xm_extent[]", cap)
            n = ffi.new("size_t *")
            rc = lib.xm_live_overlap(self._t, vol, lba, nblocks, out, cap, n)
            if rc == lib.XM_ESPACE:
                cap = max(cap * 4, nblocks + 2)
                continue
            check(rc, "map lookup")
            self.ops += n[0] + 1
            return from_c(out, n[0])


class Cursor:
    def __init__(self, txn: Txn, db: int):
        self._txn = txn
        p = ffi.new("xm_cur **")
        check(lib.xm_cur_open(txn._t, db, p), "open cursor")
        self._c: Any = p[0]
        self._k = ffi.new("xm_val *")
        self._v = ffi.new("xm_val *")

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._c is not None:
            lib.xm_cur_close(self._c)
            self._c = None

    def _get(self, op: int, key: bytes = b"") -> tuple[bytes, bytes] | None:
        self._txn.ops += 1
        rc = lib.xm_cur_get(self._c, op, key, len(key), self._k, self._v)
        if rc == lib.XM_ENOTFOUND:
            return None
        check(rc, "cursor")
        return (bytes(ffi.buffer(self._k.data, self._k.len)),
                bytes(ffi.buffer(self._v.data, self._v.len)))

    def seek(self, key: bytes) -> tuple[bytes, bytes] | None:
        """First record with a key >= key."""
        if not key:  # LMDB rejects empty keys
            return self._get(lib.XM_FIRST)
        return self._get(lib.XM_SET_RANGE, key)

    def next(self) -> tuple[bytes, bytes] | None:
        return self._get(lib.XM_NEXT)

    def prev(self) -> tuple[bytes, bytes] | None:
        return self._get(lib.XM_PREV)

    def last(self) -> tuple[bytes, bytes] | None:
        return self._get(lib.XM_LAST)

    def seek_le(self, key: bytes) -> tuple[bytes, bytes] | None:
        """Last record with a key <= key."""
        item = self.seek(key)
        if item is not None and item[0] == key:
            return item
        return self.prev() if item is not None else self.last()

    def delete(self) -> None:
        check(lib.xm_cur_del(self._c), "cursor delete")
