"""Snapshots: create (with quotas), delete, rollback and clone; the home of retention next.

Create and clone are one LMDB write transaction each, so a crash or a cancel leaves all of it
or none.  Delete and rollback commit a mark, then walk in bounded chunks (bulk.py: resumable,
finished at open).  Those that change what the hot path may do hold the I/O gate exclusively
for their O(1) transaction only.  The long ones report progress as progress(done, total) in map
records (delete: the total is the window's block count, an upper bound) or chunks (clone), and
check `cancel()` between units: see each one for what a cancel leaves.  Freed blocks are
punched after each commit (volume.DataPath.punch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from . import bulk, capacity, catalog, encryption, errors, extmap, layout
from ._xm import lib
from .catalog import KINDS, SnapshotInfo, SnapshotRecord, VolState, VolumeRecord
from .layout import BLOCK_SIZE, DB_LIVEBIRTH
from .native import NativeStore, Txn
from .store import StoreConfig
from .volume import PUNCH_BULK_MIN_BLOCKS, DataPath, Freed, configure

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


class Steps:
    """progress(done, total) every `every` units and at the end; Cancelled when cancel()."""

    def __init__(self, total: int, progress: Progress | None, cancel: Cancel | None,
                 every: int = 1024):
        self.total, self.done = total, 0
        self._progress, self._cancel, self._every = progress, cancel, every
        self._next = every

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self._next:
            self._next = self.done + self._every
            self.tick()

    def tick(self) -> None:
        if self._cancel is not None and self._cancel():
            raise errors.Cancelled("cancelled: nothing was changed")
        if self._progress is not None:
            self._progress(min(self.done, self.total), self.total)

    def finish(self) -> None:
        self.done = self.total
        self.tick()


def quota_of(config: StoreConfig, volume_extra: dict[str, Any], kind: str) -> int:
    """A volume's quota of manual or automatic snapshots: its own (`volume set`), else the
    store's (`config set`)."""
    own = volume_extra.get(f"{kind}_quota")
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    return config.manual_snapshot_quota if kind == "manual" else config.auto_snapshot_quota


class Snapshots:
    def __init__(self, native: NativeStore, config: StoreConfig, io: DataPath):
        self.native = native
        self.config = config
        self.io = io
        self.bulk = bulk.Bulk(native, io)

    def create(self, volume: str, name: str | None = None, kind: str = "manual",
               policy: str | None = None, slot: str | None = None,
               expires: float | None = None) -> SnapshotInfo:
        """Snapshot the live view: O(1), whatever the volume holds.  It holds every write that
        completed before it and none that starts after it (the gate waits for in-flight I/O).
        An automatic one (the scheduler's, policies.py) records its slot and expiry."""
        if kind not in KINDS:
            raise errors.InvalidArgument(f"snapshot kind must be one of {KINDS}, not {kind!r}")
        if name is not None:
            catalog.check_name(name, "snapshot")
        freed: Freed = []
        # the punch guard (native.punch_hold) for what a replaced automatic snapshot frees:
        # taken inside the gate, from before the commit to after the punch
        with contextlib.ExitStack() as guard:
            t0 = time.perf_counter()
            # Until snap_end the committer starts no batch and stops the one in progress early, so
            # neither the transaction nor its sync waits behind (or flushes) a batch's pages.
            lib.xm_batch_snap_begin(self.native.ptr)
            try:
                ta = time.perf_counter()  # the batch wait
                with self.native.gate_exclusive():
                    guard.enter_context(self.native.punch_hold())
                    t1 = time.perf_counter()  # the gate wait; then one transaction with the
                    # snapshot's own records only: the group-commit overlay survives it (its
                    # entries keep their birth; docs/design.md "Group commit"), and its durability
                    # point waits until the gate is open again (I/O after it needs it visible)
                    t = self.native.txn(write=True)
                    t.deferred = True  # (an attribute: test_work's counting wrapper takes write only)
                    with t:
                        vol = catalog.vol_id(t, volume)
                        _refuse_busy(t, vol, volume)
                        vs = catalog.state(t, vol)
                        rec = catalog.vol_record(t, vol)
                        self._enforce_quota(t, vs, rec, kind, freed)
                        epoch = vs.epoch
                        name = name or f"snap-{epoch}"
                        if catalog.snap_name_taken(t, vol, name):
                            raise errors.AlreadyExists(
                                f"volume {volume!r} has a snapshot named {name!r}")
                        # the pending entries survive the snapshot: the holes they fill count
                        referenced = vs.live_blocks + lib.xm_batch_vol_growth(self.native.ptr, vol)
                        snap = SnapshotRecord(name, time.time(), kind, policy, vs.size_bytes,
                                              referenced, slot, expires)
                        catalog.add_snapshot(t, vol, epoch, snap)
                        rec.add(kind, 1)
                        catalog.put_vol_record(t, vol, rec)
                        vs.epoch += 1
                        vs.max_snap = epoch
                        vs.nsnaps += 1
                        vs.save(t)
                    t2 = time.perf_counter()
                    configure(self.native, vs)
                self.native.env_sync()  # durable before the reply, and before punching its frees
                t3 = time.perf_counter()
            finally:
                lib.xm_batch_snap_end(self.native.ptr)
            self.io.punch(freed, PUNCH_BULK_MIN_BLOCKS)
        return SnapshotInfo(volume, epoch, name, snap.created, kind, policy, vs.size_bytes,
                            snap.referenced_blocks * BLOCK_SIZE, slot=slot, expires=expires,
                            gate_wait_ms=round((t1 - ta) * 1000, 3),
                            commit_ms=round((t2 - t1) * 1000, 3),
                            batch_wait_ms=round((ta - t0) * 1000, 3),
                            sync_ms=round((t3 - t2) * 1000, 3))

    def _enforce_quota(self, t: Txn, vs: VolState, rec: VolumeRecord, kind: str,
                       freed: Freed) -> None:
        quota = quota_of(self.config, rec.extra, kind)
        if rec.count(kind) < quota:
            return
        if kind == "manual":
            raise errors.QuotaExceeded(
                f"volume {rec.name!r} has {rec.snapshots_manual} manual snapshots, "
                f"the quota is {quota}: delete one first, or raise it with `snapdisk volume "
                f"set {rec.name} --manual-quota N` (or `snapdisk config set "
                "manual-snapshot-quota N` for every volume)")
        # An automatic snapshot past the quota replaces the oldest automatic one.
        for epoch in catalog.snap_epochs(t, vs.vol):
            if catalog.snap_record(t, vs.vol, epoch).kind == "auto":
                self._delete_locked(t, vs, rec, epoch, freed, Steps(0, None, None))
                if rec.snapshots_auto < quota:
                    return

    def delete(self, volume: str, snap: str | int, progress: Progress | None = None,
               cancel: Cancel | None = None) -> None:
        """Delete a snapshot: frees exactly the blocks nothing else holds; clones made from it
        keep theirs (their records hold the blocks too).  One mark transaction drops the
        snapshot (its name is free at once), then the dead-list walk runs in bounded chunks
        (bulk.py); a cancel stops between chunks and the rest is finished by the next bulk
        operation or the next open."""
        steps = Steps(0, progress, cancel, every=1)
        with self.native.txn(write=True) as t:
            vol = catalog.vol_id(t, volume)
            _refuse_busy(t, vol, volume)
            vs = catalog.state(t, vol)
            rec = catalog.vol_record(t, vol)
            epoch = catalog.snap_epoch(t, vol, snap)
            cancel_point(cancel)  # a cancel before the mark changes nothing
            window = self._unlist(t, vs, rec, epoch)
            steps.total = extmap.counted_blocks(t, vol, *window)
            items = [bulk.mark(t, {"op": "drop_window", "vol": vol, "window": window})]
            if vs.nsnaps == 0 and vs.flags & layout.VS_BIRTH_INDEXED:
                # No rollback target is left: the birth index goes too (in chunks; the flag is
                # cleared when it is empty).
                items.append(bulk.mark(t, {"op": "unindex", "vol": vol, "birth_hi": vs.epoch}))
            vs.save(t)
        # Lowering max_snap only lets more writes go in place; tell the hot path under the gate.
        with self.native.gate_exclusive():
            configure(self.native, vs)
        self._walk(items, steps, "the snapshot is deleted; the rest of its space")

    def _walk(self, items: list[bulk.Item], steps: Steps, what: str) -> None:
        try:
            for item in items:
                self.bulk.run(item, steps.step)
        except errors.Cancelled:
            raise errors.Cancelled(
                f"cancelled after {steps.done} records: {what} is released by the next bulk "
                "operation or the next open") from None
        steps.finish()
        self.bulk.finish_all(blocking=False)  # leftovers of a cancelled walk

    def _unlist(self, t: Txn, vs: VolState, rec: VolumeRecord, epoch: int) -> list[int]:
        """Drop snapshot epoch from the catalog; returns its window (death_lo, death_hi,
        birth_lo, birth_hi): the dead records only it needed."""
        epochs = catalog.snap_epochs(t, vs.vol)
        prev, nxt = capacity.neighbours(epochs, epochs.index(epoch))
        snap = catalog.snap_record(t, vs.vol, epoch)
        catalog.drop_snapshot(t, vs.vol, epoch, snap)
        rec.add(snap.kind, -1)
        catalog.put_vol_record(t, vs.vol, rec)
        vs.nsnaps -= 1
        remaining = [e for e in epochs if e != epoch]
        vs.max_snap = remaining[-1] if remaining else 0
        return [epoch + 1, nxt, prev + 1, epoch]

    def _delete_locked(self, t: Txn, vs: VolState, rec: VolumeRecord, epoch: int, freed: Freed,
                       steps: Steps) -> None:
        """The whole delete inside the caller's transaction (the automatic quota's, in create):
        the Python walk, unbounded."""
        window = self._unlist(t, vs, rec, epoch)
        steps.total = bulk.py_drop_window(t, vs.vol, window, 1 << 62, freed)
        steps.finish()
        if vs.nsnaps == 0 and vs.flags & layout.VS_BIRTH_INDEXED:
            t.delete_prefix(DB_LIVEBIRTH, layout.vol_key(vs.vol))  # no rollback target is left
            vs.flags &= ~layout.VS_BIRTH_INDEXED
        vs.save(t)

    def rollback(self, volume: str, snap: str | int, progress: Progress | None = None,
                 cancel: Cancel | None = None) -> None:
        """Make the live view equal to the snapshot's again; every snapshot, earlier and later,
        stays.  Costs O(blocks changed since the snapshot).  The mark makes the volume unknown
        to the hot path (its I/O is refused) until the last chunk; a cancel is honoured only
        before the mark (a half-restored volume is of no use), and open finishes a rollback a
        crash interrupted."""
        with self.native.gate_exclusive():
            with self.native.txn(write=True) as t:
                vol = catalog.vol_id(t, volume)
                _refuse_busy(t, vol, volume)
                epoch = catalog.snap_epoch(t, vol, snap)
                cancel_point(cancel)
                item = bulk.mark(t, {"op": "rollback", "vol": vol, "epoch": epoch, "pos": 0})
            self.native.vol_forget(vol)
        steps = Steps(0, progress, None, every=1)
        self.bulk.run(item, steps.step, lambda n: setattr(steps, "total", n))
        steps.finish()

    def clone(self, volume: str, snap: str | int, new_name: str,
              progress: Progress | None = None, cancel: Cancel | None = None) -> int:
        """A new volume whose content is the snapshot's, sharing its blocks: O(metadata of the
        snapshot), no data copied.  Returns the new volume's id.  The mark creates the volume
        (listed at once, its I/O refused and its snapshot operations Busy until the copy
        ends); the copy runs in steps of 64 Ki blocks, one transaction each, and open finishes
        a copy a crash interrupted.  A cancel is honoured before the mark only."""
        catalog.check_name(new_name, "volume")
        with self.native.txn(write=True) as t:
            vol = catalog.vol_id(t, volume)
            _refuse_busy(t, vol, volume)
            epoch = catalog.snap_epoch(t, vol, snap)
            srec = catalog.snap_record(t, vol, epoch)
            origin: dict[str, Any] = {"volume": volume, "volume_id": vol, "snapshot": srec.name,
                                      "snapshot_id": epoch}
            cancel_point(cancel)
            vs = catalog.new_volume(t, new_name, srec.size_bytes, origin, {})
            encryption.inherit(t, vol, vs)  # an encrypted volume's clone shares its key
            vs.save(t)
            item = bulk.mark(t, {"op": "clone", "vol": vs.vol, "src": vol, "epoch": epoch})
        nblocks = -(-srec.size_bytes // BLOCK_SIZE)
        steps = Steps(-(-nblocks // bulk.CLONE_STEP), progress, None, every=1)
        self.bulk.run(item, lambda n: steps.step())
        steps.finish()
        return vs.vol


def cancel_point(cancel: Cancel | None) -> None:
    """Cancelled if cancel() says so: only the cancel check (no progress call, which may do
    I/O), so it is safe inside a transaction."""
    if cancel is not None and cancel():
        raise errors.Cancelled("cancelled: nothing was changed")


def _refuse_busy(t: Txn, vol: int, volume: str) -> None:
    if bulk.busy_volume(t, vol):
        raise errors.Busy(f"volume {volume!r} is being rolled back or cloned: try again when "
                          "that ends")
