"""The volume engine: volumes, snapshots, rollback, clones, capacity, and the I/O of each.

This is the API the NBD plugin, the control server and the CLI call.  It keeps no state of its
own beyond the open store: everything is read from LMDB inside the transaction that uses it.

Concurrency (nbdkit calls in from many threads, the control server from others):
  * Live reads and in-place writes are one C call each (xm_read / xm_write_fast), which takes the
    I/O gate shared and releases the GIL.
  * Everything that changes the map runs in one LMDB write transaction, begun and committed on
    the calling thread (LMDB's rule); LMDB lets one run at a time, so these calls serialize
    there, and readers never wait for them (MVCC).
  * Operations that change what the hot path may do (snapshot create, rollback, resize, volume
    delete) and the reuse of freed blocks close the gate: they wait for in-flight I/O, do an
    O(1) change (or, for rollback, O(changed)), and open it.  Order is always gate, then
    transaction, so the two cannot deadlock; code holding the gate never calls back into a
    gated entry point (the gate is not recursive).
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from . import allocator, errors, extmap
from .extmap import INFINITY, VS_SHARED, VolState
from .native import (
    BLOCK_SIZE,
    DB_COUNTERS,
    DB_DEAD,
    DB_DEADIDX,
    DB_LIVE,
    DB_LIVEBIRTH,
    DB_META,
    DB_NAMES,
    DB_SNAPS,
    DB_VOLSTATE,
    DB_VOLUMES,
    F_SHARED,
    HOLE,
    MAX_EXTENT,
    Extent,
    Txn,
)
from .pool import Pool
from .store import StoreConfig, StoreDir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
SNAP_KEY = struct.Struct(">IQ")
U32_BE = struct.Struct(">I")
U32 = struct.Struct("<I")
KINDS = ("manual", "auto")
MAX_VOLUME_BYTES = 1 << 50
PUNCH_BULK_MIN_BLOCKS = 256  # 1 MiB: see Engine._punch


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise errors.InvalidName(f"invalid {what} name {name!r}: {NAME_RULE}")


def check_size(size_bytes: int) -> None:
    if not isinstance(size_bytes, int) or size_bytes <= 0 or size_bytes % 512:
        raise errors.InvalidSize(f"invalid size {size_bytes!r}: a positive multiple of 512 bytes")
    if size_bytes > MAX_VOLUME_BYTES:
        raise errors.InvalidSize(f"invalid size {size_bytes}: at most {MAX_VOLUME_BYTES} bytes")


@dataclass
class SnapshotInfo:
    volume: str
    id: int
    name: str
    created: float
    kind: str
    policy: str | None
    size_bytes: int
    referenced_bytes: int
    exclusive_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VolumeInfo:
    id: int
    name: str
    size_bytes: int
    created: float
    origin: dict[str, Any] | None
    live_bytes: int
    snapshots: int
    snapshots_manual: int
    snapshots_auto: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine:
    """An open store.  Create with Engine.create(path) or Engine.open(path); close() at the end."""

    def __init__(self, sd: StoreDir):
        self.sd = sd
        self.native = sd.native
        self.pool = Pool(sd.native)
        # SNAPDISK_WRITE_PATH=python sends every redirected write through the Python twin of
        # xm_write, so the model test can check both.
        self._c_redirect = os.environ.get("SNAPDISK_WRITE_PATH") != "python"
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
            self.sd.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self.sd.path

    def _recover(self) -> None:
        """After open: nothing else runs yet, so every pending block can be reused, and the hot
        path learns the volumes."""
        with self.native.txn(write=True) as t:
            allocator.release_pending(t)
            states = [VolState(U32_BE.unpack(k)[0], *VolState.FMT.unpack(v))
                      for k, v in t.scan(DB_VOLSTATE, b"")]
        for vs in states:
            self._configure(vs)

    def _configure(self, vs: VolState) -> None:
        """Tell the hot path about vs.  Call with the gate closed: the table may be resized."""
        self.native.vol_config(vs.vol, vs.size_bytes, vs.max_snap, True)

    def _configure_gated(self, vs: VolState) -> None:
        self.native.gate_close()
        try:
            self._configure(vs)
        finally:
            self.native.gate_open()

    # ---- lookups ----------------------------------------------------------------------------

    def _vol_id(self, t: Txn, name: str) -> int:
        raw = t.get(DB_NAMES, b"v" + name.encode())
        if raw is None:
            raise errors.VolumeNotFound(f"no volume named {name!r}")
        return int(U32_BE.unpack(raw)[0])

    def _state(self, t: Txn, vol: int) -> VolState:
        vs = VolState.load(t, vol)
        if vs is None:
            raise errors.VolumeNotFound(f"no volume with id {vol}")
        return vs

    def _vol_meta(self, t: Txn, vol: int) -> dict[str, Any]:
        raw = t.get(DB_VOLUMES, U32_BE.pack(vol))
        if raw is None:
            raise errors.VolumeNotFound(f"no volume with id {vol}")
        meta: dict[str, Any] = json.loads(raw)
        return meta

    def _snap_epoch(self, t: Txn, vol: int, snap: str | int) -> int:
        """A snapshot by name, or by id (an int, or a string of digits that is no name)."""
        if isinstance(snap, str):
            raw = t.get(DB_NAMES, b"s" + U32_BE.pack(vol) + snap.encode())
            if raw is not None:
                return int(struct.unpack(">Q", raw)[0])
            if not snap.isdigit():
                raise errors.SnapshotNotFound(f"no snapshot named {snap!r}")
            snap = int(snap)
        if t.get(DB_SNAPS, SNAP_KEY.pack(vol, snap)) is None:
            raise errors.SnapshotNotFound(f"no snapshot with id {snap}")
        return snap

    def _snap_meta(self, t: Txn, vol: int, epoch: int) -> dict[str, Any]:
        raw = t.get(DB_SNAPS, SNAP_KEY.pack(vol, epoch))
        if raw is None:
            raise errors.SnapshotNotFound(f"no snapshot with id {epoch}")
        meta: dict[str, Any] = json.loads(raw)
        return meta

    def _snap_epochs(self, t: Txn, vol: int) -> list[int]:
        return [SNAP_KEY.unpack(k)[1] for k, _ in t.scan_prefix(DB_SNAPS, U32_BE.pack(vol))]

    def volume_id(self, name: str) -> int:
        with self.native.txn() as t:
            return self._vol_id(t, name)

    def snapshot_id(self, volume: str, snap: str | int) -> int:
        with self.native.txn() as t:
            return self._snap_epoch(t, self._vol_id(t, volume), snap)

    # ---- volumes ----------------------------------------------------------------------------

    def create_volume(self, name: str, size_bytes: int, extra: dict[str, Any] | None = None
                      ) -> VolumeInfo:
        check_name(name, "volume")
        check_size(size_bytes)
        with self.native.txn(write=True) as t:
            vs = self._new_volume(t, name, size_bytes, None, extra or {})
        self._configure_gated(vs)
        return self.volume_info(name)

    def _new_volume(self, t: Txn, name: str, size_bytes: int, origin: dict[str, Any] | None,
                    extra: dict[str, Any]) -> VolState:
        if t.get(DB_NAMES, b"v" + name.encode()) is not None:
            raise errors.AlreadyExists(f"a volume named {name!r} exists")
        vol = U32.unpack(t.get(DB_META, b"next_vol") or U32.pack(1))[0]
        t.put(DB_META, b"next_vol", U32.pack(vol + 1))
        meta = {"name": name, "created": time.time(), "origin": origin,
                "snapshots_manual": 0, "snapshots_auto": 0, **extra}
        t.put(DB_VOLUMES, U32_BE.pack(vol), json.dumps(meta).encode())
        t.put(DB_NAMES, b"v" + name.encode(), U32_BE.pack(vol))
        vs = VolState(vol, size_bytes, epoch=1, max_snap=0, live_blocks=0, nsnaps=0)
        vs.save(t)
        return vs

    def _info(self, t: Txn, vol: int) -> VolumeInfo:
        vs = self._state(t, vol)
        meta = self._vol_meta(t, vol)
        known = {"name", "created", "origin", "snapshots_manual", "snapshots_auto"}
        return VolumeInfo(vol, meta["name"], vs.size_bytes, meta["created"], meta.get("origin"),
                          vs.live_blocks * BLOCK_SIZE, vs.nsnaps, meta["snapshots_manual"],
                          meta["snapshots_auto"], {k: v for k, v in meta.items() if k not in known})

    def volume_info(self, name: str) -> VolumeInfo:
        with self.native.txn() as t:
            return self._info(t, self._vol_id(t, name))

    def list_volumes(self) -> list[VolumeInfo]:
        with self.native.txn() as t:
            ids = [U32_BE.unpack(k)[0] for k, _ in t.scan(DB_VOLSTATE, b"")]
            return sorted((self._info(t, v) for v in ids), key=lambda i: i.name)

    def resize_volume(self, name: str, size_bytes: int) -> VolumeInfo:
        check_size(size_bytes)
        self.native.gate_close()
        try:
            with self.native.txn(write=True) as t:
                vs = self._state(t, self._vol_id(t, name))
                if size_bytes < vs.size_bytes:
                    raise errors.InvalidSize(
                        f"volume {name!r} is {vs.size_bytes} bytes: shrinking to {size_bytes} "
                        "would drop data and is not supported")
                vs.size_bytes = size_bytes
                vs.save(t)
            self._configure(vs)
        finally:
            self.native.gate_open()
        return self.volume_info(name)

    def delete_volume(self, name: str) -> None:
        freed: list[tuple[int, int]] = []
        self.native.gate_close()
        try:
            with self.native.txn(write=True) as t:
                vol = self._vol_id(t, name)
                prefix = U32_BE.pack(vol)
                held = [extmap.REC.unpack(v) for _, v in t.scan_prefix(DB_LIVE, prefix)]
                held += [extmap.REC.unpack(v) for _, v in t.scan_prefix(DB_DEAD, prefix)]
                for length, _, pbn, _ in held:
                    allocator.release(t, pbn, length, freed)
                for db in (DB_LIVE, DB_LIVEBIRTH, DB_DEAD, DB_DEADIDX, DB_COUNTERS, DB_SNAPS):
                    t.delete_prefix(db, prefix)
                t.delete_prefix(DB_NAMES, b"s" + prefix)
                t.delete(DB_NAMES, b"v" + name.encode())
                t.delete(DB_VOLUMES, prefix)
                t.delete(DB_VOLSTATE, prefix)
            self.native.vol_forget(vol)
        finally:
            self.native.gate_open()
        self._punch(freed, PUNCH_BULK_MIN_BLOCKS)

    # ---- snapshots --------------------------------------------------------------------------

    def create_snapshot(self, volume: str, name: str | None = None, kind: str = "manual",
                        policy: str | None = None) -> SnapshotInfo:
        """Snapshot the live view: O(1), whatever the volume holds.  It holds every write that
        completed before it and none that starts after it (the gate waits for in-flight I/O)."""
        if kind not in KINDS:
            raise errors.InvalidArgument(f"snapshot kind must be one of {KINDS}, not {kind!r}")
        if name is not None:
            check_name(name, "snapshot")
        freed: list[tuple[int, int]] = []
        self.native.gate_close()
        try:
            with self.native.txn(write=True) as t:
                vol = self._vol_id(t, volume)
                vs = self._state(t, vol)
                meta = self._vol_meta(t, vol)
                self._enforce_quota(t, vs, meta, kind, freed)
                epoch = vs.epoch
                name = name or f"snap-{epoch}"
                if t.get(DB_NAMES, b"s" + U32_BE.pack(vol) + name.encode()) is not None:
                    raise errors.AlreadyExists(f"volume {volume!r} has a snapshot named {name!r}")
                snap: dict[str, Any] = {"name": name, "created": time.time(), "kind": kind, "policy": policy,
                        "size_bytes": vs.size_bytes, "referenced_blocks": vs.live_blocks}
                t.put(DB_SNAPS, SNAP_KEY.pack(vol, epoch), json.dumps(snap).encode())
                t.put(DB_NAMES, b"s" + U32_BE.pack(vol) + name.encode(), struct.pack(">Q", epoch))
                meta[f"snapshots_{kind}"] += 1
                t.put(DB_VOLUMES, U32_BE.pack(vol), json.dumps(meta).encode())
                vs.epoch += 1
                vs.max_snap = epoch
                vs.nsnaps += 1
                vs.save(t)
            self._configure(vs)
        finally:
            self.native.gate_open()
        self._punch(freed, PUNCH_BULK_MIN_BLOCKS)
        return SnapshotInfo(volume, epoch, name, snap["created"], kind, policy, vs.size_bytes,
                            snap["referenced_blocks"] * BLOCK_SIZE)

    def _enforce_quota(self, t: Txn, vs: VolState, meta: dict[str, Any], kind: str,
                       freed: list[tuple[int, int]]) -> None:
        quota = (self.sd.config.manual_snapshot_quota if kind == "manual"
                 else self.sd.config.auto_snapshot_quota)
        if meta[f"snapshots_{kind}"] < quota:
            return
        if kind == "manual":
            raise errors.QuotaExceeded(
                f"volume {meta['name']!r} has {meta['snapshots_manual']} manual snapshots, "
                f"the quota is {quota}: delete one first")
        # An automatic snapshot past the quota replaces the oldest automatic one.
        for epoch in self._snap_epochs(t, vs.vol):
            if self._snap_meta(t, vs.vol, epoch)["kind"] == "auto":
                self._delete_snapshot_locked(t, vs, meta, epoch, freed)
                if meta["snapshots_auto"] < quota:
                    return

    def list_snapshots(self, volume: str, with_usage: bool = True) -> list[SnapshotInfo]:
        with self.native.txn() as t:
            vol = self._vol_id(t, volume)
            epochs = self._snap_epochs(t, vol)
            shared = extmap.has_shared_blocks(t)
            return [self._snapinfo(t, volume, vol, epochs, i, with_usage, shared)
                    for i in range(len(epochs))]

    def snapshot_info(self, volume: str, snap: str | int) -> SnapshotInfo:
        with self.native.txn() as t:
            vol = self._vol_id(t, volume)
            epoch = self._snap_epoch(t, vol, snap)
            epochs = self._snap_epochs(t, vol)
            return self._snapinfo(t, volume, vol, epochs, epochs.index(epoch), True,
                                  extmap.has_shared_blocks(t))

    def _snapinfo(self, t: Txn, volume: str, vol: int, epochs: list[int], i: int,
                  with_usage: bool, shared: bool) -> SnapshotInfo:
        epoch = epochs[i]
        m = self._snap_meta(t, vol, epoch)
        info = SnapshotInfo(volume, epoch, m["name"], m["created"], m["kind"], m.get("policy"),
                            m["size_bytes"], m["referenced_blocks"] * BLOCK_SIZE)
        if with_usage:
            info.exclusive_bytes = self._exclusive_blocks(t, vol, epochs, i, shared) * BLOCK_SIZE
        return info

    def _neighbours(self, epochs: list[int], i: int) -> tuple[int, int]:
        return (epochs[i - 1] if i > 0 else 0), (epochs[i + 1] if i + 1 < len(epochs) else INFINITY)

    def _exclusive_blocks(self, t: Txn, vol: int, epochs: list[int], i: int, shared: bool) -> int:
        """Blocks that deleting snapshot epochs[i] would free."""
        prev, nxt = self._neighbours(epochs, i)
        epoch = epochs[i]
        if not shared:
            return extmap.counted_blocks(t, vol, epoch + 1, nxt, prev + 1, epoch)
        # Blocks held by other records too (rollback, clones) would survive the delete.
        recs = extmap.window(t, vol, epoch + 1, nxt, prev + 1, epoch)
        return self._freed_if_dropped(t, vol, [(lba, birth) for _, birth, lba, _ in recs])

    def _freed_if_dropped(self, t: Txn, vol: int, dead: list[tuple[int, int]]) -> int:
        """Blocks freed if the dead records (lba, birth) of vol all went away."""
        freed = 0
        shared_holders: Counter[int] = Counter()
        shared_refs: dict[int, int] = {}
        for lba, birth in dead:
            raw = t.get(DB_DEAD, extmap.TRIPLE_KEY.pack(vol, lba, birth))
            assert raw is not None
            length, _, pbn, _ = extmap.REC.unpack(raw)
            for a, b, holders in allocator.refs_of(t, pbn, length):
                if holders == 1:
                    freed += b - a
                else:
                    for blk in range(a, b):
                        shared_holders[blk] += 1
                        shared_refs[blk] = holders
        return freed + sum(1 for blk, n in shared_holders.items() if n == shared_refs[blk])

    def delete_snapshot(self, volume: str, snap: str | int) -> None:
        """Delete a snapshot: frees exactly the blocks nothing else holds; clones made from it
        keep theirs (their records hold the blocks too)."""
        freed: list[tuple[int, int]] = []
        with self.native.txn(write=True) as t:
            vol = self._vol_id(t, volume)
            vs = self._state(t, vol)
            meta = self._vol_meta(t, vol)
            self._delete_snapshot_locked(t, vs, meta, self._snap_epoch(t, vol, snap), freed)
        # Lowering max_snap only lets more writes go in place; tell the hot path under the gate.
        self._configure_gated(vs)
        self._punch(freed, PUNCH_BULK_MIN_BLOCKS)

    def _delete_snapshot_locked(self, t: Txn, vs: VolState, meta: dict[str, Any], epoch: int,
                                freed: list[tuple[int, int]]) -> None:
        epochs = self._snap_epochs(t, vs.vol)
        i = epochs.index(epoch)
        prev, nxt = self._neighbours(epochs, i)
        for death, birth, lba, _ in extmap.window(t, vs.vol, epoch + 1, nxt, prev + 1, epoch):
            e = extmap.drop_dead(t, vs.vol, lba, birth, death)
            allocator.release(t, e.pbn, e.len, freed)
        snap = self._snap_meta(t, vs.vol, epoch)
        t.delete(DB_SNAPS, SNAP_KEY.pack(vs.vol, epoch))
        t.delete(DB_NAMES, b"s" + U32_BE.pack(vs.vol) + snap["name"].encode())
        meta[f"snapshots_{snap['kind']}"] -= 1
        t.put(DB_VOLUMES, U32_BE.pack(vs.vol), json.dumps(meta).encode())
        vs.nsnaps -= 1
        remaining = [e for e in epochs if e != epoch]
        vs.max_snap = remaining[-1] if remaining else 0
        if vs.nsnaps == 0 and vs.flags & extmap.VS_BIRTH_INDEXED:
            t.delete_prefix(DB_LIVEBIRTH, U32_BE.pack(vs.vol))  # no rollback target is left
            vs.flags &= ~extmap.VS_BIRTH_INDEXED
        vs.save(t)

    def rollback(self, volume: str, snap: str | int) -> None:
        """Make the live view equal to the snapshot's again; every snapshot, earlier and later,
        stays.  Costs O(blocks changed since the snapshot)."""
        freed: list[tuple[int, int]] = []
        self.native.gate_close()
        try:
            with self.native.txn(write=True) as t:
                vol = self._vol_id(t, volume)
                vs = self._state(t, vol)
                epoch = self._snap_epoch(t, vol, snap)
                # What differs from the snapshot: live records born after it, and the
                # snapshot's records that have died since (they are exactly what to restore:
                # no live record born by then overlaps a range that changed).
                targets = [extmap.dead_record(t, vol, lba, birth)
                           for _, birth, lba, _ in extmap.window(t, vol, epoch + 1, INFINITY, 0, epoch)]
                ranges = list(extmap.live_ranges_born_after(t, vs, epoch))
                ranges += [(e.lba, e.lba + e.len) for e in targets]
                for a, b in extmap.merge_ranges(ranges):
                    extmap.holes_over(t, vs, a, b, freed)
                extmap.copy_in(t, vs, sorted(targets), vs.epoch)
                vs.size_bytes = self._snap_meta(t, vol, epoch)["size_bytes"]
                vs.save(t)
            self._configure(vs)
        finally:
            self.native.gate_open()
        self._punch(freed, PUNCH_BULK_MIN_BLOCKS)

    def clone(self, volume: str, snap: str | int, new_name: str) -> VolumeInfo:
        """A new volume whose content is the snapshot's, sharing its blocks: O(metadata of the
        snapshot), no data copied."""
        check_name(new_name, "volume")
        with self.native.txn(write=True) as t:
            vol = self._vol_id(t, volume)
            src = self._state(t, vol)
            epoch = self._snap_epoch(t, vol, snap)
            smeta = self._snap_meta(t, vol, epoch)
            origin = {"volume": volume, "volume_id": vol, "snapshot": smeta["name"],
                      "snapshot_id": epoch}
            vs = self._new_volume(t, new_name, smeta["size_bytes"], origin, {})
            nblocks = -(-smeta["size_bytes"] // BLOCK_SIZE)
            step = 64 * MAX_EXTENT
            for lo in range(0, nblocks, step):
                hi = min(lo + step, nblocks)
                recs = extmap.view_at(t, vol, epoch, lo, hi)
                self._mark_live_shared(t, src, recs, epoch)
                extmap.copy_in(t, vs, extmap.clip(recs, lo, hi), 1)
            src.flags |= VS_SHARED
            src.save(t)
            vs.save(t)
        self._configure_gated(vs)
        return self.volume_info(new_name)

    def _mark_live_shared(self, t: Txn, vs: VolState, recs: list[Extent], epoch: int) -> None:
        """Source records still live get SHARED, so no later write (even once the snapshot is
        gone and they look unshared by birth) rewrites them in place under the clone."""
        for e in recs:
            if e.flags & F_SHARED:
                continue
            raw = t.get(DB_LIVE, extmap.LIVE_KEY.pack(vs.vol, e.lba))
            if raw is not None and extmap.REC.unpack(raw) == (e.len, e.flags, e.pbn, e.birth):
                extmap.put_live(t, vs, e._replace(flags=e.flags | F_SHARED))

    # ---- I/O --------------------------------------------------------------------------------

    def read(self, vol: int, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.native.read_into(vol, offset, buf)
        return bytes(buf)

    def read_into(self, vol: int, offset: int, buf: Any) -> None:
        self.native.read_into(vol, offset, buf)

    def live_io(self, vol: int) -> tuple[Callable[[int, Any], None],
                                         Callable[[int, Any, bool], None]]:
        """(read_into(offset, buf), write(offset, data, fua)) for vol's live view, bound once
        per NBD connection: per request they cost one Python call over the C call (the
        nbdkit Python plugin's whole budget is ~20 us a request; see nbd_plugin)."""
        read = functools.partial(self.native.read_into, vol)
        write_fast = functools.partial(self.native.write_inplace, vol)

        def write(offset: int, data: Any, fua: bool) -> None:
            if not write_fast(offset, data):
                self._write_moved(vol, offset, data)
            if fua:
                self.flush()

        return read, write

    def snapshot_reader(self, vol: int, epoch: int) -> Callable[[int, Any], None]:
        """read_into(offset, buf) for snapshot epoch of vol."""
        def read(offset: int, buf: Any) -> None:
            buf[:] = self.read_snapshot(vol, epoch, offset, len(buf))
        return read

    def write(self, vol: int, offset: int, data: Any, fua: bool = False) -> None:
        """In place (no map change, no LMDB writer lock) when possible; else redirect-on-write
        in C; else (shared blocks, a full pool) the general path in Python."""
        if not self.native.write_inplace(vol, offset, data):
            self._write_moved(vol, offset, data)
        if fua:
            self.flush()

    def _write_moved(self, vol: int, offset: int, data: Any) -> None:
        """The write the in-place path declined: redirect-on-write in C, else in Python."""
        if not self._c_redirect or not self.native.write_row(vol, offset, data):
            self._gated_write(vol, offset, data)

    def _gated_write(self, vol: int, offset: int, data: Any) -> None:
        for attempt in (0, 1):
            freed: list[tuple[int, int]] = []
            self.native.gate_enter()
            try:
                with self.native.txn(write=True) as t:
                    vs = self._state(t, vol)
                    self._check_io(vs, offset, len(data), write=True)
                    self._write_locked(t, vs, offset, memoryview(data).cast("B"), freed)
                    vs.save(t)
                return
            except errors.PoolFull:
                if attempt:
                    raise
            finally:
                self.native.gate_leave()
            if not self._reclaim():
                raise errors.PoolFull(f"pool full writing {len(data)} bytes")

    def _check_io(self, vs: VolState, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length < 0 or offset + length > vs.size_bytes:
            raise errors.OutOfRange(
                f"I/O at {offset}+{length} past the end of the volume ({vs.size_bytes} bytes)")

    def _write_locked(self, t: Txn, vs: VolState, offset: int, data: memoryview,
                      freed: list[tuple[int, int]]) -> None:
        """Write data at offset: in place where the blocks are the volume's own and newer than
        its newest snapshot, else redirect to new blocks.  Called with the gate held."""
        end = offset + len(data)
        lo, hi = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        redirect: list[tuple[int, int, Extent | None]] = []  # (block, block end, old record)
        for a, b, e in self._segments(t.live_overlap(vs.vol, lo, hi - lo), lo, hi):
            if e is not None and self._in_place_ok(t, vs, e):
                s, x = max(a * BLOCK_SIZE, offset), min(b * BLOCK_SIZE, end)
                self.pool.write(e.pbn + (a - e.lba), data[s - offset:x - offset],
                                s - a * BLOCK_SIZE)
            else:
                redirect.append((a, b, e))
        for a, b, buf in self._runs_to_redirect(redirect, offset, data):
            pos = 0
            for pbn, n in allocator.allocate(t, b - a):
                self.pool.write(pbn, buf[pos * BLOCK_SIZE:(pos + n) * BLOCK_SIZE])
                for k in range(0, n, MAX_EXTENT):
                    m = min(MAX_EXTENT, n - k)
                    new = Extent(a + pos + k, pbn + k, vs.epoch, m, 0)
                    for piece in extmap.overlay(t, vs, new):
                        extmap.kill(t, vs, piece, freed)
                    vs.live_blocks += m
                pos += n

    @staticmethod
    def _segments(recs: list[Extent], lo: int, hi: int
                  ) -> Iterator[tuple[int, int, Extent | None]]:
        """[lo, hi) cut by record: (start, end, record or None for a hole)."""
        pos = lo
        for e in recs:
            if e.lba + e.len <= pos or e.lba >= hi:
                continue
            if e.lba > pos:
                yield pos, e.lba, None
            x = min(e.lba + e.len, hi)
            yield max(e.lba, pos), x, e
            pos = x
        if pos < hi:
            yield pos, hi, None

    def _in_place_ok(self, t: Txn, vs: VolState, e: Extent) -> bool:
        if e.birth <= vs.max_snap:
            return False
        if not e.flags & F_SHARED:
            return True
        if any(h > 1 for _, _, h in allocator.refs_of(t, e.pbn, e.len)):
            return False
        # The other holders are gone: the record is the volume's own again.
        extmap.put_live(t, vs, e._replace(flags=e.flags & ~F_SHARED))
        return True

    def _runs_to_redirect(self, segs: list[tuple[int, int, Extent | None]], offset: int,
                          data: memoryview) -> Iterator[tuple[int, int, bytearray]]:
        """Contiguous block runs of segs with their full-block content: the new data, and the
        old content of partly written first and last blocks (read-modify-write)."""
        end = offset + len(data)
        i = 0
        while i < len(segs):
            j = i
            while j + 1 < len(segs) and segs[j + 1][0] == segs[j][1]:
                j += 1
            a, b = segs[i][0], segs[j][1]
            buf = bytearray((b - a) * BLOCK_SIZE)
            for sa, sb, e in segs[i:j + 1]:
                for blk in {sa, sb - 1}:  # only edge blocks can be partly written
                    bs, be = blk * BLOCK_SIZE, (blk + 1) * BLOCK_SIZE
                    if e is not None and (bs < offset or be > end):
                        buf[bs - a * BLOCK_SIZE:be - a * BLOCK_SIZE] = self.pool.read(
                            e.pbn + (blk - e.lba), BLOCK_SIZE)
            s, x = max(a * BLOCK_SIZE, offset), min(b * BLOCK_SIZE, end)
            buf[s - a * BLOCK_SIZE:x - a * BLOCK_SIZE] = data[s - offset:x - offset]
            yield a, b, buf
            i = j + 1

    def trim(self, vol: int, offset: int, length: int, zero: bool = False, fua: bool = False
             ) -> None:
        """Unmap the whole blocks in the range (they read as zeros and free their space where
        nothing else holds them).  zero=True also zeroes the partial blocks at its edges;
        trim leaves those alone (TRIM is advisory)."""
        freed: list[tuple[int, int]] = []
        self.native.gate_enter()
        try:
            with self.native.txn(write=True) as t:
                vs = self._state(t, vol)
                self._check_io(vs, offset, length, write=True)
                end = offset + length
                lo, hi = -(-offset // BLOCK_SIZE), end // BLOCK_SIZE
                if lo < hi:
                    extmap.holes_over(t, vs, lo, hi, freed)
                if zero:
                    edges = ([(offset, end)] if lo >= hi else
                             [(offset, lo * BLOCK_SIZE), (hi * BLOCK_SIZE, end)])
                    for s, x in edges:
                        if s < x:
                            self._write_locked(t, vs, s, memoryview(bytes(x - s)), freed)
                vs.save(t)
        finally:
            self.native.gate_leave()
        self._punch(freed)
        if fua:
            self.flush()

    def zero(self, vol: int, offset: int, length: int, fua: bool = False) -> None:
        self.trim(vol, offset, length, zero=True, fua=fua)

    def flush(self) -> None:
        """Everything written before this call is durable when it returns; then blocks freed
        before the sync become reusable."""
        with self.native.txn() as t:
            seq = allocator.committed_seq(t)
            pending = allocator.pending_blocks(t)
        self.native.sync()
        if pending:
            self._release_pending(seq)

    def _release_pending(self, upto_seq: int | None) -> int:
        self.native.gate_close()
        try:
            with self.native.txn(write=True) as t:
                return allocator.release_pending(t, upto_seq)
        finally:
            self.native.gate_open()

    def _reclaim(self) -> bool:
        """Make pending blocks reusable now (sync first); False if there were none."""
        with self.native.txn() as t:
            seq = allocator.committed_seq(t)
        self.native.sync()
        return self._release_pending(seq) > 0

    def _punch(self, freed: list[tuple[int, int]], min_blocks: int = 1) -> None:
        """Give freed runs' space back to the pool's filesystem.  Bulk frees (snapshot and
        volume delete, rollback) pass min_blocks=PUNCH_BULK_MIN_BLOCKS: ext4 takes ~0.4 ms a
        punch (measured: 6 of the 8 s of deleting a snapshot that owned 32k scattered
        blocks), and each small hole splits pool.dat's extent tree.  Smaller freed runs stay
        allocated in the file; they are free in the allocator and the next writes reuse them."""
        for pbn, n in extmap.merge_ranges([(p, p + n) for p, n in freed]):
            if n - pbn >= min_blocks:
                self.pool.punch(pbn, n - pbn)

    def block_status(self, vol: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, allocated) runs covering [offset, offset+length), block-aligned
        outwards.  Unwritten and trimmed ranges are holes that read as zeros."""
        lo, hi = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
        out = []
        pos = lo
        while pos < hi:
            runs = self.native.block_status(vol, pos, hi - pos)
            if not runs:
                break
            for r in runs:
                out.append((r.lba * BLOCK_SIZE, r.len * BLOCK_SIZE, r.pbn != HOLE))
            pos = runs[-1].lba + runs[-1].len
        return out

    def read_snapshot(self, vol: int, epoch: int, offset: int, length: int) -> bytes:
        """Read from snapshot `epoch` of vol: live records born by then plus the dead records
        of its time (see extmap.view_at)."""
        buf = bytearray(length)
        self.native.gate_enter()
        try:
            with self.native.txn() as t:
                meta = self._snap_meta(t, vol, epoch)
                if offset < 0 or offset + length > meta["size_bytes"]:
                    raise errors.OutOfRange(
                        f"I/O at {offset}+{length} past the end of the snapshot "
                        f"({meta['size_bytes']} bytes)")
                lo, hi = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
                for r in extmap.clip(extmap.view_at(t, vol, epoch, lo, hi), lo, hi):
                    s = max(r.lba * BLOCK_SIZE, offset)
                    x = min((r.lba + r.len) * BLOCK_SIZE, offset + length)
                    buf[s - offset:x - offset] = self.pool.read(
                        r.pbn + (s // BLOCK_SIZE - r.lba), x - s, s % BLOCK_SIZE)
        finally:
            self.native.gate_leave()
        return bytes(buf)

    def snapshot_block_status(self, vol: int, epoch: int, offset: int, length: int
                              ) -> list[tuple[int, int, bool]]:
        lo, hi = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
        with self.native.txn() as t:
            recs = extmap.view_at(t, vol, epoch, lo, hi)
        from .native import extents
        return [(r.lba * BLOCK_SIZE, r.len * BLOCK_SIZE, r.pbn != HOLE)
                for r in extents(recs, lo, hi - lo)]

    def snapshot_size(self, vol: int, epoch: int) -> int:
        with self.native.txn() as t:
            return int(self._snap_meta(t, vol, epoch)["size_bytes"])

    def volume_size(self, vol: int) -> int:
        with self.native.txn() as t:
            return self._state(t, vol).size_bytes

    # ---- capacity ---------------------------------------------------------------------------

    def usage(self, volume: str | None = None) -> dict[str, Any]:
        """Capacity: per volume its live and snapshot bytes and, per snapshot, the bytes it
        references and the bytes only it holds (what deleting it frees); store totals.  Built
        from counters, without scanning the map, except where blocks are shared by rollback
        or clones (then the dead records of the snapshots asked about are read)."""
        with self.native.txn() as t:
            shared = extmap.has_shared_blocks(t)
            ids = ([self._vol_id(t, volume)] if volume is not None
                   else [U32_BE.unpack(k)[0] for k, _ in t.scan(DB_VOLSTATE, b"")])
            vols: list[dict[str, Any]] = []
            for vol in ids:
                info = self._info(t, vol)
                epochs = self._snap_epochs(t, vol)
                snaps = [self._snapinfo(t, info.name, vol, epochs, i, True, shared).to_dict()
                         for i in range(len(epochs))]
                if shared:
                    dead = [extmap.TRIPLE_KEY.unpack(k)[1:]
                            for k, _ in t.scan_prefix(DB_DEAD, U32_BE.pack(vol))]
                    snap_blocks = self._freed_if_dropped(t, vol, dead)
                else:
                    snap_blocks = extmap.counted_blocks(t, vol, 0, INFINITY, 0, INFINITY)
                vols.append({"volume": info.name, "size_bytes": info.size_bytes,
                             "live_bytes": info.live_bytes,
                             "snapshots_bytes": snap_blocks * BLOCK_SIZE, "snapshots": snaps})
            hwm, cap, free, pending = allocator.totals(t)
            logical = sum(VolState.FMT.unpack(v)[0] for _, v in t.scan(DB_VOLSTATE, b""))
        used = hwm - free - pending
        store = {"pool_bytes": cap * BLOCK_SIZE, "used_bytes": used * BLOCK_SIZE,
                 "free_bytes": (cap - used) * BLOCK_SIZE, "pending_bytes": pending * BLOCK_SIZE,
                 "logical_bytes": logical,
                 "snapshots_bytes": sum(v["snapshots_bytes"] for v in vols) if volume is None
                 else None,
                 "pool_file_bytes": self.pool.size_on_disk()}
        return {"volumes": vols, "store": store}

    def check(self) -> Any:
        from .check import check_store
        with self.native.txn() as t:
            return check_store(t)
