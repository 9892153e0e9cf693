"""What a server's file mappings (LMDB's map of the metadata) cost, and whether the kernel can
take those pages back: measured, not asserted.

    before = mapped(pid, store)          # {file: {"Rss", "Dirty", "Clean"}} of mappings under store
    after = reclaim(pid, store)          # fsync each file, MADV_PAGEOUT its ranges in pid, measure again

The reclaim is what the kernel does under memory pressure, asked for one process only:
fsync writes the dirty map pages back (LMDB with MDB_WRITEMAP dirties them; a store with a
read-only map has none), then process_madvise(2) MADV_PAGEOUT (Linux 5.10; needs
CAP_SYS_NICE and ptrace access to pid) evicts those ranges from the server's page tables and the
page cache.  Pages still resident after it are what could not be reclaimed (mapped by another
process, or locked).  Nothing else on the machine is touched (no drop_caches).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

MADV_PAGEOUT = 21
SYS_PROCESS_MADVISE = 440  # x86_64 and aarch64 (asm-generic) alike


def _ranges(pid: int, under: str) -> dict[str, list[tuple[int, int, dict[str, int]]]]:
    """{file: [(start, end, {smaps field: bytes})]} for pid's mappings of files under `under`."""
    under = os.path.realpath(under).rstrip("/") + "/"
    out: dict[str, list[tuple[int, int, dict[str, int]]]] = {}
    cur: dict[str, int] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                cur = None
                path = head[5] if len(head) >= 6 else ""
                if path.startswith(under):
                    a, b = (int(x, 16) for x in head[0].split("-"))
                    cur = {}
                    out.setdefault(path, []).append((a, b, cur))
            elif cur is not None and len(head) >= 2 and head[0].endswith(":") and head[1].isdigit():
                cur[head[0][:-1]] = int(head[1]) * 1024
    return out


def mapped(pid: int, under: str) -> dict[str, dict[str, int]]:
    """Per file under `under` mapped by pid: resident, dirty and clean bytes, and the mapping's size."""
    out: dict[str, dict[str, int]] = {}
    for path, maps in _ranges(pid, under).items():
        tot = {"Size": 0, "Rss": 0, "Dirty": 0, "Clean": 0}
        for a, b, f in maps:
            tot["Size"] += b - a
            tot["Rss"] += f.get("Rss", 0)
            tot["Dirty"] += f.get("Shared_Dirty", 0) + f.get("Private_Dirty", 0)
            tot["Clean"] += f.get("Shared_Clean", 0) + f.get("Private_Clean", 0)
        out[os.path.relpath(path, under)] = tot
    return out


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def reclaim(pid: int, under: str) -> dict[str, Any]:
    """fsync every file under `under` that pid maps, MADV_PAGEOUT those ranges in pid, and measure
    again.  Returns {"after": mapped(...), "error": None or why the pageout was refused}."""
    maps = _ranges(pid, under)
    for path in maps:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    error = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
        try:
            for ranges in maps.values():
                for a, b, _ in ranges:
                    iov = _Iovec(a, b - a)
                    if libc.syscall(SYS_PROCESS_MADVISE, pidfd, ctypes.byref(iov), 1, MADV_PAGEOUT, 0) < 0:
                        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        finally:
            os.close(pidfd)
    except (OSError, AttributeError) as e:
        error = f"process_madvise(MADV_PAGEOUT) refused: {e}"
    return {"after": mapped(pid, under), "error": error}
