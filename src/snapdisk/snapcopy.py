"""`snapshot copy VOL@SNAP NEWVOL [--encrypt | --decrypt] [--resume]`: a snapshot's data into a
new volume.

The only way to change a volume's encryption (in place is refused: encryption.COPY_HINT).  The
new volume is made first (encrypted under a new key wrapped by the given secret, plain, or with
the source's key record), then every allocated run of the snapshot is read through the source's
key and written through the new volume's (holes stay holes), 1 MiB at a time, with progress.

Crash and resume: until the copy ends, the new volume's record carries a `copying` marker
(source volume id, snapshot id, mode, and `done`: the byte offset below which every allocated run
is copied and flushed).  The marker moves forward only after a flush, every CHECKPOINT bytes, so
after a crash (kill -9 of the server or of the offline command) `--resume` rewrites from `done`
on: rewriting a chunk is idempotent.  The marker is dropped once the copy is complete and flushed.
Cancelled or failed (not crashed), the new volume is deleted: no half-made volume stays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import catalog, encryption, errors, keys
from .catalog import VolumeInfo
from .snapshots import Cancel, Progress, Steps

if TYPE_CHECKING:
    from .engine import Engine

CHUNK = 1 << 20
CHECKPOINT = 16 << 20  # bytes copied between checkpoints (a flush and a marker update)
MODES = ("same", "encrypt", "decrypt")


def copy(engine: Engine, volume: str, snap: str | int, new_name: str, mode: str = "same",
         secret: keys.Secret | None = None, progress: Progress | None = None,
         cancel: Cancel | None = None, resume: bool = False) -> VolumeInfo:
    if mode not in MODES:
        raise errors.InvalidArgument(f"copy mode {mode!r}: one of {', '.join(MODES)}")
    catalog.check_name(new_name, "volume")
    with engine.native.txn() as t:
        vol = catalog.vol_id(t, volume)
        epoch = catalog.snap_epoch(t, vol, snap)
        size = catalog.snap_record(t, vol, epoch).size_bytes
        src_encrypted = encryption.record(t, vol) is not None
    if mode == "encrypt" and secret is None:
        raise errors.InvalidArgument("snapshot copy --encrypt needs a passphrase or key file")
    if mode == "decrypt":
        if not src_encrypted:
            raise errors.InvalidArgument(f"volume {volume!r} is not encrypted: nothing to "
                                         "decrypt (copy without --decrypt)")
        if secret is not None:
            engine.unlock(volume, secret)
    if src_encrypted and engine.keys.locked(vol):
        raise errors.BadKey(f"volume {volume!r} is encrypted and locked: unlock it first "
                            "(or give --decrypt its passphrase or key file)")
    marker = {"volume_id": vol, "snapshot_id": epoch, "mode": mode, "done": 0}
    if resume:
        info, start = _resume(engine, new_name, marker, secret)
    else:
        info = engine.create_volume(new_name, size, {"copying": marker},
                                    encrypt=secret if mode == "encrypt" else None)
        start = 0
    runs = [(o, n) for o, n, allocated in engine.snapshot_block_status(vol, epoch, 0, size)
            if allocated]
    steps = Steps(sum(-(-n // CHUNK) for _, n in runs), progress, cancel, every=1)
    try:
        if mode == "same" and src_encrypted and not resume:
            _share_key(engine, vol, info.id)
        steps.tick()
        since = 0
        for off, n in runs:
            for pos in range(off, off + n, CHUNK):
                end = min(pos + CHUNK, off + n)
                if end > start:
                    engine.write(info.id, pos, engine.read_snapshot(vol, epoch, pos, end - pos))
                    since += end - pos
                    if since >= CHECKPOINT:
                        _checkpoint(engine, info.id, end)
                        since = 0
                steps.step()
        steps.finish()
        _checkpoint(engine, info.id, None)
    except BaseException as e:
        if isinstance(e, Exception | KeyboardInterrupt):  # cancelled or failed: not a crash
            engine.delete_volume(new_name)  # no half-made volume
        raise
    return engine.volume_info(new_name)


def _resume(engine: Engine, new_name: str, marker: dict[str, Any],
            secret: keys.Secret | None) -> tuple[VolumeInfo, int]:
    info = engine.volume_info(new_name)
    got = info.extra.get("copying")
    if not isinstance(got, dict) or {k: got.get(k) for k in marker if k != "done"} != \
            {k: v for k, v in marker.items() if k != "done"}:
        raise errors.InvalidArgument(f"volume {new_name!r} is not an unfinished copy of that "
                                     "snapshot with that mode: nothing to resume")
    if info.locked:
        if secret is None:
            raise errors.BadKey(f"volume {new_name!r} is locked: give its passphrase or key "
                                "file to resume")
        engine.unlock(new_name, secret)
    done = got.get("done")
    return engine.volume_info(new_name), done if isinstance(done, int) and done >= 0 else 0


def _checkpoint(engine: Engine, vol: int, done: int | None) -> None:
    """Flush, then record that everything below done is copied (None: the copy is complete)."""
    engine.flush()
    with engine.native.txn(write=True) as t:
        rec = catalog.vol_record(t, vol)
        if done is None:
            rec.extra.pop("copying", None)
        else:
            rec.extra["copying"] = {**rec.extra.get("copying", {}), "done": done}
        catalog.put_vol_record(t, vol, rec)


def _share_key(engine: Engine, src: int, new: int) -> None:
    """The plain-made new volume takes the source's key record (same key id), before any data
    is written to it."""
    with engine.native.gate_exclusive():
        with engine.native.txn(write=True) as t:
            vs = catalog.state(t, new)
            encryption.inherit(t, src, vs)
            vs.save(t)
        from .volume import configure
        configure(engine.native, vs)
    engine.keys.load([new])


def copy_args(args: dict[str, Any]) -> tuple[str, keys.Secret | None]:
    """(mode, secret) from control-op arguments encrypt / decrypt / passphrase / key_hex."""
    if args.get("encrypt") and args.get("decrypt"):
        raise errors.InvalidArgument("--encrypt and --decrypt exclude each other")
    mode = "encrypt" if args.get("encrypt") else "decrypt" if args.get("decrypt") else "same"
    has = args.get("passphrase") is not None or args.get("key_hex") is not None
    return mode, keys.Secret.from_args(args) if has else None
