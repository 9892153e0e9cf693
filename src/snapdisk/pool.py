"""The data pool: one sparse file, block N at byte N * 4096.

The pool knows nothing of volumes or maps: the general (Python) data path reads and writes
whole runs of blocks here, and frees space with hole punching.  The hot path does its own
pread/pwrite in C on the same descriptor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from .native import BLOCK_SIZE

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Pool:
    def __init__(self, fd: int):
        self.fd = fd

    def read(self, pbn: int, nbytes: int, offset_in_block: int = 0) -> bytes:
        """nbytes from block pbn (+offset); past the end of the file reads as zeros."""
        data = os.pread(self.fd, nbytes, pbn * BLOCK_SIZE + offset_in_block)
        if len(data) < nbytes:
            data += bytes(nbytes - len(data))
        return data

    def write(self, pbn: int, data: bytes | bytearray | memoryview, offset_in_block: int = 0
              ) -> None:
        view = memoryview(data)
        pos = pbn * BLOCK_SIZE + offset_in_block
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def punch(self, pbn: int, nblocks: int) -> None:
        """Give the space of the blocks back to the filesystem; they read as zeros after."""
        rc = _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                             pbn * BLOCK_SIZE, nblocks * BLOCK_SIZE)
        if rc != 0:
            err = ctypes.get_errno()
            if err not in (95,):  # EOPNOTSUPP: a filesystem without holes just keeps the space
                raise OSError(err, os.strerror(err))

    def size_on_disk(self) -> int:
        return os.fstat(self.fd).st_blocks * 512
