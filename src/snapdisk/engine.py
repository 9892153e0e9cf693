"""The engine: one open store, the API the NBD plugin, the control server and the CLI call.

A facade: it opens, recovers and closes the store, manages volumes, and delegates the rest to
    catalog.py    names, ids, typed records
    snapshots.py  snapshot create/delete, rollback, clone (and quotas)
    policies.py   snapshot policies, quotas, the time zone (engine.policies)
    capacity.py   usage, referenced and exclusive bytes
    volume.py     the data path (read, write, trim, zero, flush, block status, snapshot reads)
It keeps no state of its own beyond the open store: everything is read from LMDB inside the
transaction that uses it.  Concurrency: see volume.py.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

from . import allocator, bulk, capacity, catalog, encryption, errors, extmap, keys, layout, native
from . import diff as diff_  # changed blocks (issue 13)
from .catalog import SnapshotInfo, VolumeInfo
from .check import CheckReport, check_store
from .layout import (
    DB_NAMES,
    DB_SNAPS,
    DB_VOLSTATE,
    DB_VOLUMES,
    INFINITY,
)
from .native import KEY_UNLOCKED
from .policies import Policies
from .pool import Pool
from .snapshots import Cancel, Progress, Snapshots, Steps, cancel_point
from .store import StoreConfig, StoreDir
from .volume import DataPath, configure

F = TypeVar("F", bound=Callable[..., Any])


def durable(method: F) -> F:
    """A control operation replies only once it is durable (issue 9).  By default its
    transactions are synced commits (each applied the group-commit overlay first, its data
    fdatasync()ed before), so it is durable when its last commit returns; this is the one place
    that syncs it on an unsafe_nosync store too (measured: a second sync after each snapshot
    doubled snapshot create's latency under load for nothing)."""
    @functools.wraps(method)
    def wrapper(self: Engine, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        if self.config.unsafe_nosync:
            self.native.sync()
        return result
    return cast(F, wrapper)


class Engine:
    """An open store.  Create with Engine.create(path) or Engine.open(path); close() at the end."""

    def __init__(self, sd: StoreDir):
        self.sd = sd
        self.native = sd.native
        self.pool = Pool(sd.native)
        self.io = DataPath(self.native, self.pool,
                           os.environ.get("SNAPDISK_WRITE_PATH") != "python")
        self.snapshots = Snapshots(self.native, sd.config, self.io)
        self.policies = Policies(sd, self.snapshots)  # policies, quotas, the scheduler's I/O
        self.keyring = keys.Keyring()  # unlocked data keys (encryption.py)
        self.keys = encryption.VolumeKeys(self.native, self.keyring)
        self._recover()

    @classmethod
    def create(cls, path: str, config: StoreConfig | None = None) -> Engine:
        return cls(StoreDir.create(path, config))

    @classmethod
    def open(cls, path: str) -> Engine:
        return cls(StoreDir.open(path))

    def close(self) -> None:
        try:
            self.native.sync()
        finally:
            self.keyring.clear()  # the C side wipes its contexts in xm_close
            self.sd.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self.sd.path

    @property
    def config(self) -> StoreConfig:
        return self.sd.config

    @property
    def _c_redirect(self) -> bool:  # the model test switches the write path
        return self.io.c_redirect

    @_c_redirect.setter
    def _c_redirect(self, on: bool) -> None:
        self.io.c_redirect = on

    def _recover(self) -> None:
        """After open: nothing else runs yet, so every pending block can be reused, and the hot
        path learns the volumes."""
        with self.native.txn(write=True) as t:
            allocator.release_pending(t)
        self.snapshots.bulk.finish_all()  # bulk work a crash interrupted (bulk.py)
        with self.native.txn() as t:
            states = [catalog.VolState.decode(layout.parse_vol_key(k), v)
                      for k, v in t.scan(DB_VOLSTATE, b"")]
        for vs in states:
            configure(self.native, vs)
        self._recover_receives()  # send/receive: undo what a crash interrupted (sendrecv.py)
        with self.native.txn() as t:  # the hidden volume of an interrupted restore
            leftover = catalog.has_volume_prefix(t, catalog.RESTORE_PREFIX)
        if leftover:  # (imported only then: the backup modules cost ~20 ms to import)
            from . import backup_restore
            backup_restore.clean_leftovers(self)

    def _configure_gated(self, vs: catalog.VolState) -> None:
        with self.native.gate_exclusive():
            configure(self.native, vs)

    def commit_batch(self) -> None:
        """Apply the group-commit overlay (pending redirected writes) to LMDB now.  Write
        transactions do it themselves; Python read transactions do not (the hot path reads the
        overlay; snapshot views never include it: its blocks are born in the current epoch),
        so the readers of counters and of the whole map (usage, check) call this first."""
        native.batch_commit(self.native)

    # ---- lookups ----------------------------------------------------------------------------

    def volume_id(self, name: str) -> int:
        with self.native.txn() as t:
            return catalog.vol_id(t, name)

    def snapshot_id(self, volume: str, snap: str | int) -> int:
        with self.native.txn() as t:
            return catalog.snap_epoch(t, catalog.vol_id(t, volume), snap)

    def volume_info(self, name: str) -> VolumeInfo:
        with self.native.txn() as t:
            return self._locked(catalog.info(t, catalog.vol_id(t, name)))

    def list_volumes(self) -> list[VolumeInfo]:
        with self.native.txn() as t:
            return sorted((self._locked(catalog.info(t, v)) for v in catalog.volume_ids(t)),
                          key=lambda i: i.name)

    def _locked(self, info: VolumeInfo) -> VolumeInfo:
        info.locked = info.encrypted and self.native.vol_key_state(info.id) != KEY_UNLOCKED
        return info

    def list_snapshots(self, volume: str, with_usage: bool = True) -> list[SnapshotInfo]:
        if with_usage:
            self.commit_batch()  # exclusive bytes count the dead records a batch adds
        with self.native.txn() as t:
            return capacity.list_snapshots(t, volume, with_usage)

    def snapshot_info(self, volume: str, snap: str | int) -> SnapshotInfo:
        self.commit_batch()
        with self.native.txn() as t:
            return capacity.snapshot_info(t, volume, snap)

    def usage(self, volume: str | None = None) -> dict[str, Any]:
        self.commit_batch()
        with self.native.txn() as t:
            return capacity.usage(t, self.pool, volume, self.native)

    def check(self) -> CheckReport:
        self.snapshots.bulk.finish_all()  # marked bulk work first: the invariants hold after it
        self.commit_batch()
        with self.native.txn() as t:
            return check_store(t)

    # ---- volumes ----------------------------------------------------------------------------

    @durable
    def create_volume(self, name: str, size_bytes: int, extra: dict[str, Any] | None = None,
                      encrypt: keys.Secret | None = None,
                      key_record: dict[str, Any] | None = None) -> VolumeInfo:
        """A new volume; encrypt: encrypted under a new data key wrapped by that passphrase
        or key file, and unlocked; key_record: encrypted under a key record from elsewhere (a
        raw stream's or backup's: encryption.adopt), locked unless its key id is unlocked."""
        catalog.check_name(name, "volume")
        catalog.check_size(size_bytes)
        self.new_volume(name, size_bytes, extra, encrypt, key_record)
        return self.volume_info(name)

    def new_volume(self, name: str, size_bytes: int, extra: dict[str, Any] | None = None,
                   encrypt: keys.Secret | None = None,
                   key_record: dict[str, Any] | None = None) -> int:
        """create_volume without the name rules (a restore's hidden `.restore-` volume); its
        id.  Encrypted from its first transaction, never plain for an instant."""
        with self.native.txn(write=True) as t:
            vs = catalog.new_volume(t, name, size_bytes, None, extra or {})
            if encrypt is not None:
                encryption.init_new(t, vs, encrypt, self.keyring)
            elif key_record is not None:
                encryption.adopt(t, vs, key_record)
        self._configure_gated(vs)
        if encrypt is not None or key_record is not None:
            self.keys.load([vs.vol])
        return vs.vol

    @durable
    def resize_volume(self, name: str, size_bytes: int) -> VolumeInfo:
        catalog.check_size(size_bytes)
        with self.native.gate_exclusive():
            with self.native.txn(write=True) as t:
                vs = catalog.state(t, catalog.vol_id(t, name))
                if size_bytes < vs.size_bytes:
                    raise errors.InvalidSize(
                        f"volume {name!r} is {vs.size_bytes} bytes: shrinking to {size_bytes} "
                        "would drop data and is not supported")
                vs.size_bytes = size_bytes
                vs.save(t)
            configure(self.native, vs)
        return self.volume_info(name)

    @durable
    def delete_volume(self, name: str, progress: Progress | None = None,
                      cancel: Cancel | None = None) -> None:
        """Drop the volume, its snapshots and names; release every block only it held.  One
        mark transaction removes everything visible (the name is free at once), then its map
        records are released in bounded chunks (bulk.py); a cancel stops between chunks, and
        the rest is finished by the next bulk operation or the next open."""
        steps = Steps(0, progress, cancel, every=1)
        with self.native.gate_exclusive():
            with self.native.txn(write=True) as t:
                vol = catalog.vol_id(t, name)
                if bulk.busy_volume(t, vol):
                    raise errors.Busy(f"volume {name!r} is being rolled back: try again later")
                vs = catalog.state(t, vol)
                prefix = layout.vol_key(vol)
                steps.total = vs.live_blocks + extmap.counted_blocks(t, vol, 0, INFINITY, 0,
                                                                     INFINITY)
                cancel_point(cancel)  # a cancel before the mark changes nothing
                t.delete_prefix(DB_SNAPS, prefix)
                t.delete_prefix(DB_NAMES, layout.snap_name_prefix(vol))
                t.delete(DB_NAMES, layout.vol_name_key(name))
                t.delete(DB_VOLUMES, prefix)
                t.delete(DB_VOLSTATE, prefix)
                item = bulk.mark(t, {"op": "delete_volume", "vol": vol})
            self.native.vol_forget(vol)
            self.native.vol_mark_encrypted(vol, False)  # wipes its key slot
        self.keys.forget_unused()
        self.snapshots._walk([item], steps, "the volume is deleted; the rest of its space")

    # ---- snapshots (snapshots.py) -----------------------------------------------------------

    @durable
    def create_snapshot(self, volume: str, name: str | None = None, kind: str = "manual",
                        policy: str | None = None) -> SnapshotInfo:
        # (the Busy check is inside create's transaction: a read transaction here applied the
        # pending group-commit batch first, the largest part of snapshot create under load)
        return self.snapshots.create(volume, name, kind, policy)

    @durable
    def delete_snapshot(self, volume: str, snap: str | int, progress: Progress | None = None,
                        cancel: Cancel | None = None) -> None:
        self.snapshots.delete(volume, snap, progress, cancel)

    @durable
    def rollback(self, volume: str, snap: str | int, progress: Progress | None = None,
                 cancel: Cancel | None = None) -> None:
        self.snapshots.rollback(volume, snap, progress, cancel)

    @durable
    def clone(self, volume: str, snap: str | int, new_name: str,
              progress: Progress | None = None, cancel: Cancel | None = None) -> VolumeInfo:
        vol = self.snapshots.clone(volume, snap, new_name, progress, cancel)
        self.keys.load([vol])  # an encrypted origin's key, if unlocked here
        return self.volume_info(new_name)

    # ---- encrypted volumes (encryption.py) ---------------------------------------------------

    def unlock(self, name: str, secret: keys.Secret) -> dict[str, Any]:
        return self.keys.unlock(name, secret)

    def lock(self, name: str) -> dict[str, Any]:
        return self.keys.lock(name)

    def rotate_key(self, name: str, old: keys.Secret, new: keys.Secret) -> dict[str, Any]:
        return self.keys.rotate(name, old, new)

    def key_info(self, name: str) -> dict[str, Any]:
        return self.keys.info(name)

    def copy_snapshot(self, volume: str, snap: str | int, new_name: str, mode: str = "same",
                      secret: keys.Secret | None = None, progress: Progress | None = None,
                      cancel: Cancel | None = None, resume: bool = False) -> VolumeInfo:
        """snapshot copy (snapcopy.py): mode same, encrypt (under secret) or decrypt."""
        from . import snapcopy
        return snapcopy.copy(self, volume, snap, new_name, mode, secret, progress, cancel,
                             resume)

    # ---- the data path (volume.py) ----------------------------------------------------------

    def read(self, vol: int, offset: int, length: int) -> bytes:
        return self.io.read(vol, offset, length)

    def read_into(self, vol: int, offset: int, buf: Any) -> None:
        self.native.read_into(vol, offset, buf)

    def write(self, vol: int, offset: int, data: Any, fua: bool = False) -> None:
        self.io.write(vol, offset, data, fua)

    def live_io(self, vol: int) -> tuple[Callable[[int, Any], None],
                                         Callable[[int, Any, bool], None]]:
        return self.io.live_io(vol)

    def trim(self, vol: int, offset: int, length: int, zero: bool = False, fua: bool = False
             ) -> None:
        self.io.trim(vol, offset, length, zero, fua)

    def zero(self, vol: int, offset: int, length: int, fua: bool = False) -> None:
        self.io.zero(vol, offset, length, fua)

    def flush(self) -> None:
        self.io.flush()

    def block_status(self, vol: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.io.block_status(vol, offset, length)

    def volume_size(self, vol: int) -> int:
        return self.io.volume_size(vol)

    def read_snapshot(self, vol: int, epoch: int, offset: int, length: int) -> bytes:
        return self.io.read_snapshot(vol, epoch, offset, length)

    def snapshot_reader(self, vol: int, epoch: int) -> Callable[[int, Any], None]:
        return self.io.snapshot_reader(vol, epoch)

    def snapshot_block_status(self, vol: int, epoch: int, offset: int, length: int
                              ) -> list[tuple[int, int, bool]]:
        return self.io.snapshot_block_status(vol, epoch, offset, length)

    def snapshot_size(self, vol: int, epoch: int) -> int:
        return self.io.snapshot_size(vol, epoch)

    # ---- changed blocks (issue 13: diff.py) ----------------------------------------------------

    def diff(self, volume: str, base: str | int | None, target: str | int | None,
             base_volume: str | None = None) -> list[diff_.Change]:
        return diff_.changed_ranges(self, volume, base, target, base_volume)
    # ---- issue 13: disk images out and in (imagecopy.py; control/image_ops.py) ----------------

    def export_image(self, volume: str, snap: str | int, path: str, fmt: str, nbd_socket: str,
                     overwrite: bool = False, progress: Progress | None = None
                     ) -> dict[str, Any]:
        """A snapshot to a raw or qcow2 file through its export on nbd_socket (a server's)."""
        from . import imagecopy
        return imagecopy.export_snapshot(self, volume, snap, path, fmt, nbd_socket, overwrite,
                                         progress)

    def import_image(self, path: str, name: str, fmt: str | None, nbd_socket: str,
                     encrypt: keys.Secret | None = None, progress: Progress | None = None
                     ) -> dict[str, Any]:
        """A new volume from a raw or qcow2 image, written through its export on nbd_socket."""
        from . import imagecopy
        return imagecopy.import_volume(self, path, name, fmt, nbd_socket, encrypt, progress)

    # ---- send / receive (issue 13: sendrecv.py, the stream format in stream.py) ------------

    def send_stream(self, volume: str, snap: str | int, out: Any, base: str | int | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
        from . import sendrecv
        return sendrecv.send(self, volume, snap, out, base, progress)

    def receive_stream(self, volume: str, src: Any, force: bool = False,
                       progress: Progress | None = None, reserve: Any = None) -> dict[str, Any]:
        from . import sendrecv
        return sendrecv.receive(self, volume, src, force, progress, reserve)

    def _recover_receives(self) -> None:
        from . import sendrecv
        sendrecv.recover(self)
    # ---- backups to S3-compatible object storage (backup.py, backup_restore.py) -------------

    def backup(self, volume: str, snap: str | int, url: str, endpoint: str | None = None,
               credentials: dict[str, Any] | None = None, resume: bool = False,
               progress: Progress | None = None, cancel: Cancel | None = None
               ) -> dict[str, Any]:
        from . import backup
        return backup.backup(self, volume, snap, url, endpoint, credentials, resume, progress,
                             cancel)

    def restore_backup(self, url: str, volume: str, snap: str, new_name: str,
                       endpoint: str | None = None, credentials: dict[str, Any] | None = None,
                       progress: Progress | None = None, cancel: Cancel | None = None
                       ) -> dict[str, Any]:
        from . import backup_restore
        return backup_restore.restore(self, url, volume, snap, new_name, endpoint, credentials,
                                      progress, cancel)

    def backup_verify(self, url: str, volume: str, snap: str, endpoint: str | None = None,
                      credentials: dict[str, Any] | None = None,
                      progress: Progress | None = None, cancel: Cancel | None = None
                      ) -> dict[str, Any]:
        from . import backup
        return backup.verify(url, volume, snap, endpoint, credentials, progress, cancel)

    def backup_prune(self, url: str, keep_last: int | None = None,
                     keep_days: float | None = None, endpoint: str | None = None,
                     credentials: dict[str, Any] | None = None,
                     progress: Progress | None = None, cancel: Cancel | None = None
                     ) -> dict[str, Any]:
        from . import backup
        return backup.prune(url, keep_last, keep_days, endpoint, credentials, progress, cancel)
