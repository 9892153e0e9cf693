"""The send/receive stream format (versions 1 and 2): the one place that writes and reads it.

A stream carries one snapshot of one volume, whole ("full") or as the changes since an older
snapshot of the same volume ("incremental").  All integers little-endian; offsets and lengths
in bytes.  Records carry a CRC-32 (zlib) of their fields and payload; the header and the
whole stream a SHA-256 (hashlib).  Why not SHA-256 per record: hashing every payload on both
sides was the cost of the data path (measured on the 2-core machine: SHA-256 ~0.3-1 GB/s with
SHA-NI, CRC-32 ~0.7-2 GB/s, blake2b ~0.2-0.4 GB/s; receive was hash-bound), and a send stream
needs damage detection, not a signature (an unkeyed digest can be recomputed by whoever
alters the stream): ZFS send streams use fletcher-4 the same way.  A CRC-32 detects every
error burst of up to 32 bits and all but 2**-32 of other damage to a record.

    header
    0     8   magic          b"SDSTREAM"
    8     2   version        u16: 1 (VERSION_PLAIN) for a plain volume, 2 (VERSION_RAW) for an
                             encrypted one (raw send: the payloads are ciphertext); a reader
                             refuses any other
    10    2   flags          u16 = 0 (reserved: a reader refuses bits it does not know)
    12    4   block_size     u32 = 4096
    16    8   size_bytes     u64: the sent snapshot's size (a positive multiple of 512)
    24    4   meta_len       u32: length of the metadata below, 2 .. MAX_META
    28    4   reserved       u32 = 0
    32    L   metadata       JSON object, UTF-8 (meta_len bytes):
                               volume      the sender's volume name
                               snapshot    the sent snapshot: {name, id, created, guid}
                               base        the same for the base, null for a full stream
                               range_bytes bytes the records below cover (for progress)
                               sender      "snapdisk" (the writing program)
                               encryption  version 2 only, and required there: {"cipher",
                                           "tweak": "lba", "key_id", "record": the volume's
                                           wrapped key record (keys.py: KDF salt and
                                           parameters, the GCM-wrapped data key; never a key
                                           in the clear)}
    32+L  32  header digest  SHA-256 of bytes [0, 32+L)

    records, 0 or more, each
    0     1   kind           u8: 1 DATA, 2 ZERO, 3 TRIM; 255 END (the last record)
    1     3   reserved       zero
    4     4   seq            u32: 0, 1, 2, ... (END carries the count of the records before it)
    8     8   offset         u64 (END: 0)
    16    8   length         u64 (END: 0)
    24    4   crc            u32: zlib.crc32 of bytes [0, 24) of this record, then its payload
    28    4   reserved       zero
    32    n   payload        DATA only: `length` bytes of the snapshot at `offset`

    trailer (after END)
    0     8   data_bytes     u64: total length of the DATA records
    8     8   zero_bytes     u64: ZERO records
    16    8   trim_bytes     u64: TRIM records
    24    32  stream digest  SHA-256 of: the header digest, then every record's first 32 bytes
                             (END's too), then trailer bytes [0, 24)
    56    8   end magic      b"SDSTREND"; nothing may follow

The stream digest covers the header, every record's fields, their order and the totals;
payload bytes enter it through their records' CRCs, so each payload is checksummed once on
each side, by the fastest checksum the standard library has.

Invariants a reader checks (StreamReader; any failure is errors.FormatError naming the byte
offset, and nothing read after a failure is used):
  - magic, version, flags, block size, reserved fields, CRCs, digests and end magic as above;
    EOF exactly after the end magic;
  - records in strictly increasing, non-overlapping offset order, seq counting from 0;
  - offset a multiple of block_size; length > 0 and a multiple of block_size, except that a
    record may end exactly at size_bytes; offset + length <= size_bytes;
  - a DATA record holds 1 .. MAX_DATA bytes; the totals in the trailer match the records;
  - version 2: `encryption` as above, size_bytes and every length a multiple of block_size
    (a payload is whole XTS data units: a piece of one cannot be decrypted).
Semantics: DATA writes its payload; ZERO means the range reads as zeros and was allocated in the
snapshot (the receiver may write zeros or unmap); TRIM means the range is a hole (unmapped) in
the snapshot.  A full stream holds only the snapshot's allocated ranges (the rest of a new
volume is a hole already); an incremental one every range that changed since the base (from
diff.py), and nothing else.  Version 2 (an encrypted volume): DATA payloads are the blocks
as stored in the sender's pool, AES-256-XTS with the logical block number as tweak
(docs/encryption.md), so they decrypt wherever the receiver puts them, with the key the
record wraps; the receiver never needs that key.  Every allocated range is DATA there (a
ciphertext block is no zero block).  The CRCs and digests cover the ciphertext, as any bytes.
Why the version rather than a metadata key: a version-1 reader ignores unknown metadata and
would write ciphertext into a plain volume; it refuses version 2.  Plain streams stay version 1,
byte for byte, so older receivers still take them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import errors

MAGIC = b"SDSTREAM"
END_MAGIC = b"SDSTREND"
VERSION_PLAIN, VERSION_RAW = 1, 2
VERSION = VERSION_RAW  # the newest this module writes and reads
BLOCK_SIZE = 4096
MAX_META = 64 << 10
MAX_DATA = 4 << 20      # the largest DATA payload a reader accepts
DATA_CHUNK = 1 << 20    # what a writer puts in one DATA record

DATA, ZERO, TRIM, END = 1, 2, 3, 255
KINDS = {DATA: "data", ZERO: "zero", TRIM: "trim"}

HEAD = struct.Struct("<8sHHIQII")       # 32 bytes
REC = struct.Struct("<B3xIQQ")          # 24 bytes, then the 8-byte checksum
CHECK = struct.Struct("<II")            # crc32, reserved 0
TOTALS = struct.Struct("<QQQ")          # 24 bytes, then the stream digest and END_MAGIC
DIGEST = 32
REC_BYTES = REC.size + CHECK.size       # 32


def _crc(head: bytes, payload: Any = b"") -> bytes:
    return CHECK.pack(zlib.crc32(payload, zlib.crc32(head)), 0)


def _sha(*parts: Any) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


@dataclass
class Header:
    size_bytes: int
    meta: dict[str, Any]
    block_size: int = BLOCK_SIZE

    @property
    def incremental(self) -> bool:
        return self.meta.get("base") is not None

    @property
    def encryption(self) -> dict[str, Any] | None:
        """The `encryption` object of a raw (version 2) stream, None for a plain one."""
        enc = self.meta.get("encryption")
        return enc if isinstance(enc, dict) else None

    @property
    def version(self) -> int:
        return VERSION_RAW if self.encryption is not None else VERSION_PLAIN

    def encode(self) -> bytes:
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode()
        if len(meta) > MAX_META:
            raise errors.InvalidArgument(f"stream metadata of {len(meta)} bytes: at most "
                                         f"{MAX_META}")
        if self.version == VERSION_RAW and self.size_bytes % self.block_size:
            raise errors.InvalidArgument(f"a raw stream's size is whole blocks "
                                         f"({self.size_bytes} bytes is not)")
        head = HEAD.pack(MAGIC, self.version, 0, self.block_size, self.size_bytes, len(meta), 0)
        return head + meta + _sha(head, meta)


@dataclass
class Totals:
    data_bytes: int = 0
    zero_bytes: int = 0
    trim_bytes: int = 0
    records: int = 0

    def add(self, kind: int, length: int) -> None:
        self.records += 1
        if kind == DATA:
            self.data_bytes += length
        elif kind == ZERO:
            self.zero_bytes += length
        else:
            self.trim_bytes += length

    def to_dict(self) -> dict[str, int]:
        return {"records": self.records, "data_bytes": self.data_bytes,
                "zero_bytes": self.zero_bytes, "trim_bytes": self.trim_bytes}


class StreamWriter:
    """Writes one stream to out (a binary file object; each write is whole or raises)."""

    def __init__(self, out: BinaryIO, header: Header):
        self.out = out
        self.size_bytes = header.size_bytes
        raw = header.encode()
        self.hash = hashlib.sha256(raw[-DIGEST:])
        self.totals = Totals()
        self.bytes = 0
        self._write(raw)

    def _write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:  # a raw file's write() may write less (a pipe, a signal)
            n = self.out.write(view)
            view = view[len(view) if n is None else n:]
        self.bytes += len(data)

    def _record(self, kind: int, offset: int, length: int, payload: Any = b"") -> None:
        head = REC.pack(kind, self.totals.records, offset, length)
        rec = head + _crc(head, payload)
        self.hash.update(rec)
        self._write(rec)
        if kind == DATA:
            self._write(payload)
        if kind != END:
            self.totals.add(kind, length)

    def data(self, offset: int, payload: Any) -> None:
        self._record(DATA, offset, len(payload), payload)

    def zero(self, offset: int, length: int) -> None:
        self._record(ZERO, offset, length)

    def trim(self, offset: int, length: int) -> None:
        self._record(TRIM, offset, length)

    def finish(self) -> Totals:
        self._record(END, 0, 0)
        t = self.totals
        totals = TOTALS.pack(t.data_bytes, t.zero_bytes, t.trim_bytes)
        self.hash.update(totals)
        self._write(totals + self.hash.digest() + END_MAGIC)
        self.out.flush()
        return t


@dataclass
class Record:
    kind: int
    offset: int
    length: int
    payload: memoryview | None = None  # DATA: valid until the next record is read


@dataclass
class StreamReader:
    """Reads and verifies one stream from src (a binary file object).  header() first, then
    records() to the end; a record is yielded only once its CRC is checked, and the last
    one is followed by the checked trailer (records() returns normally only then).  Payloads
    are read into `buffers` rotating buffers: a DATA payload stays valid while fewer than
    `buffers` further DATA records are read (a consumer in another thread holds a few)."""

    src: BinaryIO
    buffers: int = 1
    pos: int = 0
    totals: Totals = field(default_factory=Totals)

    def __post_init__(self) -> None:
        self.raw = False  # a version 2 stream (header() says): ciphertext, whole blocks only
        self._bufs = [bytearray(DATA_CHUNK) for _ in range(self.buffers)]
        self._next = 0
        self._small = bytearray(REC_BYTES)

    def _bad(self, what: str) -> errors.FormatError:
        return errors.FormatError(f"bad send stream at byte {self.pos}: {what}")

    def _read(self, n: int, what: str, payload: bool = False) -> memoryview:
        if payload:
            i, self._next = self._next, (self._next + 1) % len(self._bufs)
            if n > len(self._bufs[i]):
                self._bufs[i] = bytearray(n)
            buf = self._bufs[i]
        else:
            if n > len(self._small):
                self._small = bytearray(n)
            buf = self._small
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            k = self.src.readinto(view[got:])  # type: ignore[attr-defined]
            if not k:
                raise self._bad(f"the stream ends inside {what} (cut or truncated: "
                                f"{got} of {n} bytes)")
            got += k
        self.pos += n
        return view

    def header(self) -> Header:
        head = bytes(self._read(HEAD.size, "the header"))
        magic, version, flags, bs, size, meta_len, reserved = HEAD.unpack(head)
        if magic != MAGIC:
            raise self._bad("not a snapdisk send stream (bad magic)")
        if version not in (VERSION_PLAIN, VERSION_RAW):
            raise self._bad(f"stream format version {version}: this snapdisk reads "
                            f"{VERSION_PLAIN} and {VERSION_RAW}")
        if flags or reserved or bs != BLOCK_SIZE or not 2 <= meta_len <= MAX_META \
                or size <= 0 or size % 512:
            raise self._bad(f"header fields out of range (flags {flags}, block size {bs}, "
                            f"size {size}, metadata {meta_len} bytes)")
        meta = bytes(self._read(meta_len, "the header"))
        intact = bytes(self._read(DIGEST, "the header")) == _sha(head, meta)
        try:
            doc = json.loads(meta)
            assert isinstance(doc, dict)
        except (ValueError, AssertionError):
            raise self._bad("the header's digest does not match (corrupted)" if not intact
                            else "the header's metadata is not a JSON object") from None
        # The version against the metadata before the digest: a version 2 header on plain
        # metadata (or the reverse) is named as such, not as mere damage.
        enc = doc.get("encryption")
        if version == VERSION_RAW:
            if not (isinstance(enc, dict) and isinstance(enc.get("record"), dict)
                    and all(isinstance(enc.get(k), str) for k in ("cipher", "tweak", "key_id"))):
                raise self._bad("a version 2 (encrypted) stream's header has no valid "
                                "`encryption` object")
            if size % bs:
                raise self._bad(f"an encrypted stream's size {size} is not whole blocks")
        elif "encryption" in doc:
            raise self._bad("a version 1 (plain) stream's header names an encryption")
        if not intact:
            raise self._bad("the header's digest does not match (corrupted)")
        self.raw = version == VERSION_RAW
        self.size_bytes = size
        self.hash = hashlib.sha256(_sha(head, meta))
        self._end = 0
        return Header(size, doc, bs)

    def records(self) -> Any:
        """Yield each DATA, ZERO and TRIM Record, checked; then check END and the trailer."""
        while True:
            at = self.pos
            rec = bytes(self._read(REC_BYTES, "a record header"))
            kind, seq, offset, length = REC.unpack_from(rec)
            if rec[1:4] != b"\0\0\0" or rec[28:32] != b"\0\0\0\0" \
                    or (kind not in KINDS and kind != END):
                raise self._bad(f"unknown record kind {kind}")
            if seq != self.totals.records:
                raise self._bad(f"record {seq} where record {self.totals.records} belongs")
            if kind == END:
                if offset or length or rec[REC.size:] != _crc(rec[:REC.size]):
                    raise self._bad("the end record is corrupted")
                self.hash.update(rec)
                self._trailer()
                return
            self._check_range(kind, offset, length)
            payload = self._read(length, "a data record", True) if kind == DATA else None
            if rec[REC.size:] != _crc(rec[:REC.size], payload if payload is not None else b""):
                self.pos = at
                raise self._bad(f"{KINDS[kind]} record {seq} at volume offset {offset} does "
                                "not match its CRC (corrupted)")
            self.hash.update(rec)
            self.totals.add(kind, length)
            self._end = offset + length
            yield Record(kind, offset, length, payload)

    def _check_range(self, kind: int, offset: int, length: int) -> None:
        end = offset + length
        aligned = length % BLOCK_SIZE == 0 or (end == self.size_bytes and not self.raw)
        if offset < self._end or offset % BLOCK_SIZE or length <= 0 or not aligned \
                or end > self.size_bytes or (kind == DATA and length > MAX_DATA):
            raise self._bad(f"{KINDS[kind]} record {offset}+{length} out of order or out of "
                            f"range (previous end {self._end}, size {self.size_bytes})")

    def _trailer(self) -> None:
        raw = bytes(self._read(TOTALS.size + DIGEST + len(END_MAGIC), "the trailer"))
        totals = raw[:TOTALS.size]
        self.hash.update(totals)
        t = self.totals
        if raw[-len(END_MAGIC):] != END_MAGIC:
            raise self._bad("the trailer's end magic is missing (corrupted)")
        if raw[TOTALS.size:TOTALS.size + DIGEST] != self.hash.digest():
            raise self._bad("the stream digest does not match (corrupted)")
        if TOTALS.unpack(totals) != (t.data_bytes, t.zero_bytes, t.trim_bytes):
            raise self._bad("the trailer's totals do not match the records")
        if self.src.read(1):
            raise self._bad("bytes after the end of the stream")


def snapshot_ref(volume: str, info: dict[str, Any] | None) -> str:
    """VOL@SNAP (guid ...) for messages."""
    if info is None:
        return "nothing (a full stream)"
    return f"{volume}@{info.get('name')} (guid {info.get('guid')})"
