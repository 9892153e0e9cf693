"""Known-answer tests of the backup repository format (snapdisk.backup_repo): no S3 needed."""

from __future__ import annotations

import hashlib
import json
import zlib

import pytest

from snapdisk import backup_repo as repo
from snapdisk import errors
from snapdisk.backup_repo import Extent, Manifest

ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


def test_chunk_object_known_answer() -> None:
    key, obj = repo.encode_chunk(b"abc")
    assert key == ABC
    # magic, version 1, codec 0 (raw: 3 bytes do not compress), reserved, length, digest
    assert obj == b"SDBC\x01\x00\x00\x00\x00\x00\x00\x03" + bytes.fromhex(ABC) + b"abc"
    assert repo.decode_chunk(obj, ABC) == b"abc"
    assert repo.chunk_name(ABC) == f"chunks/ba/{ABC}"
    assert repo.chunk_key(f"chunks/ba/{ABC}") == ABC
    assert repo.chunk_key(f"chunks/bb/{ABC}") is None


def test_compressible_chunk_is_zlib_and_random_is_raw() -> None:
    plain = b"\x00\x01" * (1 << 19)
    key, obj = repo.encode_chunk(plain)
    assert obj[5] == repo.CODEC_ZLIB and len(obj) < 10_000
    assert obj[repo.HEADER.size:] == zlib.compress(plain, 1)
    assert repo.decode_chunk(obj, key) == plain
    rnd = hashlib.sha256(b"seed").digest() * 1  # 32 bytes
    rnd = b"".join(hashlib.sha256(rnd + bytes([i, j])).digest() for i in range(256)
                   for j in range(16))  # 128 KiB, incompressible
    key, obj = repo.encode_chunk(rnd)
    assert obj[5] == repo.CODEC_RAW and obj[repo.HEADER.size:] == rnd


def test_damaged_chunk_is_refused_naming_it() -> None:
    key, obj = repo.encode_chunk(b"x" * 5000)
    for bad in (obj[:-1], obj[:20], b"XXXX" + obj[4:],
                obj[:repo.HEADER.size] + bytes([obj[repo.HEADER.size] ^ 1]) + obj[45:]):
        with pytest.raises(errors.Corrupt, match=key):
            repo.decode_chunk(bad, key)
    other, _ = repo.encode_chunk(b"y")
    with pytest.raises(errors.Corrupt, match="holds the data of chunk"):
        repo.decode_chunk(obj, other)


def manifest(extents: list[Extent], base: str | None = None) -> Manifest:
    return Manifest("web", 3, 1700000000.5, {"name": "mon", "id": 42, "created": 1700000001.0},
                    8 << 20, 1700000002.0, base, extents)


def test_manifest_known_answer_and_round_trip() -> None:
    m = manifest([Extent(0, 8192, ABC, 0), Extent(1 << 20, 4096, "0" * 64, 4096)])
    assert m.name == "manifests/web/00000000000000000042.mon"
    assert repo.parse_manifest_name(m.name) == ("web", 42, "mon")
    raw = repo.encode_manifest(m)
    magic, version, codec, _, length, dig = repo.HEADER.unpack_from(raw)
    assert (magic, version, codec) == (b"SDBM", 1, repo.CODEC_ZLIB)
    doc = zlib.decompress(raw[repo.HEADER.size:])
    assert len(doc) == length and hashlib.sha256(doc).digest() == dig
    d = json.loads(doc)
    assert d["chunks"] == [ABC, "0" * 64]
    assert d["extents"] == [[0, 8192, 0, 0], [1 << 20, 4096, 1, 4096]]
    assert d["mapped_bytes"] == 12288 and d["base"] is None and d["block_size"] == 4096
    # the JSON is canonical (sorted keys, no spaces): its digest is pinned
    assert hashlib.sha256(doc).hexdigest() == \
        "9750f6b771ddc3333db6a9b8dfc24720bc0ccaf7d5d08638ad1520807ddf19ba"
    back = repo.decode_manifest(raw, m.name)
    assert back == m
    flipped = bytearray(raw)
    flipped[-3] ^= 0x40
    with pytest.raises(errors.Corrupt, match="manifest"):
        repo.decode_manifest(bytes(flipped), m.name)


def test_manifest_refuses_overlapping_or_unaligned_extents() -> None:
    for bad in ([Extent(0, 8192, ABC, 0), Extent(4096, 4096, ABC, 0)],
                [Extent(100, 4096, ABC, 0)], [Extent(8 << 20, 4096, ABC, 0)],
                [Extent(0, 4096, ABC, repo.CHUNK_SIZE)]):
        with pytest.raises(errors.Corrupt):
            repo.encode_manifest(manifest(bad))


def test_extent_arithmetic() -> None:
    base = [Extent(0, 16384, "a" * 64, 0), Extent(65536, 8192, "b" * 64, 4096)]
    kept = repo.cut(base, [(4096, 4096), (12288, 57344)])
    assert kept == [Extent(0, 4096, "a" * 64, 0), Extent(8192, 4096, "a" * 64, 8192),
                    Extent(69632, 4096, "b" * 64, 8192)]
    assert repo.cut(base, []) == base
    mib = repo.CHUNK_SIZE
    assert repo.split_windows([(mib - 4096, 8192), (3 * mib, 2 * mib)]) == \
        [(mib - 4096, 4096), (mib, 4096), (3 * mib, mib), (4 * mib, mib)]


def test_config() -> None:
    repo.check_config(repo.encode_config(), "here")
    assert json.loads(repo.encode_config()) == {
        "format": "snapdisk-backup", "version": 1, "chunk_size": 1 << 20, "hash": "sha256",
        "compression": "zlib"}
    with pytest.raises(errors.FormatError):
        repo.check_config(b'{"format": "snapdisk-backup", "version": 2}', "here")
    with pytest.raises(errors.FormatError):
        repo.check_config(b"hello", "here")
