"""The backing files every peer serves, made once per run under the work directory.

    raw.img               SIZE bytes of random data (the file, passthrough and fio-direct peers)
    qcow2-0.qcow2         qemu-img convert of raw.img (qcow2, 64 KiB clusters, no snapshots)
    qcow2-N.qcow2         the same, then N internal snapshots with a few random 4 KiB writes
                          before each (so each owns some clusters), then rewritten in full
    snapdisk-0/           a store whose volume `v` holds raw.img's data
    snapdisk-N/           the same, with N snapshots made like qcow2-N's, then rewritten in full

"Rewritten in full" after the last snapshot means the live data is the volume's own again
(qcow2 clusters with refcount 1, snapdisk records born after the newest snapshot), so the
steady state measures the cost of *having* N snapshots; the first writes after a snapshot are
scenario 2's subject.  qcow2 snapshots are made by a qemu-storage-daemon over QMP
(blockdev-snapshot-internal-sync, the same internal snapshot `qemu-img snapshot -c` writes;
one process instead of 2N), the writes through its NBD export.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable

from benchmarks import peers

MIB = 1 << 20
SNAP_WRITES = 16  # random 4 KiB writes before each snapshot


def random_file(path: str, size: int, chunk: int = 64 * MIB) -> None:
    """size bytes of random data (one random chunk, repeated: nothing here compresses or dedups)."""
    block = os.urandom(min(chunk, size))
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def qcow2_from_raw(raw: str, image: str) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], check=True,
                   capture_output=True)


def _nbd_writes(uri: str, size: int, nsnaps: int, snapshot: Callable[[str], None], seed: int,
                rewrite: bool) -> None:
    """Through libnbd: before each of nsnaps snapshots, SNAP_WRITES random 4 KiB writes; then,
    if rewrite, the whole export rewritten in 1 MiB pieces."""
    import nbd
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        nblocks = size // 4096
        for i in range(nsnaps):
            for _ in range(SNAP_WRITES):
                h.pwrite(rng.randbytes(4096), rng.randrange(nblocks) * 4096)
            h.flush()
            snapshot(f"s{i + 1}")
        if rewrite:
            piece = rng.randbytes(MIB)
            for off in range(0, size, MIB):
                h.pwrite(piece[:min(MIB, size - off)], off)
            h.flush()
    finally:
        h.shutdown()


def qcow2_with_snapshots(raw: str, image: str, nsnaps: int, size: int, tmp: str) -> None:
    qcow2_from_raw(raw, image)
    if nsnaps == 0:
        return
    qsd = peers.QemuStorageDaemon(image, os.path.join(tmp, "prep-qsd.sock"),
                                  os.path.join(tmp, "prep-qmp.sock"), os.path.join(tmp, "prep-qsd.log"))
    with qsd:
        _nbd_writes(qsd.target().uri or "", size, nsnaps, qsd.snapshot, seed=5, rewrite=True)


def snapdisk_store(store: str, raw: str, size: int, nsnaps: int, pool_bytes: int) -> None:
    """A store with volume `v` = raw's data; then nsnaps snapshots with random writes between
    them and the volume rewritten in full (in process, through the Engine: no server yet)."""
    from snapdisk.store import StoreConfig
    from snapdisk.volume import Engine
    rng = random.Random(5)
    with Engine.create(store, StoreConfig(pool_bytes=pool_bytes)) as e:
        vol = e.create_volume(peers.EXPORT, size).id
        with open(raw, "rb") as f:
            for off in range(0, size, MIB):
                e.write(vol, off, f.read(MIB))
        nblocks = size // 4096
        for i in range(nsnaps):
            for _ in range(SNAP_WRITES):
                e.write(vol, rng.randrange(nblocks) * 4096, rng.randbytes(4096))
            e.create_snapshot(peers.EXPORT, f"s{i + 1}")
        if nsnaps:
            piece = rng.randbytes(MIB)
            for off in range(0, size, MIB):
                e.write(vol, off, piece[:min(MIB, size - off)])
        e.flush()


def empty_store(store: str, volumes: dict[str, int], pool_bytes: int) -> None:
    from snapdisk.store import StoreConfig
    from snapdisk.volume import Engine
    with Engine.create(store, StoreConfig(pool_bytes=pool_bytes)) as e:
        for name, size in volumes.items():
            e.create_volume(name, size)


def resident(paths: list[str]) -> dict[str, tuple[int, int]]:
    """{path: (bytes in page cache, file bytes on disk)} by fincore (util-linux); a directory
    counts its files."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                      if not f.endswith((".sock", ".log", "lock", ".pid"))]
        elif os.path.exists(p):
            files.append(p)
    out: dict[str, tuple[int, int]] = {}
    for p in paths:
        out[p] = (0, 0)
    for f in files:
        try:
            res = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", f],
                                 capture_output=True, text=True, timeout=60).stdout.split()
            r, s = int(res[0]), int(res[1])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            continue
        owner = next(p for p in paths if f == p or f.startswith(p.rstrip("/") + "/"))
        a, b = out[owner]
        out[owner] = (a + r, b + (os.stat(f).st_blocks * 512 if s else 0))
    return out
