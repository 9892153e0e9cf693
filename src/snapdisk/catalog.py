"""The catalog: volumes and snapshots by name and id, their typed records, and name rules.

Records (encodings in layout.py):
    VOLUMES   vol -> VolumeRecord   name, created, clone origin, snapshot counts, encryption
    VOLSTATE  vol -> VolState       the fixed-size part the hot path and every map change use
    SNAPS     (vol, epoch) -> SnapshotRecord
    NAMES     'v' name -> vol;  's' vol name -> epoch

A snapshot's id is its epoch (see extmap.py).  Lookups take a name, or for snapshots an id (an
int, or a string of ASCII digits that is no snapshot's name); anything that cannot be an id of
the format (negative, 2**64 or more, '²') is SnapshotNotFound, never a struct error.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import errors, layout
from .layout import BLOCK_SIZE, DB_NAMES, DB_SNAPS, DB_VOLSTATE, DB_VOLUMES, U64_MAX
from .native import Txn

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
# Hidden volumes: names no user can give (NAME_RE starts with a letter or digit).
RESTORE_PREFIX = ".restore-"  # a restore's volume until it is published (backup_restore.py)
# Snapshot names may also hold ':' and '+', for automatic snapshots named after their slot
# (auto-2026-11-25T12:00+08:00, schedule.py); exportspec.py repeats this rule.
SNAP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
SNAP_NAME_RULE = ("1-64 characters: letters, digits, '.', '_', '-', ':' or '+', starting with a "
                  "letter or digit")
DIGITS_RE = re.compile(r"[0-9]{1,20}")
KINDS = ("manual", "auto")
MAX_VOLUME_BYTES = 1 << 50


def check_name(name: str, what: str) -> None:
    # fullmatch: with match() and `$`, a trailing newline would pass (issue 10 item 8).
    pattern, rule = (SNAP_NAME_RE, SNAP_NAME_RULE) if what == "snapshot" else (NAME_RE, NAME_RULE)
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise errors.InvalidName(f"invalid {what} name {name!r}: {rule}")


def check_size(size_bytes: int) -> None:
    if (not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes <= 0
            or size_bytes % 512):
        raise errors.InvalidSize(f"invalid size {size_bytes!r}: a positive multiple of 512 bytes")
    if size_bytes > MAX_VOLUME_BYTES:
        raise errors.InvalidSize(f"invalid size {size_bytes}: at most {MAX_VOLUME_BYTES} bytes")


@dataclass
class VolState:
    """The hot, fixed-size part of a volume's record (VOLSTATE vol:u32)."""

    vol: int
    size_bytes: int
    epoch: int
    max_snap: int  # newest snapshot's epoch, 0: none
    live_blocks: int
    nsnaps: int
    flags: int = 0

    def pack(self) -> bytes:
        return layout.encode_volstate(self.size_bytes, self.epoch, self.max_snap,
                                      self.live_blocks, self.nsnaps, self.flags)

    @classmethod
    def decode(cls, vol: int, raw: bytes) -> VolState:
        return cls(vol, *layout.decode_volstate(raw, vol))

    @classmethod
    def load(cls, t: Txn, vol: int) -> VolState | None:
        raw = t.get(DB_VOLSTATE, layout.vol_key(vol))
        return None if raw is None else cls.decode(vol, raw)

    def save(self, t: Txn) -> None:
        t.put(DB_VOLSTATE, layout.vol_key(self.vol), self.pack())


@dataclass
class VolumeRecord:
    """VOLUMES vol:u32 (JSON).  Unknown keys are kept in `extra` and written back."""

    name: str
    created: float
    origin: dict[str, Any] | None = None
    snapshots_manual: int = 0
    snapshots_auto: int = 0
    encryption: dict[str, Any] | None = None  # format 2: None, not encrypted
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = ("name", "created", "origin", "snapshots_manual", "snapshots_auto", "encryption")

    def count(self, kind: str) -> int:
        return self.snapshots_manual if kind == "manual" else self.snapshots_auto

    def add(self, kind: str, delta: int) -> None:
        if kind == "manual":
            self.snapshots_manual += delta
        else:
            self.snapshots_auto += delta

    def encode(self) -> bytes:
        d = {k: getattr(self, k) for k in self.KNOWN}
        return layout.encode_json({**d, **self.extra})

    @classmethod
    def decode(cls, raw: bytes | None, vol: int) -> VolumeRecord:
        what = f"volume {vol} record"
        d = layout.decode_json(raw, what)
        f = layout.field
        rec = cls(f(d, "name", str, what), f(d, "created", (int, float), what),
                  f(d, "origin", (dict, type(None)), what, None),
                  f(d, "snapshots_manual", int, what), f(d, "snapshots_auto", int, what),
                  f(d, "encryption", (dict, type(None)), what, None),
                  {k: v for k, v in d.items() if k not in cls.KNOWN})
        if rec.snapshots_manual < 0 or rec.snapshots_auto < 0:
            raise errors.Corrupt(f"cannot read {what}: negative snapshot count")
        return rec


@dataclass
class SnapshotRecord:
    """SNAPS (vol:u32, epoch:u64) (JSON)."""

    name: str
    created: float
    kind: str
    policy: str | None
    size_bytes: int
    referenced_blocks: int
    slot: str | None = None  # kind auto: the policy slot it was taken for (schedule.slot_text)
    expires: float | None = None  # kind auto: when retention deletes it (None: never)
    # send/receive (sendrecv.py): the identity of a received snapshot, the sender's; absent
    # on every other record (their identity is derived, sendrecv.snapshot_guid), no format change
    guid: str | None = None

    def encode(self) -> bytes:
        d = asdict(self)
        for k in ("slot", "expires", "guid"):  # only automatic snapshots carry slot, expires
            if d[k] is None:
                del d[k]
        return layout.encode_json(d)

    @classmethod
    def decode(cls, raw: bytes | None, vol: int, epoch: int) -> SnapshotRecord:
        what = f"volume {vol} snapshot {epoch} record"
        d = layout.decode_json(raw, what)
        f = layout.field
        rec = cls(f(d, "name", str, what), f(d, "created", (int, float), what),
                  f(d, "kind", str, what), f(d, "policy", (str, type(None)), what, None),
                  f(d, "size_bytes", int, what), f(d, "referenced_blocks", int, what),
                  f(d, "slot", (str, type(None)), what, None),
                  f(d, "expires", (int, float, type(None)), what, None),
                  f(d, "guid", (str, type(None)), what, None))
        if rec.kind not in KINDS or rec.size_bytes <= 0 or rec.referenced_blocks < 0:
            raise errors.Corrupt(f"cannot read {what}: kind {rec.kind!r}, "
                                 f"size {rec.size_bytes}, {rec.referenced_blocks} blocks")
        return rec


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
    slot: str | None = None  # kind auto: its policy slot
    expires: float | None = None  # kind auto: when retention deletes it (None: never)
    # snapshot create only (issue 9 item 3): waiting for the I/O gate, and the transaction
    # (which also commits the pending group-commit batch) with its sync
    gate_wait_ms: float | None = None
    commit_ms: float | None = None
    # issue 9 item 3: the wait for a group-commit batch in progress (before the gate
    # closes) and the durability sync after it opens
    batch_wait_ms: float | None = None
    sync_ms: float | None = None

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
    encrypted: bool = False  # keys.py / encryption.py
    locked: bool = False  # encrypted and its key not loaded (set by the Engine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- lookups ------------------------------------------------------------------------------------

def vol_id(t: Txn, name: str) -> int:
    raw = t.get(DB_NAMES, layout.vol_name_key(name))
    if raw is None:
        raise errors.VolumeNotFound(f"no volume named {name!r}")
    return int(layout.unpack(layout.NAME_VOL, raw, "volume name record")[0])


def state(t: Txn, vol: int) -> VolState:
    vs = VolState.load(t, vol)
    if vs is None:
        raise errors.VolumeNotFound(f"no volume with id {vol}")
    return vs


def vol_record(t: Txn, vol: int) -> VolumeRecord:
    raw = t.get(DB_VOLUMES, layout.vol_key(vol))
    if raw is None:
        raise errors.VolumeNotFound(f"no volume with id {vol}")
    return VolumeRecord.decode(raw, vol)


def put_vol_record(t: Txn, vol: int, rec: VolumeRecord) -> None:
    t.put(DB_VOLUMES, layout.vol_key(vol), rec.encode())


def volume_ids(t: Txn) -> list[int]:
    return [layout.parse_vol_key(k) for k, _ in t.scan(DB_VOLSTATE, b"")]


def snap_epoch(t: Txn, vol: int, snap: str | int) -> int:
    """A snapshot by name, or by id (an int, or a string of ASCII digits that is no name)."""
    if isinstance(snap, str):
        raw = t.get(DB_NAMES, layout.snap_name_key(vol, snap))
        if raw is not None:
            return int(layout.unpack(layout.NAME_EPOCH, raw, "snapshot name record")[0])
        if not DIGITS_RE.fullmatch(snap):  # str.isdigit() is true for '²'
            raise errors.SnapshotNotFound(f"no snapshot named {snap!r}")
        snap = int(snap)
    if not isinstance(snap, int) or isinstance(snap, bool) or not 0 <= snap <= U64_MAX:
        raise errors.SnapshotNotFound(f"no snapshot with id {snap!r}")
    if t.get(DB_SNAPS, layout.snap_key(vol, snap)) is None:
        raise errors.SnapshotNotFound(f"no snapshot with id {snap}")
    return snap


def snap_record(t: Txn, vol: int, epoch: int) -> SnapshotRecord:
    raw = t.get(DB_SNAPS, layout.snap_key(vol, epoch))
    if raw is None:
        raise errors.SnapshotNotFound(f"no snapshot with id {epoch}")
    return SnapshotRecord.decode(raw, vol, epoch)


def snap_epochs(t: Txn, vol: int) -> list[int]:
    return [layout.parse_snap_key(k)[1] for k, _ in t.scan_prefix(DB_SNAPS, layout.vol_key(vol))]


def new_volume(t: Txn, name: str, size_bytes: int, origin: dict[str, Any] | None,
               extra: dict[str, Any]) -> VolState:
    if t.get(DB_NAMES, layout.vol_name_key(name)) is not None:
        raise errors.AlreadyExists(f"a volume named {name!r} exists")
    raw = t.get(layout.DB_META, layout.META_NEXT_VOL)
    vol = 1 if raw is None else layout.decode_u32(raw, "next volume id")
    t.put(layout.DB_META, layout.META_NEXT_VOL, layout.encode_u32(vol + 1))
    put_vol_record(t, vol, VolumeRecord(name, time.time(), origin, extra=dict(extra)))
    t.put(DB_NAMES, layout.vol_name_key(name), layout.NAME_VOL.pack(vol))
    vs = VolState(vol, size_bytes, epoch=1, max_snap=0, live_blocks=0, nsnaps=0)
    vs.save(t)
    return vs


def snap_name_taken(t: Txn, vol: int, name: str) -> bool:
    return t.get(DB_NAMES, layout.snap_name_key(vol, name)) is not None


def add_snapshot(t: Txn, vol: int, epoch: int, rec: SnapshotRecord) -> None:
    t.put(DB_SNAPS, layout.snap_key(vol, epoch), rec.encode())
    t.put(DB_NAMES, layout.snap_name_key(vol, rec.name), layout.NAME_EPOCH.pack(epoch))


def drop_snapshot(t: Txn, vol: int, epoch: int, rec: SnapshotRecord) -> None:
    t.delete(DB_SNAPS, layout.snap_key(vol, epoch))
    t.delete(DB_NAMES, layout.snap_name_key(vol, rec.name))


def info(t: Txn, vol: int) -> VolumeInfo:
    vs = state(t, vol)
    rec = vol_record(t, vol)
    return VolumeInfo(vol, rec.name, vs.size_bytes, rec.created, rec.origin,
                      vs.live_blocks * BLOCK_SIZE, vs.nsnaps, rec.snapshots_manual,
                      rec.snapshots_auto, dict(rec.extra), rec.encryption is not None)


def has_volume_prefix(t: Txn, prefix: str) -> bool:
    """Whether any volume's name starts with prefix: one seek in NAMES."""
    return next(t.scan_prefix(DB_NAMES, layout.vol_name_key(prefix)), None) is not None
