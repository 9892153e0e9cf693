"""Backups of snapshots to an S3-compatible object store: backup, list, verify, prune.  The
repository format is backup_repo.py's; restore is backup_restore.py; the client s3.py.

backup VOL@SNAP s3://BUCKET/PREFIX:
1. The base: the newest manifest of that volume in the repository whose snapshot still exists
   here (same volume id and creation time, same snapshot id, name and creation time) and is
   older than SNAP.  None: a full backup (from empty).
2. The ranges to upload: diff.changed_and_data(base, SNAP) (computed from the map's epochs,
   never by reading data): the changed ranges where SNAP has data (a changed range without
   is dropped from the base and becomes a hole), cut at every CHUNK_SIZE window.
3. Those pieces are read and packed in order into chunks of up to CHUNK_SIZE bytes (an
   all-zero piece is a hole, never uploaded): in a full backup one chunk per window (its
   allocated data: a clone's backup names the same chunks as its origin's, so only its own
   changed windows are uploaded), in an incremental one across windows, so that its 4 KiB
   scattered changes cost 4 KiB each in few objects, not a
   whole chunk: with fixed 1 MiB (or even 64 KiB) chunks, 10 % of blocks changed at random
   touch nearly every chunk (1 - 0.9^16 = 81 % of 64 KiB chunks), far from the 1.2x target.
   The price: a packed chunk rarely deduplicates, and a long chain of incrementals makes the
   manifest's extent list longer (a full backup starts it afresh).
4. Chunks are hashed, compressed and uploaded by a thread pool; a chunk the repository holds
   already (listed once at the start) is skipped, which is also what makes a backup resumable
   after a crash or Ctrl-C: the next run uploads only what is missing.
5. The manifest last (create-only): until then the backup is invisible.

An encrypted volume is backed up raw: its pieces are read by threads in the pool seam's raw
mode (native.raw_io: the blocks as stored, AES-XTS ciphertext with the logical block as tweak,
no key needed), and its manifest (format 2) carries its wrapped key record; restore needs no
key either, and the restored volume unlocks with the sender's secret.  A legacy (pbn-tweak)
volume is refused (encryption.travel_meta says how to convert it).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import backup_lock, catalog, diff, encryption, errors, native
from . import backup_repo as repo
from .backup_repo import CHUNK_SIZE, Extent, Manifest
from .native import raw_io
from .s3 import Bucket
from .snapshots import Cancel, Progress, Steps

if TYPE_CHECKING:
    from .engine import Engine

THREADS = 8


class Repository:
    """An open repository: its bucket, the chunks it holds (listed on demand)."""

    def __init__(self, bucket: Bucket):
        self.bucket = bucket
        self._chunks: set[str] | None = None
        self._listing: Future[set[str]] | None = None
        self.lock = threading.Lock()

    @classmethod
    def open(cls, url: str, endpoint: str | None = None,
             credentials: dict[str, Any] | None = None, create: bool = False) -> Repository:
        b = Bucket(url, endpoint, credentials, THREADS)
        try:
            raw = b.get(repo.CONFIG_NAME)
        except errors.NotFound:
            if not create:
                raise errors.NotFound(f"{b.where()} is no snapdisk backup repository (no "
                                      "config object): nothing was backed up there") from None
            b.ensure_bucket()  # a new repository (in a new bucket, maybe)
            b.put(repo.CONFIG_NAME, repo.encode_config(), create_only=True)
            raw = b.get(repo.CONFIG_NAME)
        repo.check_config(raw, b.where())
        return cls(b)

    def chunks(self) -> set[str]:
        if self._chunks is None:
            self._chunks = self._listing.result() if self._listing else self._list_chunks()
        return self._chunks

    def _list_chunks(self) -> set[str]:
        return {k for n, _, _ in self.bucket.list(repo.CHUNKS_DIR) if (k := repo.chunk_key(n))}

    def list_chunks_ahead(self) -> None:
        """List the chunks in a thread now (chunks() takes its result): the listing is mostly
        waiting on the server, which a backup's map walk can use (~0.1 s of an incremental's
        1-2 s for a 1 GiB volume's ~1100 chunks).  Its error, if any, is chunks()'s."""
        if self._listing is None and self._chunks is None:
            f: Future[set[str]] = Future()

            def run() -> None:
                try:
                    f.set_result(self._list_chunks())
                except BaseException as e:
                    f.set_exception(e)
            threading.Thread(target=run, name="snapdisk-list-chunks", daemon=True).start()
            self._listing = f

    def manifest_names(self, volume: str | None = None) -> list[str]:
        under = repo.MANIFESTS_DIR + (f"{volume}/" if volume else "")
        return sorted(n for n, _, _ in self.bucket.list(under) if repo.parse_manifest_name(n))

    def manifest(self, name: str) -> Manifest:
        return repo.decode_manifest(self.bucket.get(name), name)

    def find(self, volume: str, snap: str) -> Manifest:
        """The manifest of VOLUME@SNAP (a snapshot name, or its id on the source store)."""
        names = self.manifest_names(volume)
        for n in names:
            _, epoch, name = repo.parse_manifest_name(n) or ("", 0, "")
            if name == snap or (snap.isdigit() and int(snap) == epoch):
                return self.manifest(n)
        have = ", ".join(f"{volume}@{(repo.parse_manifest_name(n) or ('', 0, ''))[2]}"
                         for n in names) or "none"
        raise errors.NotFound(f"no backup of {volume}@{snap} in {self.bucket.where()} "
                              f"(backups of {volume}: {have})")

    def fetch(self, key: str, name: str = "") -> bytes | memoryview:
        """A chunk's plaintext, verified; Corrupt names the chunk (and the backup)."""
        of = f" (of backup {name})" if name else ""
        try:
            raw = self.bucket.get(repo.chunk_name(key))
        except errors.NotFound:
            raise errors.Corrupt(f"chunk {key}{of} is missing from {self.bucket.where()}") \
                from None
        try:
            return repo.decode_chunk(raw, key)
        except errors.Corrupt as e:
            raise errors.Corrupt(f"{e.message}{of} in {self.bucket.where()}") from None


def _changes(engine: Engine, volume: str, base: int | None, epoch: int
             ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(the changed ranges, the part of them holding data at epoch): both from the map, in
    O(changed records) (diff.changed_and_data), never a walk of the whole snapshot."""
    changed, data = diff.changed_and_data(engine, volume, base, epoch)
    return [(c.offset, c.length) for c in changed], [(c.offset, c.length) for c in data]


def _find_base(engine: Engine, r: Repository, volume: str, info: Any, epoch: int
               ) -> tuple[Manifest | None, Manifest | None]:
    """(the manifest of this very snapshot if backed up already, the base to diff from)."""
    local = {s.id: s for s in engine.list_snapshots(volume, with_usage=False)}
    for name in reversed(r.manifest_names(volume)):
        parsed = repo.parse_manifest_name(name)
        if parsed is None or parsed[1] > epoch or parsed[1] not in local:
            continue
        m = r.manifest(name)
        s = local[parsed[1]]
        if (m.volume_id, m.volume_created) != (info.id, info.created) or \
                (m.snapshot["name"], m.snapshot["created"]) != (s.name, s.created):
            continue  # another volume of that name (deleted and made again, another store)
        if parsed[1] == epoch:
            return m, None
        return None, m
    return None, None


def backup(engine: Engine, volume: str, snap: str | int, url: str,
           endpoint: str | None = None, credentials: dict[str, Any] | None = None,
           resume: bool = False, progress: Progress | None = None,
           cancel: Cancel | None = None) -> dict[str, Any]:
    """Back up VOLUME@SNAP; a summary with what was uploaded.  resume is accepted for the
    command line's sake: every run skips the chunks the repository has (see the docstring)."""
    t0 = time.monotonic()
    with engine.native.txn() as t:
        vol = catalog.vol_id(t, volume)
        epoch = catalog.snap_epoch(t, vol, snap)
        srec = catalog.snap_record(t, vol, epoch)
        enc = encryption.travel_meta(encryption.record(t, vol), volume, srec.size_bytes)
    info = engine.volume_info(volume)
    r = Repository.open(url, endpoint, credentials, create=True)
    # shared: backups run side by side, never beside a prune (backup_lock.py says why)
    with backup_lock.hold(r.bucket, backup_lock.SHARED, f"backup of {volume}@{srec.name}") as lk:
        return _backup(engine, r, lk, volume, vol, epoch, srec, info, enc, progress, cancel, t0)


def _backup(engine: Engine, r: Repository, lk: backup_lock.Lock, volume: str, vol: int,
            epoch: int, srec: Any, info: Any, enc: dict[str, Any] | None,
            progress: Progress | None, cancel: Cancel | None, t0: float) -> dict[str, Any]:
    r.list_chunks_ahead()  # under the lock: no prune deletes what it lists
    done, base = _find_base(engine, r, volume, info, epoch)
    if done is not None:
        return {**done.summary(), "already_backed_up": True, "uploaded_chunks": 0,
                "uploaded_bytes": 0, "seconds": time.monotonic() - t0}
    size = srec.size_bytes
    if base is not None and base.size_bytes != size:
        base = None  # resized since: a full backup (simpler than clipping the base)
    changed, allocated = _changes(engine, volume, base.snapshot["id"] if base else None, epoch)
    pieces = repo.split_windows(allocated)
    kept = repo.cut(base.extents, changed) if base else []
    up = _Uploader(r, Steps(sum(n for _, n in pieces), progress, cancel, every=1),
                   per_window=base is None)
    read: Reader = functools.partial(_read_pieces, engine, vol, epoch)
    new = up.run(read if enc is None else _raw(read), pieces)
    m = Manifest(volume, vol, info.created, {"name": srec.name, "id": epoch,
                                            "created": srec.created},
                 size, time.time(), base.name if base else None, repo.merge(kept, new), enc)
    lk.ensure()  # the manifest makes the chunks referenced: only while no prune can run
    if not r.bucket.put(m.name, repo.encode_manifest(m), create_only=True):
        raise errors.AlreadyExists(f"{r.bucket.where(m.name)} exists and is not a backup of "
                                   "this snapshot (another volume of that name?)")
    return {**m.summary(), "already_backed_up": False, "changed_bytes": sum(n for _, n in pieces),
            "read_bytes": up.read_bytes,
            "uploaded_chunks": up.new_chunks, "uploaded_bytes": up.new_bytes,
            "stored_bytes": up.stored_bytes, "reused_chunks": up.reused_chunks,
            "puts": r.bucket.stats.puts, "seconds": time.monotonic() - t0}


def _raw(read: Reader) -> Reader:
    """read in the pool seam's raw mode, on whichever thread calls it (the uploaders'): an
    encrypted volume's pieces as stored, ciphertext (the bytes _read_pieces returns are then
    ciphertext, not the data)."""
    def raw_read(pieces: list[tuple[int, int]]) -> bytearray:
        with raw_io():
            return read(pieces)
    return raw_read


def list_backups(url: str, endpoint: str | None = None,
                 credentials: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    r = Repository.open(url, endpoint, credentials)
    return [r.manifest(n).summary() for n in r.manifest_names()]


def verify(url: str, volume: str, snap: str, endpoint: str | None = None,
           credentials: dict[str, Any] | None = None, progress: Progress | None = None,
           cancel: Cancel | None = None) -> dict[str, Any]:
    """Fetch every chunk VOLUME@SNAP's backup names and check it; Corrupt names the missing
    or damaged chunks."""
    r = Repository.open(url, endpoint, credentials)
    with backup_lock.hold(r.bucket, backup_lock.SHARED, f"verify of {volume}@{snap}"):
        return _verify(r, volume, snap, progress, cancel)


def _verify(r: Repository, volume: str, snap: str, progress: Progress | None,
            cancel: Cancel | None) -> dict[str, Any]:
    m = r.find(volume, snap)
    keys = m.chunk_keys()
    steps = Steps(len(keys), progress, cancel, every=1)
    bad: list[str] = []

    def check(key: str) -> None:
        try:
            r.fetch(key, m.name)
        except errors.Corrupt as e:
            with r.lock:
                bad.append(e.message)

    with ThreadPoolExecutor(THREADS) as pool:
        for f in [pool.submit(check, k) for k in keys]:
            f.result()
            steps.step()
    steps.finish()
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise errors.Corrupt(f"backup {volume}@{m.snapshot['name']} is damaged: "
                             f"{sorted(bad)[0]}{more}")
    return {**m.summary(), "verified_chunks": len(keys), "ok": True,
            "fetched_bytes": r.bucket.stats.get_bytes}


def prune(url: str, keep_last: int | None = None, keep_days: float | None = None,
          endpoint: str | None = None, credentials: dict[str, Any] | None = None,
          progress: Progress | None = None, cancel: Cancel | None = None,
          now: float | None = None) -> dict[str, Any]:
    """Per volume, keep the newest keep_last backups, or those of snapshots taken in the last
    keep_days days; delete the other manifests, then every chunk no kept manifest names.
    Holds the repository's exclusive lock: refused (Busy) while a backup, restore or verify
    of it runs, since a running backup's chunks have no manifest yet."""
    if (keep_last is None) == (keep_days is None):
        raise errors.InvalidArgument("prune takes one of --keep-last N or --keep-days D")
    if (keep_last is not None and keep_last < 0) or (keep_days is not None and keep_days < 0):
        raise errors.InvalidArgument("--keep-last and --keep-days must not be negative")
    r = Repository.open(url, endpoint, credentials)
    # exclusive: no backup may be between uploading chunks and naming them (backup_lock.py)
    with backup_lock.hold(r.bucket, backup_lock.EXCLUSIVE, "prune") as lk:
        return _prune(r, lk, keep_last, keep_days, progress, cancel, now)


def _prune(r: Repository, lk: backup_lock.Lock, keep_last: int | None,
           keep_days: float | None, progress: Progress | None, cancel: Cancel | None,
           now: float | None) -> dict[str, Any]:
    steps = Steps(3, progress, cancel, every=1)
    by_vol: dict[str, list[Manifest]] = {}
    for n in r.manifest_names():
        m = r.manifest(n)
        by_vol.setdefault(m.volume, []).append(m)
    steps.step()
    now = time.time() if now is None else now
    drop: list[Manifest] = []
    kept: list[Manifest] = []
    for ms in by_vol.values():
        ms.sort(key=lambda m: (m.snapshot["created"], m.snapshot["id"]))
        for i, m in enumerate(ms):
            keep = (len(ms) - i <= keep_last if keep_last is not None
                    else m.snapshot["created"] >= now - (keep_days or 0) * 86400)
            (kept if keep else drop).append(m)
    lk.ensure()
    r.bucket.delete([m.name for m in drop])  # manifests first: no kept backup loses a chunk
    steps.step()
    live = {k for m in kept for k in m.chunk_keys()}
    dead = sorted(k for k in r.chunks() if k not in live)
    lk.ensure()
    r.bucket.delete([repo.chunk_name(k) for k in dead])
    r.bucket.delete(lk.abandoned)  # locks of killed backups (backup_lock.STALE)
    steps.finish()
    return {"deleted_backups": [m.summary()["name"] for m in drop],
            "kept_backups": [m.name for m in kept], "deleted_chunks": len(dead),
            "kept_chunks": len(live), "deleted_locks": len(lk.abandoned)}


class _Uploader:
    """Packs pieces into chunks and has a thread pool read, hash, compress and upload them:
    each task reads its own pieces (the snapshot reads are the slowest step, and their C
    parts release the GIL), drops all-zero ones, and uploads the chunk unless the
    repository has it.  The packing is planned before any read, so it is deterministic."""

    def __init__(self, r: Repository, steps: Steps, per_window: bool):
        self.r, self.steps, self.per_window = r, steps, per_window
        self.known = set(r.chunks())
        self.read_bytes = self.new_chunks = self.new_bytes = self.stored_bytes = 0
        self.reused_chunks = 0

    def run(self, read: Reader, pieces: list[tuple[int, int]]
            ) -> list[Extent]:
        out: list[Extent] = []
        pending: deque[tuple[Future[list[Extent]], int]] = deque()
        with ThreadPoolExecutor(THREADS) as pool:
            try:
                for pack in self._plan(pieces):
                    while len(pending) >= 2 * THREADS:
                        self._reap(pending, out)
                    pending.append((pool.submit(self._chunk, read, pack),
                                    sum(n for _, n in pack)))
                while pending:
                    self._reap(pending, out)
            except BaseException:
                for f, _ in pending:
                    f.cancel()
                raise
        return sorted(out, key=lambda e: e.offset)

    def _reap(self, pending: deque[tuple[Future[list[Extent]], int]], out: list[Extent]
              ) -> None:
        f, n = pending.popleft()
        out += f.result()
        self.steps.step(n)

    def _plan(self, pieces: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        packs: list[list[tuple[int, int]]] = []
        used = 0
        for off, n in pieces:
            if not packs or used + n > CHUNK_SIZE or (
                    self.per_window and packs[-1][0][0] // CHUNK_SIZE != off // CHUNK_SIZE):
                packs.append([])
                used = 0
            packs[-1].append((off, n))
            used += n
        return packs

    def _chunk(self, read: Reader, pack: list[tuple[int, int]]) -> list[Extent]:
        buf = read(pack)  # the pieces back to back: the chunk, unless some are zeros
        group: list[tuple[int, int, int]] = []  # (offset, length, skip) of the kept pieces
        pos = 0
        for off, n in pack:
            # written zeros are restored as a hole; most data differs in its first byte, and
            # bytearray == buffer is a memcmp (memoryview == memoryview compares item by
            # item, 7 ms per MiB)
            if buf[pos] != 0 or buf[pos:pos + n] != _zeros(n):
                group.append((off, n, pos))
            pos += n
        with self.r.lock:
            self.read_bytes += pos
        if not group:
            return []
        if len(group) < len(pack):  # drop the zero pieces: the kept ones back to back
            view = memoryview(buf)
            buf = bytearray().join(view[s:s + n] for _, n, s in group)
            group = [(off, n, s) for (off, n, _), s in
                     zip(group, itertools.accumulate((n for _, n, _ in group), initial=0))]
        key = repo.digest(buf)
        with self.r.lock:
            fresh = key not in self.known
            self.known.add(key)
            self.reused_chunks += not fresh
        if fresh:
            _, obj = repo.encode_chunk(buf, key)
            self.r.bucket.put(repo.chunk_name(key), obj)
            with self.r.lock:
                self.new_chunks += 1
                self.new_bytes += len(buf)
                self.stored_bytes += len(obj)
        return [Extent(off, n, key, skip) for off, n, skip in group]


Reader = Callable[[list[tuple[int, int]]], bytearray]


def _read_pieces(engine: Engine, vol: int, epoch: int, pieces: list[tuple[int, int]]
                 ) -> bytearray:
    """The bytes of snapshot epoch's block-aligned pieces (sorted), back to back in one
    buffer, in one C call (native.snap_readv, GIL released): one view of the pieces' span,
    one pool read per record-piece overlap.  Its Python twin (tests/test_backup.py) took
    ~10 us of Python per 4 KiB piece (the view's dead-record scan, the sweep, a call per
    read): ~0.3 s of CPU for the ~26k scattered pieces of 10 % of a 1 GiB volume, on the
    cores the S3 server shares.  An encrypted volume's pieces are read in raw mode (_raw):
    its ciphertext, as stored."""
    buf = bytearray(sum(n for _, n in pieces))
    with engine.native.gate_shared():
        native.snap_readv(engine.native, vol, epoch, pieces, buf)
    return buf


_ZERO = bytes(CHUNK_SIZE)


def _zeros(n: int) -> memoryview:
    return memoryview(_ZERO)[:n]
