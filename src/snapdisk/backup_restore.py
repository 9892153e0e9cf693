"""`snapdisk restore s3://BUCKET/PREFIX VOL@SNAP NEWVOL`: a backed-up snapshot into a new
volume of this store (any store, any machine), with a snapshot named like the backed-up one.

Verified as it goes: every chunk is checked against its sha256 (backup_repo.decode_chunk)
before a byte of it is written; a missing or damaged chunk is errors.Corrupt naming it.
Holes stay holes: only the manifest's extents are written.

An encrypted volume's backup (manifest format 2) is restored raw: the hidden volume is made
encrypted under the backup's key record (locked: no key is needed here; the restored volume
unlocks with the sender's passphrase or key file) and the chunks' ciphertext is written as is
by threads in the pool seam's raw mode (whole blocks; a plain volume's writes are the same
either way).

Nothing half-made is visible under NEWVOL: the data goes into a hidden volume named
`.restore-HEX` (a name no user can create: names start with a letter or digit) whose record
carries a `restoring` marker; at the end it is flushed, snapshotted, and renamed to NEWVOL in
one transaction.  A failure or a cancel deletes it.  After a crash (kill -9) it stays behind
under its hidden name until the store is next opened (Engine.open deletes such leftovers) or a
restore runs (it deletes those no restore of this process is writing).
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from . import backup_lock, catalog, encryption, errors, layout
from .backup import THREADS, Repository
from .backup_repo import Extent
from .layout import DB_NAMES
from .native import raw_io
from .snapshots import Cancel, Progress, Steps

if TYPE_CHECKING:
    from .engine import Engine

HIDDEN = catalog.RESTORE_PREFIX
MARKER = "restoring"
AHEAD = 2 * THREADS  # chunks fetched or being fetched ahead of the writer (1 MiB each; 32 and
# 64 measured no faster for 1 GiB: the writer is not what the window waits on)
_active: set[str] = set()  # hidden volumes a restore of this process is writing
_active_lock = threading.Lock()


def restore(engine: Engine, url: str, volume: str, snap: str, new_name: str,
            endpoint: str | None = None, credentials: dict[str, Any] | None = None,
            progress: Progress | None = None, cancel: Cancel | None = None) -> dict[str, Any]:
    catalog.check_name(new_name, "volume")
    r = Repository.open(url, endpoint, credentials)
    # shared: a prune may not delete the chunks this restore is reading (backup_lock.py)
    with backup_lock.hold(r.bucket, backup_lock.SHARED, f"restore of {volume}@{snap}"):
        return _restore(engine, r, volume, snap, new_name, progress, cancel)


def _restore(engine: Engine, r: Repository, volume: str, snap: str, new_name: str,
             progress: Progress | None, cancel: Cancel | None) -> dict[str, Any]:
    m = r.find(volume, snap)
    rec = encryption.received_record(m.encryption, f"backup {m.name}")
    _exists_not(engine, new_name)
    clean_leftovers(engine)
    tmp = HIDDEN + secrets.token_hex(6)
    with _active_lock:
        _active.add(tmp)
    try:
        # an encrypted backup's volume takes the sender's key record (locked here)
        vol = engine.new_volume(tmp, m.size_bytes, {MARKER: {"name": new_name, "backup": m.name}},
                                key_record=rec)
        try:
            _write(engine, r, vol, m.name, m.extents, progress, cancel)
            engine.flush()
            engine.create_snapshot(tmp, m.snapshot["name"])
            _publish(engine, vol, tmp, new_name)
        except BaseException as e:
            if isinstance(e, Exception | KeyboardInterrupt):  # not a crash: clean up now
                engine.delete_volume(tmp)
            raise
    finally:
        with _active_lock:
            _active.discard(tmp)
    info = engine.volume_info(new_name).to_dict()
    return {**info, "backup": m.summary(), "fetched_bytes": r.bucket.stats.get_bytes}


def _exists_not(engine: Engine, name: str) -> None:
    with engine.native.txn() as t:
        if t.get(DB_NAMES, layout.vol_name_key(name)) is not None:
            raise errors.AlreadyExists(f"a volume named {name!r} exists")


def _write(engine: Engine, r: Repository, vol: int, name: str, extents: list[Extent],
           progress: Progress | None, cancel: Cancel | None) -> None:
    """A thread pool fetches and verifies the chunks (a bounded window ahead, taken in the
    order they complete), and this thread writes them, so THREADS downloads stay in flight
    all the time.  Measured (1 GiB, 8 threads, 2 cores shared with radosgw): when each pool
    task also wrote its chunk, half the tasks' time went to writes queued behind each other's
    (GIL hand-offs and the group commit's lock) and only ~4 GETs were in flight; one writer
    needs ~1 ms of C per MiB, far below the network's time.  The hidden volume is fresh and
    its extents disjoint (check_extents), so nothing is ever in place: the moved write
    (redirect-on-write in C, else the general path) without the in-place attempt, as receive."""
    uses: dict[str, list[Extent]] = {}
    for e in extents:
        uses.setdefault(e.key, []).append(e)
    steps = Steps(sum(e.length for e in extents), progress, cancel, every=1)

    def fetch(key: str) -> tuple[str, bytes | memoryview]:
        data = r.fetch(key, name)
        if max(e.skip + e.length for e in uses[key]) > len(data):
            raise errors.Corrupt(f"chunk {key} (of backup {name}) is {len(data)} bytes: "
                                 "the manifest reads past it")
        return key, data

    window: set[Future[tuple[str, bytes | memoryview]]] = set()
    keys = iter(uses)
    # this thread writes: in raw mode, an encrypted backup's ciphertext as is (plain: the same)
    with ThreadPoolExecutor(THREADS) as pool, raw_io():
        try:
            while True:
                while len(window) < AHEAD:
                    key = next(keys, None)
                    if key is None:
                        break
                    window.add(pool.submit(fetch, key))
                if not window:
                    break
                done, window = wait(window, return_when=FIRST_COMPLETED)
                for f in done:
                    key, data = f.result()
                    view = memoryview(data)
                    for e in uses[key]:
                        engine.io.write_moved(vol, e.offset, view[e.skip:e.skip + e.length])
                    steps.step(sum(e.length for e in uses[key]))
        except BaseException:
            for f in window:
                f.cancel()
            raise
    steps.finish()


def _publish(engine: Engine, vol: int, tmp: str, new_name: str) -> None:
    """Rename the finished hidden volume to new_name and drop its marker (one transaction)."""
    with engine.native.txn(write=True) as t:
        if t.get(DB_NAMES, layout.vol_name_key(new_name)) is not None:
            raise errors.AlreadyExists(f"a volume named {new_name!r} was made meanwhile")
        rec = catalog.vol_record(t, vol)
        rec.name = new_name
        rec.extra.pop(MARKER, None)
        catalog.put_vol_record(t, vol, rec)
        t.delete(DB_NAMES, layout.vol_name_key(tmp))
        t.put(DB_NAMES, layout.vol_name_key(new_name), layout.NAME_VOL.pack(vol))
    engine.native.sync()


def clean_leftovers(engine: Engine) -> list[str]:
    """Delete the hidden volumes of restores a crash interrupted (not those running here).
    Engine.open calls it too (nothing runs yet then); a store without any costs one seek."""
    with engine.native.txn() as t:
        if not catalog.has_volume_prefix(t, HIDDEN):
            return []
    gone = []
    for v in engine.list_volumes():
        if v.name.startswith(HIDDEN) and MARKER in v.extra:
            with _active_lock:
                if v.name in _active:
                    continue
            engine.delete_volume(v.name)
            gone.append(v.name)
    return gone
