"""`snapshot copy VOL@SNAP NEWVOL [--encrypt | --decrypt]`: a snapshot's data into a new volume.

The only way to change a volume's encryption (in place is refused: encryption.COPY_HINT).  The
new volume is made first (encrypted under a new key wrapped by the given secret, plain, or with
the source's key record), then every allocated run of the snapshot is read through the source's
key and written through the new volume's (holes stay holes), 1 MiB at a time, with progress.
Cancelled or failed, the new volume is deleted: no half-made volume stays.  Simplification:
not resumable after a crash or Ctrl-C (a crash leaves the half-made volume, to delete by hand).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import catalog, encryption, errors, keys
from .catalog import VolumeInfo
from .snapshots import Cancel, Progress, Steps

if TYPE_CHECKING:
    from .engine import Engine

CHUNK = 1 << 20
MODES = ("same", "encrypt", "decrypt")


def copy(engine: Engine, volume: str, snap: str | int, new_name: str, mode: str = "same",
         secret: keys.Secret | None = None, progress: Progress | None = None,
         cancel: Cancel | None = None) -> VolumeInfo:
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
    runs = [(o, n) for o, n, allocated in engine.snapshot_block_status(vol, epoch, 0, size)
            if allocated]
    total = sum(-(-n // CHUNK) for _, n in runs)
    info = engine.create_volume(new_name, size, encrypt=secret if mode == "encrypt" else None)
    try:
        if mode == "same" and src_encrypted:
            _share_key(engine, vol, info.id)
        steps = Steps(total, progress, cancel, every=1)
        steps.tick()
        for off, n in runs:
            for pos in range(off, off + n, CHUNK):
                data = engine.read_snapshot(vol, epoch, pos, min(CHUNK, off + n - pos))
                engine.write(info.id, pos, data)
                steps.step()
        steps.finish()
        engine.flush()
    except BaseException:
        engine.delete_volume(new_name)  # no half-made volume
        raise
    return engine.volume_info(new_name)


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
