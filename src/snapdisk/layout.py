"""The on-disk format: every database, key and value encoding, in one place.

Nothing else in Python builds a key or packs a value; native/xm_layout.h is the C mirror of
this table (the C core reads and writes LIVE, DEAD, DEADIDX, COUNTERS, LIVEBIRTH, FREE,
PENDING, REFS and META `alloc`/`blocks`/`pool_blocks`/`seq` on its write path).  Constants
come from C (snapdisk.native), never copied.

    STORE/meta/data.mdb   one LMDB environment, these named databases:

    database   key (big-endian: LMDB order is numeric)   value (little-endian, fixed size)
    ---------  ----------------------------------------  ------------------------------------
    META       ascii name (META_* below)                 see META records
    VOLUMES    vol:u32                                   JSON VolumeRecord (catalog.py);
                                                         optional keys: policy {name, since},
                                                         manual_quota, auto_quota
    VOLSTATE   vol:u32                                   size:u64 epoch:u64 max_snap:u64
                                                         live_blocks:u64 nsnaps:u32 flags:u32
    NAMES      'v' name(utf-8)                           vol:u32 BE
               's' vol:u32 name(utf-8)                   epoch:u64 BE
    SNAPS      vol:u32 epoch:u64                         JSON SnapshotRecord (catalog.py);
                                                         kind auto adds slot (ISO text) and
                                                         expires (epoch s, null: forever)
    LIVE       vol:u32 lba:u64                           len:u32 flags:u32 pbn:u64 birth:u64
    LIVEBIRTH  vol:u32 birth:u64 lba:u64                 len:u32
    DEAD       vol:u32 lba:u64 birth:u64                 len:u32 flags:u32 pbn:u64 death:u64
    DEADIDX    vol:u32 death:u64 birth:u64 lba:u64       len:u32
    COUNTERS   vol:u32 death:u64 birth:u64               blocks:u64
    REFS       pbn:u64                                   len:u64 refs:u64  (refs >= 2)
    FREE       pbn:u64                                   len:u64
    PENDING    seq:u64 pbn:u64                           len:u64

    META records
    format       u32          on-disk format version (FORMAT_VERSION; older ones are migrated
                              on open, see store.py)
    block_size   u32          4096
    alloc        hwm:u64 hint:u64   pool high-water mark, next-fit allocation hint
    pool_blocks  u64          pool capacity in blocks
    next_vol     u32          next volume id
    seq          u64          bumped by each transaction that frees blocks (allocator.py)
    blocks       free:u64 pending:u64   totals of FREE and PENDING
    config       JSON         store options (store.StoreConfig); format 2 added map_bytes;
                              `timezone` (IANA name) and `policies` (name -> policy, see
                              schedule.Policy.to_dict) are optional keys: absent, the local
                              zone and no policies, so no format change.  Policies live here,
                              not in a database: a store has a few, read whole by the
                              scheduler, and each change is one small atomic record write
    config       JSON         store options (store.StoreConfig); format 2 added map_bytes
    bulk         JSON         bulk work marked and not finished (bulk.py); absent when none
    bulk:<vol:u32>  u64       a marked rollback's or clone's position (bulk.py); absent when none

Format history: 1 (first release); 2 adds `map_bytes` to `config` and `encryption` (null: not
encrypted) to every VOLUMES record, room for encrypted volumes.  3: volumes encrypted from now on
use the logical block number as XTS tweak (their key record says "tweak": "lba"; records
without it keep the pbn tweak), which a format-2 snapdisk would misread (it would decrypt them
with the pbn): nothing is rewritten (the migration only sets the version), the bump is what
makes an older snapdisk refuse the store.

Invariants (check.py verifies them): a volume's live records are disjoint, 1..MAX_EXTENT blocks
long, inside the volume and born at or before its epoch; every dead record is needed by a
snapshot (birth <= s < death for some snapshot s) and mirrored in DEADIDX and COUNTERS;
LIVEBIRTH mirrors LIVE while VS_BIRTH_INDEXED is set; every pool block below the high-water
mark is exactly one of FREE, PENDING or held, and held by as many records as REFS says (1 when
absent); names and snapshot records point at each other.

Crash semantics: each engine operation is one LMDB write transaction, so after a crash either
all of its records changed or none did; new data reaches its (newly allocated) pool blocks
before the transaction that points at them commits, and freed blocks wait in PENDING until
that commit is synced (see allocator.py and docs/design.md).

Every decode validates: a value of the wrong size, a length out of range or undecodable text
raises errors.Corrupt naming what could not be read, never struct.error or UnicodeError.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from . import errors, native

FORMAT_VERSION: int = native.FORMAT_VERSION
BLOCK_SIZE: int = native.BLOCK_SIZE
MAX_EXTENT: int = native.MAX_EXTENT
INFINITY: int = native.INFINITY
F_SHARED: int = native.F_SHARED
VS_BIRTH_INDEXED: int = native.VS_BIRTH_INDEXED
VS_SHARED: int = native.VS_SHARED
VS_ENCRYPTED: int = native.VS_ENCRYPTED  # the volume's blocks are encrypted (docs/encryption.md)
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

# The databases (LMDB named sub-databases), numbered by the C core.
DB_META: int = native.DB_META
DB_VOLUMES: int = native.DB_VOLUMES
DB_VOLSTATE: int = native.DB_VOLSTATE
DB_NAMES: int = native.DB_NAMES
DB_SNAPS: int = native.DB_SNAPS
DB_LIVE: int = native.DB_LIVE
DB_LIVEBIRTH: int = native.DB_LIVEBIRTH
DB_DEAD: int = native.DB_DEAD
DB_DEADIDX: int = native.DB_DEADIDX
DB_REFS: int = native.DB_REFS
DB_FREE: int = native.DB_FREE
DB_PENDING: int = native.DB_PENDING
DB_COUNTERS: int = native.DB_COUNTERS

# ---- META key names ---------------------------------------------------------------------------
META_FORMAT = b"format"
META_BLOCK_SIZE = b"block_size"
META_ALLOC = b"alloc"
META_POOL_BLOCKS = b"pool_blocks"
META_NEXT_VOL = b"next_vol"
META_SEQ = b"seq"
META_BLOCKS = b"blocks"
META_CONFIG = b"config"
META_BULK = b"bulk"  # JSON: bulk work marked and not finished yet (bulk.py)

# ---- structs ------------------------------------------------------------------------------------
VOL_KEY = struct.Struct(">I")  # VOLUMES, VOLSTATE, the prefix of every per-volume key
SNAP_KEY = struct.Struct(">IQ")  # SNAPS (vol, epoch)
LIVE_KEY = struct.Struct(">IQ")  # LIVE (vol, lba)
TRIPLE_KEY = struct.Struct(">IQQ")  # DEAD (vol, lba, birth), LIVEBIRTH (vol, birth, lba),
#                                     COUNTERS (vol, death, birth)
DEADIDX_KEY = struct.Struct(">IQQQ")  # (vol, death, birth, lba)
PBN_KEY = struct.Struct(">Q")  # FREE, REFS
PENDING_KEY = struct.Struct(">QQ")  # (seq, pbn)
NAME_VOL = struct.Struct(">I")  # NAMES 'v' value
NAME_EPOCH = struct.Struct(">Q")  # NAMES 's' value
REC = struct.Struct("<IIQQ")  # LIVE and DEAD values: len, flags, pbn, birth (LIVE) / death (DEAD)
LEN32 = struct.Struct("<I")  # LIVEBIRTH, DEADIDX values
U32 = struct.Struct("<I")  # META format, block_size, next_vol
U64 = struct.Struct("<Q")  # COUNTERS, FREE, PENDING values; META pool_blocks, seq
U64x2 = struct.Struct("<QQ")  # REFS value; META alloc, blocks
VOLSTATE = struct.Struct("<QQQQII")

# Each META record's value: a struct, or None for JSON.
META_RECORDS: dict[bytes, struct.Struct | None] = {
    META_FORMAT: U32, META_BLOCK_SIZE: U32, META_ALLOC: U64x2, META_POOL_BLOCKS: U64,
    META_NEXT_VOL: U32, META_SEQ: U64, META_BLOCKS: U64x2, META_CONFIG: None,
}


def unpack(s: struct.Struct, raw: bytes | None, what: str) -> tuple[Any, ...]:
    """s.unpack(raw), or errors.Corrupt saying what could not be read.  (try/except costs
    nothing when nothing is raised: the hot decodes stay one C call.)"""
    try:
        return s.unpack(raw)  # type: ignore[arg-type]
    except (struct.error, TypeError):
        raise _size_error(s, raw, what) from None


def _size_error(s: struct.Struct, raw: bytes | None, what: str) -> errors.Corrupt:
    got = "nothing" if raw is None else f"{len(raw)} bytes"
    return errors.Corrupt(f"cannot read {what}: {got}, expected {s.size} bytes")


def _pack(s: struct.Struct, what: str, *values: int) -> bytes:
    """s.pack(*values); an out-of-range value is the caller's bad argument, not struct.error."""
    try:
        return s.pack(*values)
    except struct.error:
        raise errors.InvalidArgument(f"{what} out of range: {values}") from None


# ---- keys ---------------------------------------------------------------------------------------

def vol_key(vol: int) -> bytes:
    return _pack(VOL_KEY, "volume id", vol)


def snap_key(vol: int, epoch: int) -> bytes:
    return _pack(SNAP_KEY, "snapshot id", vol, epoch)


def live_key(vol: int, lba: int) -> bytes:
    return LIVE_KEY.pack(vol, lba)


def dead_key(vol: int, lba: int, birth: int) -> bytes:
    return TRIPLE_KEY.pack(vol, lba, birth)


def livebirth_key(vol: int, birth: int, lba: int) -> bytes:
    return TRIPLE_KEY.pack(vol, birth, lba)


def counter_key(vol: int, death: int, birth: int) -> bytes:
    return TRIPLE_KEY.pack(vol, death, birth)


def deadidx_key(vol: int, death: int, birth: int, lba: int) -> bytes:
    return DEADIDX_KEY.pack(vol, death, birth, lba)


def pbn_key(pbn: int) -> bytes:
    return PBN_KEY.pack(pbn)


def pending_key(seq: int, pbn: int) -> bytes:
    return PENDING_KEY.pack(seq, pbn)


def _name_bytes(name: str, what: str) -> bytes:
    try:
        return name.encode()
    except (UnicodeEncodeError, AttributeError):
        raise errors.InvalidName(f"invalid {what} name {name!r}: not a UTF-8 string") from None


def vol_name_key(name: str) -> bytes:
    """NAMES key of a volume name (InvalidName for text that has no UTF-8 form)."""
    return b"v" + _name_bytes(name, "volume")


def snap_name_prefix(vol: int) -> bytes:
    return b"s" + vol_key(vol)


def snap_name_key(vol: int, name: str) -> bytes:
    return snap_name_prefix(vol) + _name_bytes(name, "snapshot")


# ---- key decoders -------------------------------------------------------------------------------

def parse_vol_key(k: bytes) -> int:
    return int(unpack(VOL_KEY, k, "volume key")[0])


def parse_snap_key(k: bytes) -> tuple[int, int]:
    vol, epoch = unpack(SNAP_KEY, k, "snapshot key")
    return vol, epoch


def parse_live_key(k: bytes) -> tuple[int, int]:
    vol, lba = unpack(LIVE_KEY, k, "live record key")
    return vol, lba


def parse_triple(k: bytes, what: str) -> tuple[int, int, int]:
    a, b, c = unpack(TRIPLE_KEY, k, what)
    return a, b, c


def parse_deadidx_key(k: bytes) -> tuple[int, int, int, int]:
    vol, death, birth, lba = unpack(DEADIDX_KEY, k, "dead index key")
    return vol, death, birth, lba


def parse_pbn_key(k: bytes) -> int:
    return int(unpack(PBN_KEY, k, "pool run key")[0])


def parse_pending_key(k: bytes) -> tuple[int, int]:
    seq, pbn = unpack(PENDING_KEY, k, "pending run key")
    return seq, pbn


def parse_name(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise errors.Corrupt(f"cannot read {what}: {raw!r} is not UTF-8") from None


def parse_snap_name_key(k: bytes) -> tuple[int, str]:
    """NAMES 's' key -> (vol, name)."""
    if len(k) < 1 + VOL_KEY.size or k[:1] != b"s":
        raise errors.Corrupt(f"cannot read snapshot name key {k!r}")
    return parse_vol_key(k[1:5]), parse_name(k[5:], "snapshot name")


# ---- values -------------------------------------------------------------------------------------

def encode_rec(length: int, flags: int, pbn: int, epoch: int) -> bytes:
    return REC.pack(length, flags, pbn, epoch)


def decode_rec(raw: bytes | None, what: str = "map record") -> tuple[int, int, int, int]:
    """LIVE/DEAD value -> (len, flags, pbn, birth or death)."""
    try:
        r: tuple[int, int, int, int] = REC.unpack(raw)  # type: ignore[arg-type]
    except (struct.error, TypeError):
        raise _size_error(REC, raw, what) from None
    if not 0 < r[0] <= MAX_EXTENT:
        raise errors.Corrupt(f"cannot read {what}: length {r[0]} (1..{MAX_EXTENT})")
    return r


def encode_len(length: int) -> bytes:
    return LEN32.pack(length)


def decode_len(raw: bytes | None, what: str) -> int:
    """LIVEBIRTH/DEADIDX value: a record length."""
    try:
        length: int = LEN32.unpack(raw)[0]  # type: ignore[arg-type]
    except (struct.error, TypeError):
        raise _size_error(LEN32, raw, what) from None
    if not 0 < length <= MAX_EXTENT:
        raise errors.Corrupt(f"cannot read {what}: length {length} (1..{MAX_EXTENT})")
    return length


def encode_u32(n: int) -> bytes:
    return U32.pack(n)


def decode_u32(raw: bytes | None, what: str) -> int:
    return int(unpack(U32, raw, what)[0])


def encode_u64(n: int) -> bytes:
    return U64.pack(n)


def decode_u64(raw: bytes | None, what: str) -> int:
    return int(unpack(U64, raw, what)[0])


def encode_pair(a: int, b: int) -> bytes:
    return U64x2.pack(a, b)


def decode_pair(raw: bytes | None, what: str) -> tuple[int, int]:
    a, b = unpack(U64x2, raw, what)
    return a, b


def decode_refs(raw: bytes | None) -> tuple[int, int]:
    """REFS value -> (len, refs)."""
    length, refs = decode_pair(raw, "refcount run")
    if length == 0 or refs < 2:
        raise errors.Corrupt(f"cannot read refcount run: length {length}, refs {refs}")
    return length, refs


def encode_volstate(size_bytes: int, epoch: int, max_snap: int, live_blocks: int, nsnaps: int,
                    flags: int) -> bytes:
    return VOLSTATE.pack(size_bytes, epoch, max_snap, live_blocks, nsnaps, flags)


def decode_volstate(raw: bytes | None, vol: int) -> tuple[int, int, int, int, int, int]:
    what = f"volume {vol} state"
    size_bytes, epoch, max_snap, live_blocks, nsnaps, flags = unpack(VOLSTATE, raw, what)
    if epoch == 0 or max_snap >= epoch or size_bytes % 512:
        raise errors.Corrupt(f"cannot read {what}: size {size_bytes}, epoch {epoch}, "
                             f"newest snapshot {max_snap}")
    return size_bytes, epoch, max_snap, live_blocks, nsnaps, flags


def encode_json(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()


def decode_json(raw: bytes | None, what: str) -> dict[str, Any]:
    if raw is None:
        raise errors.Corrupt(f"cannot read {what}: missing")
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):
        raise errors.Corrupt(f"cannot read {what}: not JSON") from None
    if not isinstance(d, dict):
        raise errors.Corrupt(f"cannot read {what}: not a JSON object")
    return d


def field(d: dict[str, Any], key: str, types: type | tuple[type, ...], what: str,
          default: Any = ...) -> Any:
    """d[key] checked against types (bool is not an int here); Corrupt if missing or wrong."""
    if key not in d:
        if default is not ...:
            return default
        raise errors.Corrupt(f"cannot read {what}: no {key!r}")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise errors.Corrupt(f"cannot read {what}: {key!r} is {v!r}")
    if not isinstance(v, types):
        raise errors.Corrupt(f"cannot read {what}: {key!r} is {v!r}")
    return v
