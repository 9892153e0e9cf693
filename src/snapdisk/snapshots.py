"""Snapshots: create (with quotas), delete, rollback and clone; the home of retention next.

Each operation is one LMDB write transaction, so a crash or a cancel leaves all of it or none.
Those that change what the hot path may do (create, rollback) hold the I/O gate exclusively
for their transaction; delete lowers the newest snapshot only, so it takes the gate just to
tell the hot path.  The long ones (delete, rollback, clone) report progress as
progress(done, total) in units of map records or chunks, and check `cancel()` between units:
a cancel raises errors.Cancelled inside the transaction, which is then aborted (nothing
changed).  Freed blocks are punched after the commit (volume.DataPath.punch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import allocator, capacity, catalog, errors, extmap, layout
from .catalog import KINDS, SnapshotInfo, SnapshotRecord, VolState, VolumeRecord
from .layout import BLOCK_SIZE, DB_LIVE, DB_LIVEBIRTH, F_SHARED, INFINITY, MAX_EXTENT
from .native import Extent, NativeStore, Txn
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


class Snapshots:
    def __init__(self, native: NativeStore, config: StoreConfig, io: DataPath):
        self.native = native
        self.config = config
        self.io = io

    def create(self, volume: str, name: str | None = None, kind: str = "manual",
               policy: str | None = None) -> SnapshotInfo:
        """Snapshot the live view: O(1), whatever the volume holds.  It holds every write that
        completed before it and none that starts after it (the gate waits for in-flight I/O)."""
        if kind not in KINDS:
            raise errors.InvalidArgument(f"snapshot kind must be one of {KINDS}, not {kind!r}")
        if name is not None:
            catalog.check_name(name, "snapshot")
        freed: Freed = []
        t0 = time.perf_counter()
        with self.native.gate_exclusive():
            t1 = time.perf_counter()  # the gate wait; then one synced transaction that also
            with self.native.txn(write=True) as t:  # applies the group-commit overlay
                vol = catalog.vol_id(t, volume)
                vs = catalog.state(t, vol)
                rec = catalog.vol_record(t, vol)
                self._enforce_quota(t, vs, rec, kind, freed)
                epoch = vs.epoch
                name = name or f"snap-{epoch}"
                if catalog.snap_name_taken(t, vol, name):
                    raise errors.AlreadyExists(f"volume {volume!r} has a snapshot named {name!r}")
                snap = SnapshotRecord(name, time.time(), kind, policy, vs.size_bytes,
                                      vs.live_blocks)
                catalog.add_snapshot(t, vol, epoch, snap)
                rec.add(kind, 1)
                catalog.put_vol_record(t, vol, rec)
                vs.epoch += 1
                vs.max_snap = epoch
                vs.nsnaps += 1
                vs.save(t)
            t2 = time.perf_counter()
            configure(self.native, vs)
        self.io.punch(freed, PUNCH_BULK_MIN_BLOCKS)
        return SnapshotInfo(volume, epoch, name, snap.created, kind, policy, vs.size_bytes,
                            snap.referenced_blocks * BLOCK_SIZE,
                            gate_wait_ms=round((t1 - t0) * 1000, 3),
                            commit_ms=round((t2 - t1) * 1000, 3))

    def _enforce_quota(self, t: Txn, vs: VolState, rec: VolumeRecord, kind: str,
                       freed: Freed) -> None:
        quota = (self.config.manual_snapshot_quota if kind == "manual"
                 else self.config.auto_snapshot_quota)
        if rec.count(kind) < quota:
            return
        if kind == "manual":
            raise errors.QuotaExceeded(
                f"volume {rec.name!r} has {rec.snapshots_manual} manual snapshots, "
                f"the quota is {quota}: delete one first")
        # An automatic snapshot past the quota replaces the oldest automatic one.
        for epoch in catalog.snap_epochs(t, vs.vol):
            if catalog.snap_record(t, vs.vol, epoch).kind == "auto":
                self._delete_locked(t, vs, rec, epoch, freed, Steps(0, None, None))
                if rec.snapshots_auto < quota:
                    return

    def delete(self, volume: str, snap: str | int, progress: Progress | None = None,
               cancel: Cancel | None = None) -> None:
        """Delete a snapshot: frees exactly the blocks nothing else holds; clones made from it
        keep theirs (their records hold the blocks too)."""
        freed: Freed = []
        with self.native.txn(write=True) as t:
            vol = catalog.vol_id(t, volume)
            vs = catalog.state(t, vol)
            rec = catalog.vol_record(t, vol)
            self._delete_locked(t, vs, rec, catalog.snap_epoch(t, vol, snap), freed,
                                Steps(0, progress, cancel))
        # Lowering max_snap only lets more writes go in place; tell the hot path under the gate.
        with self.native.gate_exclusive():
            configure(self.native, vs)
        self.io.punch(freed, PUNCH_BULK_MIN_BLOCKS)

    def _delete_locked(self, t: Txn, vs: VolState, rec: VolumeRecord, epoch: int, freed: Freed,
                       steps: Steps) -> None:
        epochs = catalog.snap_epochs(t, vs.vol)
        i = epochs.index(epoch)
        prev, nxt = capacity.neighbours(epochs, i)
        window = extmap.window(t, vs.vol, epoch + 1, nxt, prev + 1, epoch)
        steps.total = len(window)
        for death, birth, lba, _ in window:
            e = extmap.drop_dead(t, vs.vol, lba, birth, death)
            allocator.release(t, e.pbn, e.len, freed)
            steps.step()
        steps.finish()
        snap = catalog.snap_record(t, vs.vol, epoch)
        catalog.drop_snapshot(t, vs.vol, epoch, snap)
        rec.add(snap.kind, -1)
        catalog.put_vol_record(t, vs.vol, rec)
        vs.nsnaps -= 1
        remaining = [e for e in epochs if e != epoch]
        vs.max_snap = remaining[-1] if remaining else 0
        if vs.nsnaps == 0 and vs.flags & layout.VS_BIRTH_INDEXED:
            t.delete_prefix(DB_LIVEBIRTH, layout.vol_key(vs.vol))  # no rollback target is left
            vs.flags &= ~layout.VS_BIRTH_INDEXED
        vs.save(t)

    def rollback(self, volume: str, snap: str | int, progress: Progress | None = None,
                 cancel: Cancel | None = None) -> None:
        """Make the live view equal to the snapshot's again; every snapshot, earlier and later,
        stays.  Costs O(blocks changed since the snapshot)."""
        freed: Freed = []
        with self.native.gate_exclusive():
            with self.native.txn(write=True) as t:
                vol = catalog.vol_id(t, volume)
                vs = catalog.state(t, vol)
                epoch = catalog.snap_epoch(t, vol, snap)
                # What differs from the snapshot: live records born after it, and the
                # snapshot's records that have died since (they are exactly what to restore:
                # no live record born by then overlaps a range that changed).
                targets = [extmap.dead_record(t, vol, lba, birth) for _, birth, lba, _
                           in extmap.window(t, vol, epoch + 1, INFINITY, 0, epoch)]
                ranges = list(extmap.live_ranges_born_after(t, vs, epoch))
                ranges += [(e.lba, e.lba + e.len) for e in targets]
                merged = extmap.merge_ranges(ranges)
                steps = Steps(len(merged) + len(targets), progress, cancel)
                for a, b in merged:
                    extmap.holes_over(t, vs, a, b, freed)
                    steps.step()
                targets.sort()
                for k in range(0, len(targets), 256):
                    extmap.copy_in(t, vs, targets[k:k + 256], vs.epoch)
                    steps.step(len(targets[k:k + 256]))
                steps.finish()
                vs.size_bytes = catalog.snap_record(t, vol, epoch).size_bytes
                vs.save(t)
            configure(self.native, vs)
        self.io.punch(freed, PUNCH_BULK_MIN_BLOCKS)

    def clone(self, volume: str, snap: str | int, new_name: str,
              progress: Progress | None = None, cancel: Cancel | None = None) -> int:
        """A new volume whose content is the snapshot's, sharing its blocks: O(metadata of the
        snapshot), no data copied.  Returns the new volume's id."""
        catalog.check_name(new_name, "volume")
        with self.native.txn(write=True) as t:
            vol = catalog.vol_id(t, volume)
            src = catalog.state(t, vol)
            epoch = catalog.snap_epoch(t, vol, snap)
            srec = catalog.snap_record(t, vol, epoch)
            origin: dict[str, Any] = {"volume": volume, "volume_id": vol, "snapshot": srec.name,
                                      "snapshot_id": epoch}
            vs = catalog.new_volume(t, new_name, srec.size_bytes, origin, {})
            nblocks = -(-srec.size_bytes // BLOCK_SIZE)
            step = 64 * MAX_EXTENT
            steps = Steps(-(-nblocks // step), progress, cancel, every=1)
            for lo in range(0, nblocks, step):
                hi = min(lo + step, nblocks)
                recs = extmap.view_at(t, vol, epoch, lo, hi)
                _mark_live_shared(t, src, recs)
                extmap.copy_in(t, vs, extmap.clip(recs, lo, hi), 1)
                steps.step()
            steps.finish()
            src.flags |= layout.VS_SHARED
            src.save(t)
            vs.save(t)
        with self.native.gate_exclusive():
            configure(self.native, vs)
        return vs.vol


def _mark_live_shared(t: Txn, vs: VolState, recs: list[Extent]) -> None:
    """Source records still live get SHARED, so no later write (even once the snapshot is
    gone and they look unshared by birth) rewrites them in place under the clone."""
    for e in recs:
        if e.flags & F_SHARED:
            continue
        raw = t.get(DB_LIVE, layout.live_key(vs.vol, e.lba))
        if raw is not None and layout.decode_rec(raw) == (e.len, e.flags, e.pbn, e.birth):
            extmap.put_live(t, vs, e._replace(flags=e.flags | F_SHARED))
