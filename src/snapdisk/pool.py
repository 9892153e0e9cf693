"""The data pool: one sparse file, block N at byte N * 4096.

The pool knows nothing of maps: the general (Python) data path reads and writes runs of blocks
here, and frees space with hole punching.  Every call goes through the C core's pool seam
(xm_pool_read / xm_pool_write / xm_pool_punch in native/xm_pool.c), the only code that touches
the pool file: it works in whole blocks (a partial block is read-modify-written), and it is where
an encrypted volume's blocks are encrypted and decrypted.  So reads and writes name the volume
whose data the blocks hold (`vol=`; 0, no volume, is raw (plain) access, for tests only) and the
logical block the first block holds for it (`lba=`: the XTS tweak of volumes in lba mode; a
call without it on such a volume is refused, never guessed).
"""

from __future__ import annotations

from typing import Any

from ._xm import ffi, lib
from .native import NO_LBA, NativeStore, check


class Pool:
    def __init__(self, store: NativeStore):
        self._store = store

    def read(self, pbn: int, nbytes: int, offset_in_block: int = 0, *, vol: int = 0,
             lba: int | None = None) -> bytes:
        """nbytes from block pbn (+offset) of vol's data, block pbn holding vol's logical block
        lba; never-written space reads as zeros.  A locked encrypted volume raises BadKey."""
        buf = bytearray(nbytes)
        self.read_into(pbn, buf, offset_in_block, vol=vol, lba=lba)
        return bytes(buf)

    def read_into(self, pbn: int, buf: Any, offset_in_block: int = 0, *, vol: int = 0,
                  lba: int | None = None) -> None:
        """Fill buf (a writable buffer) from block pbn (+offset) of vol's data."""
        view = ffi.from_buffer(buf, require_writable=True)
        check(lib.xm_pool_read(self._store.ptr, vol, pbn, NO_LBA if lba is None else lba,
                               offset_in_block, len(view), view), "pool read")

    def write(self, pbn: int, data: bytes | bytearray | memoryview, offset_in_block: int = 0,
              *, vol: int = 0, lba: int | None = None) -> None:
        """vol's data to block pbn (+offset), block pbn holding vol's logical block lba.  A full
        filesystem raises PoolFull (ENOSPC)."""
        view = ffi.from_buffer(data)
        check(lib.xm_pool_write(self._store.ptr, vol, pbn, NO_LBA if lba is None else lba,
                                offset_in_block, len(view), view), "pool write")

    def punch(self, pbn: int, nblocks: int) -> None:
        """Give the space of the blocks back to the filesystem; they read as zeros after (a
        filesystem without hole punching keeps the space)."""
        check(lib.xm_pool_punch(self._store.ptr, pbn, nblocks), "pool punch")

    def size_on_disk(self) -> int:
        out = ffi.new("uint64_t *")
        check(lib.xm_pool_size_on_disk(self._store.ptr, out), "pool size")
        return int(out[0])
