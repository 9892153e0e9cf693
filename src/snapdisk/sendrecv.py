"""`send` and `receive`: a snapshot as a stream (stream.py owns the format), and back.

send VOL@SNAP [--from VOL@BASE]
    The ranges to send come from diff.py (a full stream: the snapshot's mapped ranges; an
    incremental one: the ranges changed since BASE, never more).  Each range is read from the
    snapshot's view one window (stream.DATA_CHUNK) at a time, in one read transaction under the
    shared I/O gate, into one reused buffer (streamio.py): allocated runs become DATA records
    (ZERO when all zeros), holes TRIM records.  Nothing is written to the sender's store.

    Encrypted volumes are sent raw: their blocks as stored (ciphertext: AES-XTS with the
    LOGICAL block number as tweak, so it decrypts wherever the receiver puts it), read by a
    thread in the pool seam's raw mode (no key needed: a locked volume sends too), in a
    version 2 stream whose header carries the cipher, tweak mode, key id and the volume's
    wrapped key record (stream.py).  A legacy volume (tweak = physical block number,
    encrypted before store format 3) is refused: its ciphertext is bound to this pool;
    `snapshot copy --encrypt` converts it.

Snapshot identity: a received snapshot keeps the sender's `guid` in its record (catalog.py);
any other snapshot's guid is derived: sha256("snapdisk-snapshot", volume id, volume created,
epoch, snapshot created), 128 bits in hex.  Chained replication (A -> B -> C) keeps the guid,
so "the receiver's newest snapshot IS the stream's base" is a guid comparison.

receive VOL — atomic, also across kill -9:
    full         into a new volume `receiving-<hex>` (listed, reserved) whose record carries a
                 `receiving` marker; at the verified trailer: flush, snapshot it, then ONE
                 transaction renames it to VOL, sets the snapshot's guid and drops the marker.
    incremental  onto VOL, whose newest snapshot must be the stream's base, and whose live
                 view must not have changed since (else refused; --force rolls it back to the
                 base first, like `zfs receive -F`).  VOL's record carries the marker (with the
                 base's epoch) while the records are written into its live view; at the
                 verified trailer: flush, snapshot, then one transaction sets the guid and
                 drops the marker.
    encrypted    a version 2 stream: the new volume takes the stream's key record (locked: the
                 receiver never needs the key; it unlocks with the sender's passphrase or key
                 file), an incremental one applies only onto a volume with the stream's key id;
                 the records are written by a thread in raw mode (ciphertext as is, whole
                 blocks), so the receiver's store holds no plaintext.
    A bad, cut or cancelled stream undoes at once (the hidden volume deleted; VOL's newer
    snapshots deleted and VOL rolled back to the base).  After a crash the marker remains and
    `recover`, run by Engine.open, undoes the same way, so after a restart nothing half-made
    is left and `check` is clean.  While a receive runs, VOL (or the hidden volume) is
    reserved: NBD clients are refused, as during a rollback.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, BinaryIO

from . import catalog, diff, encryption, errors, extmap, layout
from .layout import BLOCK_SIZE, DB_NAMES, DB_SNAPS, DB_VOLUMES
from .native import Txn, raw_io
from .snapshots import Progress
from .stream import (
    DATA,
    DATA_CHUNK,
    TRIM,
    Header,
    StreamReader,
    StreamWriter,
    snapshot_ref,
)
from .streamio import AHEAD, WindowReader, read_ahead, zeros

if TYPE_CHECKING:
    from .engine import Engine

MARKER = "receiving"
PROGRESS_BYTES = 8 << 20  # progress (and the cancel check in it) every 8 MiB of data
TEMP_PREFIX = "receiving-"
Reserve = Callable[[int, str], AbstractContextManager[Any]]
def snapshot_guid(t: Txn, vol: int, epoch: int) -> str:
    srec = catalog.snap_record(t, vol, epoch)
    if srec.guid:
        return srec.guid
    created = catalog.vol_record(t, vol).created
    h = hashlib.sha256(f"snapdisk-snapshot:{vol}:{created!r}:{epoch}:{srec.created!r}".encode())
    return h.hexdigest()[:32]


def _identity(t: Txn, vol: int, epoch: int) -> dict[str, Any]:
    srec = catalog.snap_record(t, vol, epoch)
    return {"name": srec.name, "id": epoch, "created": srec.created,
            "guid": snapshot_guid(t, vol, epoch)}


# ---- send -------------------------------------------------------------------------------------

def send(engine: Engine, volume: str, snap: str | int, out: BinaryIO,
         base: str | int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Write the stream of volume@snap (incremental from volume@base) to out; a summary."""
    t0 = time.monotonic()
    with engine.native.txn() as t:
        vol = catalog.vol_id(t, volume)
        epoch = catalog.snap_epoch(t, vol, snap)
        target = _identity(t, vol, epoch)
        size = catalog.snap_record(t, vol, epoch).size_bytes
        enc = encryption.travel_meta(encryption.record(t, vol), volume, size)
        frm = None
        if base is not None:
            bepoch = catalog.snap_epoch(t, vol, base)
            if bepoch >= epoch:
                raise errors.InvalidArgument(
                    f"the base {volume}@{base} is not older than {volume}@{snap}")
            frm = _identity(t, vol, bepoch)
    changes = engine.diff(volume, None if frm is None else frm["id"], epoch)
    total = sum(c.length for c in changes)
    meta = {"volume": volume, "snapshot": target, "base": frm, "range_bytes": total,
            "sender": "snapdisk"}
    if enc is not None:
        meta["encryption"] = enc
    reader = WindowReader(engine, vol, epoch, raw=enc is not None)
    done = reported = 0
    if progress:
        progress(0, total)
    try:
        w = StreamWriter(out, Header(size, meta))
        for c in changes:
            for pos in range(c.offset, c.offset + c.length, DATA_CHUNK):
                n = min(DATA_CHUNK, c.offset + c.length - pos)
                for kind, off, length, payload in reader.window(pos, n):
                    if kind == TRIM:
                        w.trim(off, length)
                    elif enc is None and zeros(payload):  # ciphertext: always DATA
                        w.zero(off, length)
                    else:
                        w.data(off, payload)
                done += n
                if progress and (done - reported >= PROGRESS_BYTES or done == total):
                    progress(done, total)
                    reported = done
        totals = w.finish()
    except OSError as e:
        raise errors.SnapdiskError(f"cannot write the stream: {e.strerror or e}") from e
    return {"volume": volume, "snapshot": target, "base": frm, "size_bytes": size,
            "incremental": frm is not None, "encrypted": enc is not None,
            "stream_bytes": w.bytes, **totals.to_dict(),
            "seconds": round(time.monotonic() - t0, 3)}


# ---- receive ----------------------------------------------------------------------------------

def receive(engine: Engine, volume: str, src: BinaryIO, force: bool = False,
            progress: Progress | None = None, reserve: Reserve | None = None) -> dict[str, Any]:
    """Apply the stream read from src to volume (see the module docstring); a summary."""
    t0 = time.monotonic()
    reader = StreamReader(src, buffers=AHEAD + 2)
    try:
        header = reader.header()
    except OSError as e:
        raise errors.SnapdiskError(f"cannot read the stream: {e.strerror or e}") from e
    target, frm = _check_meta(header)
    rec = encryption.received_record(header.encryption, "bad send stream")
    catalog.check_name(volume, "volume")
    reserve = reserve or (lambda vol, what: nullcontext())
    what = f"receive into volume {volume!r}"
    undo: Callable[[], None] | None = None
    try:
        if frm is None:
            vol, undo = _begin_full(engine, volume, header, target, rec)
            guard = reserve(vol, what)
        else:
            vol = engine.volume_id(volume)
            guard = reserve(vol, what)  # before --force's rollback: clients are cut off first
        with guard:
            if frm is not None:
                undo = _begin_incremental(engine, volume, vol, header, target, frm, force, rec)
            with raw_io() if rec is not None else nullcontext():  # ciphertext as is
                _apply(engine, vol, reader, header, progress, frm is None)
            engine.flush()
            name = _finish(engine, vol, volume, target)
    except BaseException as e:
        # Failed or cancelled: undo now.  A crash (nothing runs on) leaves it to recover().
        if undo is not None and isinstance(e, Exception | KeyboardInterrupt):
            undo()
        if isinstance(e, OSError):
            raise errors.SnapdiskError(f"cannot read the stream: {e.strerror or e}") from e
        raise
    return {"volume": volume, "snapshot": {**target, "name": name,
                                           "id": engine.snapshot_id(volume, name)},
            "base": frm, "incremental": frm is not None, "encrypted": rec is not None,
            "size_bytes": header.size_bytes,
            "stream_bytes": reader.pos, **reader.totals.to_dict(),
            "seconds": round(time.monotonic() - t0, 3)}


def _check_meta(header: Header) -> tuple[dict[str, Any], dict[str, Any] | None]:
    def ident(d: Any, what: str) -> dict[str, Any]:
        if not (isinstance(d, dict) and isinstance(d.get("name"), str)
                and isinstance(d.get("guid"), str) and d["guid"]):
            raise errors.FormatError(f"bad send stream: the header names no {what} snapshot")
        return d
    target = ident(header.meta.get("snapshot"), "sent")
    catalog.check_name(target["name"], "snapshot")
    base = header.meta.get("base")
    return target, None if base is None else ident(base, "base")


def _begin_full(engine: Engine, volume: str, header: Header, target: dict[str, Any],
                rec: dict[str, Any] | None) -> tuple[int, Callable[[], None]]:
    if _exists(engine, volume):
        raise errors.AlreadyExists(
            f"volume {volume!r} exists: a full stream makes a new volume (an incremental "
            "stream, `send --from`, applies to an existing one)")
    temp = TEMP_PREFIX + secrets.token_hex(8)
    marker = {"kind": "full", "volume": volume, "snapshot": target["name"],
              "started": time.time()}
    # an encrypted stream's volume takes the sender's key record (locked here)
    vol = engine.create_volume(temp, header.size_bytes, {MARKER: marker}, key_record=rec).id
    return vol, lambda: _undo(engine, vol)


def _begin_incremental(engine: Engine, volume: str, vol: int, header: Header,
                       target: dict[str, Any], frm: dict[str, Any], force: bool,
                       rec: dict[str, Any] | None) -> Callable[[], None]:
    """Check that the stream applies onto volume, then mark it; the undo of the mark."""
    sent = snapshot_ref(volume, target)
    with engine.native.txn() as t:
        vs = catalog.state(t, vol)
        if MARKER in catalog.vol_record(t, vol).extra:
            raise errors.Busy(f"volume {volume!r} is receiving another stream")
        encryption.same_key(volume, encryption.record(t, vol), rec, snapshot_ref(volume, target))
        newest = _identity(t, vol, vs.max_snap) if vs.max_snap else None
        if newest is None or newest["guid"] != frm["guid"]:
            have = "has no snapshot" if newest is None else \
                f"has newest snapshot {snapshot_ref(volume, newest)}"
            raise errors.InvalidArgument(
                f"cannot receive {sent}: the stream's base is "
                f"{snapshot_ref(header.meta.get('volume', '?'), frm)}, but volume {volume!r} "
                f"{have}; an incremental stream applies only onto its base")
        if catalog.snap_name_taken(t, vol, target["name"]):
            raise errors.AlreadyExists(f"volume {volume!r} has a snapshot named "
                                       f"{target['name']!r}")
        if header.size_bytes < vs.size_bytes:
            raise errors.InvalidArgument(f"the stream's snapshot is {header.size_bytes} bytes, "
                                         f"volume {volume!r} {vs.size_bytes}: cannot shrink")
    base_epoch = newest["id"]
    if _live_changed(engine, vol, base_epoch, engine.diff(volume, base_epoch, None)):
        if not force:
            raise errors.InvalidArgument(
                f"volume {volume!r} was written after its newest snapshot "
                f"{volume}@{newest['name']}: receive refuses to overwrite those writes (roll "
                "it back, or receive with --force, which rolls it back first)")
        engine.rollback(volume, base_epoch)
    with engine.native.txn(write=True) as t:
        vrec = catalog.vol_record(t, vol)
        vrec.extra[MARKER] = {"kind": "incremental", "base": base_epoch,
                              "snapshot": target["name"], "started": time.time()}
        catalog.put_vol_record(t, vol, vrec)
    engine.native.sync()
    if header.size_bytes > vs.size_bytes:
        engine.resize_volume(volume, header.size_bytes)
    return lambda: _undo(engine, vol)


def _live_changed(engine: Engine, vol: int, epoch: int, changes: list[Any]) -> bool:
    """Whether the live view differs from snapshot epoch within the ranges diff.py found.
    diff.py's ranges also hold records rewritten with the same blocks (a rollback brings old
    content back as new records), so compare the physical blocks there: equal pbns are equal
    bytes (diff.py says why); O(records in the ranges)."""
    if not changes:
        return False
    engine.commit_batch()  # the live map, with the group-commit overlay applied
    with engine.native.txn() as t:
        for c in changes:
            lo, hi = c.offset // BLOCK_SIZE, -(-(c.offset + c.length) // BLOCK_SIZE)
            then = extmap.clip(extmap.view_at(t, vol, epoch, lo, hi), lo, hi)
            now = extmap.clip(sorted(t.live_overlap(vol, lo, hi - lo)), lo, hi)
            if diff.compare_views(then, now):
                return True
    return False


def _apply(engine: Engine, vol: int, reader: StreamReader, header: Header,
           progress: Progress | None, fresh: bool) -> None:
    total = int(header.meta.get("range_bytes") or 0)
    done = reported = 0
    if progress:
        progress(0, total)
    # A new volume maps nothing, so the in-place attempt engine.write makes first always
    # fails there (measured: ~15 % of a full receive's write time): straight to the moved
    # write (redirect-on-write in C, else the general path).
    write = engine.io.write_moved if fresh else engine.write
    for r in read_ahead(reader):
        if r.kind == DATA:
            write(vol, r.offset, r.payload)
        elif not fresh:  # ZERO or TRIM: a new volume reads zeros there already
            engine.zero(vol, r.offset, r.length)
        done += r.length
        if progress and (done - reported >= PROGRESS_BYTES or r.kind != DATA):
            progress(done, max(total, done))
            reported = done


def _finish(engine: Engine, vol: int, volume: str, target: dict[str, Any]) -> str:
    """Snapshot the received volume, then one transaction makes it visible as received."""
    with engine.native.txn() as t:
        name = catalog.vol_record(t, vol).name
    info = engine.create_snapshot(name, target["name"])
    with engine.native.txn(write=True) as t:
        rec = catalog.vol_record(t, vol)
        if rec.name != volume:  # the hidden volume of a full receive takes its name
            if _exists_t(t, volume):
                raise errors.AlreadyExists(f"volume {volume!r} was created during the receive")
            t.delete(DB_NAMES, layout.vol_name_key(rec.name))
            t.put(DB_NAMES, layout.vol_name_key(volume), layout.NAME_VOL.pack(vol))
            rec.name = volume
        rec.extra.pop(MARKER, None)
        catalog.put_vol_record(t, vol, rec)
        srec = catalog.snap_record(t, vol, info.id)
        srec.guid = target["guid"]
        created = target.get("created")
        if isinstance(created, (int, float)) and not isinstance(created, bool) \
                and 0 < created < 1e11:  # when it was taken on the sender (as zfs receive keeps)
            srec.created = float(created)
        t.put(DB_SNAPS, layout.snap_key(vol, info.id), srec.encode())
    engine.native.sync()
    return info.name


def _exists(engine: Engine, volume: str) -> bool:
    with engine.native.txn() as t:
        return _exists_t(t, volume)


def _exists_t(t: Txn, volume: str) -> bool:
    return t.get(DB_NAMES, layout.vol_name_key(volume)) is not None


# ---- undo and recovery ------------------------------------------------------------------------

def _undo(engine: Engine, vol: int) -> None:
    """Undo the receive marked on vol: delete the hidden volume of a full receive; delete the
    snapshots newer than the base of an incremental one and roll back to the base."""
    with engine.native.txn() as t:
        rec = catalog.vol_record(t, vol)
        marker = rec.extra.get(MARKER)
        epochs = catalog.snap_epochs(t, vol)
    if not isinstance(marker, dict):
        return
    if marker.get("kind") == "full":
        engine.delete_volume(rec.name)
        return
    base = marker.get("base")
    for epoch in epochs:
        if isinstance(base, int) and epoch > base:
            engine.delete_snapshot(rec.name, epoch)
    if isinstance(base, int) and base in epochs:
        engine.rollback(rec.name, base)
    with engine.native.txn(write=True) as t:
        rec = catalog.vol_record(t, vol)
        rec.extra.pop(MARKER, None)
        catalog.put_vol_record(t, vol, rec)
    engine.native.sync()


def recover(engine: Engine) -> list[str]:
    """Undo the receives a crash interrupted (Engine.open); the volumes it touched."""
    found = []
    with engine.native.txn() as t:
        for k, raw in t.scan(DB_VOLUMES, b""):
            if b'"' + MARKER.encode() + b'"' in raw:
                vol = layout.parse_vol_key(k)
                found.append((vol, catalog.VolumeRecord.decode(raw, vol).name))
    undone = []
    for vol, name in found:
        try:
            _undo(engine, vol)
            undone.append(name)
        except errors.SnapdiskError:  # the store still opens; the marker stays for next time
            continue
    return undone
