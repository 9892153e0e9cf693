"""The send stream format (stream.py): known answers for its byte layout, and a reader that
refuses every cut and every flipped byte."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib

import pytest

from snapdisk import errors, stream
from snapdisk.stream import DATA, TRIM, ZERO, Header, StreamReader, StreamWriter

META = {"volume": "v", "snapshot": {"name": "s2", "id": 2, "created": 1.5, "guid": "g2"},
        "base": {"name": "s1", "id": 1, "created": 1.0, "guid": "g1"}, "range_bytes": 12288,
        "sender": "snapdisk"}
SIZE = 3 * 4096 + 512  # ends inside a block: the last record may end at the size


def sample() -> bytes:
    out = io.BytesIO()
    w = StreamWriter(out, Header(SIZE, META))
    w.data(0, b"\x01" * 4096)
    w.zero(4096, 4096)
    w.trim(8192, 4096)
    w.data(12288, b"\x02" * 512)
    totals = w.finish()
    assert totals.to_dict() == {"records": 4, "data_bytes": 4608, "zero_bytes": 4096,
                                "trim_bytes": 4096}
    assert w.bytes == len(out.getvalue())
    return out.getvalue()


def read_all(raw: bytes) -> tuple[Header, list[tuple[int, int, int, bytes | None]]]:
    r = StreamReader(io.BytesIO(raw))
    h = r.header()
    recs = [(x.kind, x.offset, x.length, None if x.payload is None else bytes(x.payload))
            for x in r.records()]
    return h, recs


def test_known_answer_layout() -> None:
    """The bytes of a small stream, field by field, and its SHA-256: a change of the format
    changes this test (and VERSION)."""
    raw = sample()
    meta = b'{"base":{"created":1.0,"guid":"g1","id":1,"name":"s1"},"range_bytes":12288,' \
           b'"sender":"snapdisk","snapshot":{"created":1.5,"guid":"g2","id":2,"name":"s2"},' \
           b'"volume":"v"}'
    head = struct.pack("<8sHHIQII", b"SDSTREAM", 1, 0, 4096, SIZE, len(meta), 0)
    assert raw[:32] == head
    assert raw[32:32 + len(meta)] == meta
    hd = hashlib.sha256(head + meta).digest()
    pos = 32 + len(meta)
    assert raw[pos:pos + 32] == hd
    pos += 32

    def rec(kind: int, seq: int, off: int, n: int, payload: bytes = b"") -> bytes:
        fields = struct.pack("<B3xIQQ", kind, seq, off, n)
        return fields + struct.pack("<II", zlib.crc32(fields + payload), 0)

    recs = [rec(DATA, 0, 0, 4096, b"\x01" * 4096), rec(ZERO, 1, 4096, 4096),
            rec(TRIM, 2, 8192, 4096), rec(DATA, 3, 12288, 512, b"\x02" * 512),
            rec(255, 4, 0, 0)]
    body = recs[0] + b"\x01" * 4096 + recs[1] + recs[2] + recs[3] + b"\x02" * 512 + recs[4]
    assert raw[pos:pos + len(body)] == body
    pos += len(body)
    totals = struct.pack("<QQQ", 4608, 4096, 4096)
    assert raw[pos:pos + 24] == totals
    h = hashlib.sha256(hd)
    for r in recs + [totals]:
        h.update(r)
    assert raw[pos + 24:pos + 56] == h.digest()
    assert raw[pos + 56:] == b"SDSTREND"
    assert len(raw) == 32 + len(meta) + 32 + 5 * 32 + 4608 + 24 + 32 + 8
    assert zlib.crc32(struct.pack("<B3xIQQ", ZERO, 1, 4096, 4096)) == ZERO_CRC
    assert hashlib.sha256(raw).hexdigest() == KNOWN_SHA256


KNOWN_SHA256 = "2fc857c7bb5088bcb40647583438ec1a458166fad37a75965f715bbe7448067f"
ZERO_CRC = 0x3c213ee8


def test_round_trip() -> None:
    h, recs = read_all(sample())
    assert h.size_bytes == SIZE and h.meta == META and h.incremental
    assert recs == [(DATA, 0, 4096, b"\x01" * 4096), (ZERO, 4096, 4096, None),
                    (TRIM, 8192, 4096, None), (DATA, 12288, 512, b"\x02" * 512)]


def test_every_cut_is_refused() -> None:
    raw = sample()
    for n in range(len(raw)):
        with pytest.raises(errors.FormatError, match="ends inside|bad magic"):
            read_all(raw[:n])


def test_every_flipped_byte_is_refused() -> None:
    raw = sample()
    rnd = random.Random(3)
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 1 << rnd.randrange(8)
        with pytest.raises(errors.FormatError):
            read_all(bytes(bad))


def test_trailing_bytes_and_versions_are_refused() -> None:
    raw = sample()
    with pytest.raises(errors.FormatError, match="after the end"):
        read_all(raw + b"\0")
    with pytest.raises(errors.FormatError, match="version 2"):
        read_all(raw[:8] + struct.pack("<H", 2) + raw[10:])
    with pytest.raises(errors.FormatError, match="not a snapdisk send stream"):
        read_all(b"GARBAGE!" + raw[8:])


@pytest.mark.parametrize("records", [
    [(DATA, 4096, b"a" * 4096), (DATA, 0, b"b" * 4096)],      # out of order
    [(DATA, 0, b"a" * 8192), (ZERO, 4096, None)],             # overlapping
    [(DATA, 100, b"a" * 4096)],                                # unaligned offset
    [(DATA, 0, b"a" * 1000)],                                  # short, not at the end
    [(TRIM, 8192, None)],                                      # past the end (length below)
])
def test_bad_ranges_are_refused(records: list[tuple[int, int, bytes | None]]) -> None:
    """A writer that does not check (the digests are right): the reader still refuses."""
    out = io.BytesIO()
    w = StreamWriter(out, Header(3 * 4096 + 512, META))
    for kind, off, payload in records:
        w._record(kind, off, len(payload) if payload else 8192, payload or b"")
    w.finish()
    with pytest.raises(errors.FormatError, match="out of order or out of range"):
        read_all(out.getvalue())


def test_oversized_data_record_is_refused_before_reading_it() -> None:
    out = io.BytesIO()
    w = StreamWriter(out, Header(64 << 20, META))
    head = stream.REC.pack(DATA, 0, 0, stream.MAX_DATA + 4096)
    out.write(head + bytes(8))
    with pytest.raises(errors.FormatError, match="out of range"):
        read_all(out.getvalue())
    del w
