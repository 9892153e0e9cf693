"""The backup repository format: snapshots kept as content-addressed chunks in an S3 bucket.

This module owns the format (object names, encodings, the manifest's extent arithmetic);
backup.py and backup_restore.py move the data, s3.py builds the client.  BorgBackup's habit:
the layout and its invariants first.

Layout under s3://BUCKET/PREFIX/ (PREFIX may be empty):

    config                          JSON: {"format": "snapdisk-backup", "version": 1,
                                    "chunk_size", "hash": "sha256", "compression": "zlib"}
    chunks/HH/HEX                   one chunk; HEX = sha256 of its plaintext (64 hex digits),
                                    HH its first two digits (spreads keys, as git does)
    manifests/VOLUME/EPOCH.SNAP     one backed-up snapshot; EPOCH = the snapshot's id on the
                                    source store, 20 decimal digits (names sort by age)
    locks/KIND-HEX                  who is using the repository (backup_lock.py owns them)

Chunk object (big-endian; HEADER = ">4sBBHI32s", 44 bytes, then the payload):

    magic b"SDBC" | version u8 = 1 | codec u8 (0 raw, 1 zlib) | reserved u16 = 0
    | plaintext length u32 (<= chunk_size) | sha256(plaintext) 32 bytes | payload

Manifest object: the same header with magic b"SDBM" and codec 1; the payload is zlib'd UTF-8
JSON, the digest that JSON's sha256:

    {"format": 1, "volume", "volume_id", "volume_created", "snapshot": {"name", "id",
     "created"}, "size_bytes", "block_size", "chunk_size", "created" (when backed up),
     "base" (the manifest name this one was made incrementally from, or null),
     "mapped_bytes", "chunks": [HEX, ...], "extents": [[offset, length, chunk, skip], ...]}

    "format": 2 (MANIFEST_RAW) is the backup of an ENCRYPTED volume (raw backup): the same
    fields and "encryption": {"cipher", "tweak": "lba", "key_id", "record": the volume's
    wrapped key record (keys.py: KDF salt and parameters and the GCM-wrapped data key, what
    unlocking with the sender's passphrase or key file needs; never a key in the clear)}.  Its
    chunks hold the blocks as stored in the sender's pool: AES-256-XTS ciphertext whose tweak is
    the logical block number (docs/encryption.md), so they decrypt wherever a restore puts
    them; the restoring store never needs the key.  Chunk names, checksums, dedup and
    compression work on those bytes as on any (ciphertext does not compress: the sample test
    below stores it raw).  Why a second format number rather than an optional key: a format-1
    reader ignores unknown keys and would restore ciphertext into a plain volume; it refuses
    format 2.  Plain backups stay format 1, so older snapdisks still list and restore them.

An extent says: bytes [offset, offset+length) of the snapshot are bytes [skip, skip+length) of
chunk `chunks[chunk]`'s plaintext.  Extents are sorted by offset, never overlap, are block
aligned (block_size) and lie inside size_bytes; every byte no extent covers is a hole (reads as
zeros, restored as a hole).  A chunk holds up to chunk_size bytes: in a full backup the
allocated runs of one chunk_size window of the address space, in an incremental one the changed
runs packed together (so a 4 KiB change costs 4 KiB, not a chunk; backup.py says why).

Invariants:
- A chunk's name is the sha256 of its plaintext, and the header repeats it: a reader checks
  both after decompressing (the S3 server's own checksums are not relied on: Ceph 16 ignores
  S3's flexible checksums).  Equal data is stored once per repository (deduplication across
  snapshots and volumes); writing a chunk that exists is a no-op, so uploads are idempotent.
- A manifest is written after every chunk it names exists (create-only: If-None-Match: *):
  a backup is complete, or invisible.  Chunks without a manifest are leftovers of an
  interrupted backup; a resumed backup reuses them, prune deletes them.
- Prune deletes manifests first, then the chunks no remaining manifest names.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from . import errors

FORMAT = "snapdisk-backup"
VERSION = 1
MANIFEST_PLAIN, MANIFEST_RAW = 1, 2  # a manifest's "format": plain, encrypted (raw)
CHUNK_SIZE = 1 << 20
BLOCK_SIZE = 4096
HASH = "sha256"
COMPRESSION = "zlib"

HEADER = struct.Struct(">4sBBHI32s")
CHUNK_MAGIC = b"SDBC"
MANIFEST_MAGIC = b"SDBM"
CODEC_RAW, CODEC_ZLIB = 0, 1
ZLIB_LEVEL = 1
# Compression is tried on a sample first (BorgBackup's "auto" mode): zlib gains nothing on
# incompressible data and runs at ~25 MB/s on it here, 40 times slower than the upload.
SAMPLE = 16 << 10
SAMPLE_RATIO = 0.9

CONFIG_NAME = "config"
CHUNKS_DIR = "chunks/"
MANIFESTS_DIR = "manifests/"
HEX_RE = re.compile(r"[0-9a-f]{64}")
MANIFEST_RE = re.compile(r"(?P<volume>[^/]+)/(?P<epoch>[0-9]{20})\.(?P<snap>[^/]+)")


def digest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- object names ---------------------------------------------------------------------------

def chunk_name(key: str) -> str:
    return f"{CHUNKS_DIR}{key[:2]}/{key}"


def chunk_key(name: str) -> str | None:
    """The key of a chunk object's name (relative to the prefix), None if it is none."""
    key = name.rsplit("/", 1)[-1]
    return key if name == chunk_name(key) and HEX_RE.fullmatch(key) else None


def manifest_name(volume: str, epoch: int, snap: str) -> str:
    return f"{MANIFESTS_DIR}{volume}/{epoch:020d}.{snap}"


def parse_manifest_name(name: str) -> tuple[str, int, str] | None:
    m = MANIFEST_RE.fullmatch(name[len(MANIFESTS_DIR):]) if name.startswith(MANIFESTS_DIR) \
        else None
    return None if m is None else (m["volume"], int(m["epoch"]), m["snap"])


# ---- chunk and manifest objects -------------------------------------------------------------

def _seal(magic: bytes, plain: Any, codec: int, payload: Any, key: str) -> bytes:
    return HEADER.pack(magic, VERSION, codec, 0, len(plain), bytes.fromhex(key)) + bytes(payload)


def _open(magic: bytes, raw: bytes, what: str) -> tuple[bytes | memoryview, str]:
    """(plaintext, its digest) of a sealed object, every field checked."""
    if len(raw) < HEADER.size:
        raise errors.Corrupt(f"{what}: {len(raw)} bytes, shorter than its header")
    got_magic, version, codec, _, length, dig = HEADER.unpack_from(raw)
    if got_magic != magic or version != VERSION or codec not in (CODEC_RAW, CODEC_ZLIB):
        raise errors.Corrupt(f"{what}: not a version {VERSION} snapdisk backup object "
                             f"(magic {got_magic!r}, version {version}, codec {codec})")
    body = memoryview(raw)[HEADER.size:]
    try:
        plain = zlib.decompress(body) if codec == CODEC_ZLIB else body  # raw: no copy
    except zlib.error as e:
        raise errors.Corrupt(f"{what}: cannot decompress ({e})") from None
    if len(plain) != length or hashlib.sha256(plain).digest() != dig:
        raise errors.Corrupt(f"{what}: checksum mismatch (the data is damaged)")
    return plain, dig.hex()


def encode_chunk(plain: Any, key: str | None = None) -> tuple[str, bytes]:
    """(key, object bytes) of a chunk's plaintext (key: its digest, if known already)."""
    if len(plain) > CHUNK_SIZE:
        raise errors.InvalidArgument(f"a chunk holds at most {CHUNK_SIZE} bytes")
    key = key or digest(plain)
    codec, payload = CODEC_RAW, plain
    sample = zlib.compress(plain[:SAMPLE], ZLIB_LEVEL)
    if len(sample) < SAMPLE_RATIO * min(len(plain), SAMPLE):
        packed = zlib.compress(plain, ZLIB_LEVEL)
        if len(packed) < len(plain):
            codec, payload = CODEC_ZLIB, packed
    return key, _seal(CHUNK_MAGIC, plain, codec, payload, key)


def decode_chunk(raw: bytes, key: str) -> bytes | memoryview:
    """The plaintext of chunk key, verified: Corrupt names the chunk."""
    plain, dig = _open(CHUNK_MAGIC, raw, f"chunk {key}")
    if dig != key:
        raise errors.Corrupt(f"chunk {key}: holds the data of chunk {dig}")
    return plain


def encode_config() -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION, "chunk_size": CHUNK_SIZE,
                       "hash": HASH, "compression": COMPRESSION}, sort_keys=True).encode()


def check_config(raw: bytes, where: str) -> None:
    try:
        cfg = json.loads(raw)
    except ValueError:
        cfg = None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise errors.FormatError(f"{where} is not a snapdisk backup repository")
    if cfg.get("version") != VERSION or cfg.get("chunk_size") != CHUNK_SIZE \
            or cfg.get("hash") != HASH:
        raise errors.FormatError(f"{where}: repository version {cfg.get('version')} "
                                 f"(chunk size {cfg.get('chunk_size')}, hash "
                                 f"{cfg.get('hash')}); this snapdisk reads version {VERSION}")


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    key: str
    skip: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Manifest:
    volume: str
    volume_id: int
    volume_created: float
    snapshot: dict[str, Any]  # name, id, created
    size_bytes: int
    created: float
    base: str | None
    extents: list[Extent]
    encryption: dict[str, Any] | None = None  # a raw backup's (format 2); None: plain

    @property
    def name(self) -> str:
        return manifest_name(self.volume, self.snapshot["id"], self.snapshot["name"])

    @property
    def mapped_bytes(self) -> int:
        return sum(e.length for e in self.extents)

    def chunk_keys(self) -> list[str]:
        """The chunks it names, in first-use order."""
        return list(dict.fromkeys(e.key for e in self.extents))

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "volume": self.volume, "snapshot": self.snapshot["name"],
                "snapshot_id": self.snapshot["id"], "snapshot_created": self.snapshot["created"],
                "size_bytes": self.size_bytes, "mapped_bytes": self.mapped_bytes,
                "chunks": len(self.chunk_keys()), "created": self.created, "base": self.base,
                "encrypted": self.encryption is not None}


def encode_manifest(m: Manifest) -> bytes:
    check_extents(m.extents, m.size_bytes)
    keys = m.chunk_keys()
    index = {k: i for i, k in enumerate(keys)}
    doc = {"format": MANIFEST_PLAIN if m.encryption is None else MANIFEST_RAW,
           "volume": m.volume, "volume_id": m.volume_id,
           "volume_created": m.volume_created, "snapshot": m.snapshot,
           "size_bytes": m.size_bytes, "block_size": BLOCK_SIZE, "chunk_size": CHUNK_SIZE,
           "created": m.created, "base": m.base, "mapped_bytes": m.mapped_bytes,
           "chunks": keys,
           "extents": [[e.offset, e.length, index[e.key], e.skip] for e in m.extents]}
    if m.encryption is not None:
        doc["encryption"] = m.encryption
    plain = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return _seal(MANIFEST_MAGIC, plain, CODEC_ZLIB, zlib.compress(plain, ZLIB_LEVEL), digest(plain))


def decode_manifest(raw: bytes, name: str) -> Manifest:
    what = f"backup manifest {name}"
    plain, _ = _open(MANIFEST_MAGIC, raw, what)
    try:
        d = json.loads(bytes(plain))
        keys = d["chunks"]
        if d["format"] not in (MANIFEST_PLAIN, MANIFEST_RAW) or d["block_size"] != BLOCK_SIZE \
                or not all(isinstance(k, str) and HEX_RE.fullmatch(k) for k in keys):
            raise ValueError("format")
        enc = d.get("encryption")
        if (d["format"] == MANIFEST_RAW) != isinstance(enc, dict) \
                or (enc is not None and not isinstance(enc, dict)):
            raise ValueError("format 2 and only format 2 names an encryption")
        exts = [Extent(int(o), int(n), keys[c], int(s)) for o, n, c, s in d["extents"]]
        snap = d["snapshot"]
        m = Manifest(str(d["volume"]), int(d["volume_id"]), float(d["volume_created"]),
                     {"name": str(snap["name"]), "id": int(snap["id"]),
                      "created": float(snap["created"])}, int(d["size_bytes"]),
                     float(d["created"]), d["base"], exts, enc)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise errors.Corrupt(f"{what}: malformed ({e})") from None
    check_extents(m.extents, m.size_bytes, what)
    return m


def check_extents(exts: list[Extent], size: int, what: str = "manifest") -> None:
    pos = 0
    for e in exts:
        if (e.offset < pos or e.length <= 0 or e.end > size or e.skip < 0
                or e.skip + e.length > CHUNK_SIZE or e.offset % BLOCK_SIZE or e.length % BLOCK_SIZE):
            raise errors.Corrupt(f"{what}: bad extent {e}")
        pos = e.end


# ---- extent arithmetic ----------------------------------------------------------------------

def cut(exts: list[Extent], ranges: list[tuple[int, int]]) -> list[Extent]:
    """exts without the bytes of ranges ((offset, length), sorted, not overlapping): what an
    incremental backup keeps of its base."""
    out: list[Extent] = []
    i = 0
    for e in exts:
        while i < len(ranges) and sum(ranges[i]) <= e.offset:
            i += 1
        pos, j = e.offset, i
        while pos < e.end:
            if j >= len(ranges) or ranges[j][0] >= e.end:
                out.append(Extent(pos, e.end - pos, e.key, e.skip + pos - e.offset))
                break
            r_off, r_end = ranges[j][0], sum(ranges[j])
            if r_off > pos:
                out.append(Extent(pos, r_off - pos, e.key, e.skip + pos - e.offset))
            pos = max(pos, r_end)
            j += 1
    return out


def merge(a: list[Extent], b: list[Extent]) -> list[Extent]:
    """The union of two sorted extent lists that do not overlap each other."""
    return sorted(a + b, key=lambda e: e.offset)


def split_windows(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """ranges cut at every CHUNK_SIZE boundary of the address space (a piece never spans two
    windows: a whole window's piece is a whole chunk, the same in every backup)."""
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        end = off + n
        while off < end:
            stop = min(end, (off // CHUNK_SIZE + 1) * CHUNK_SIZE)
            out.append((off, stop - off))
            off = stop
    return out
