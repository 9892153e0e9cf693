"""Known answers for every on-disk encoding (exact bytes), and decodes that refuse damage."""

from __future__ import annotations

import struct

import pytest

from snapdisk import catalog, errors, layout, native
from snapdisk.catalog import SnapshotRecord, VolState, VolumeRecord
from snapdisk.store import StoreConfig


def test_constants_come_from_c() -> None:
    assert layout.FORMAT_VERSION == native.FORMAT_VERSION == 3  # 3: lba-tweak encryption
    assert (layout.BLOCK_SIZE, layout.MAX_EXTENT) == (4096, 1024)
    assert layout.INFINITY == (1 << 64) - 1
    assert (layout.VS_BIRTH_INDEXED, layout.VS_SHARED, layout.F_SHARED) == (1, 2, 1)


KEYS = [
    (layout.vol_key(0x01020304), "01020304"),
    (layout.snap_key(1, 0x0A), "00000001" "000000000000000a"),
    (layout.live_key(2, 0x1122), "00000002" "0000000000001122"),
    (layout.dead_key(2, 5, 7), "00000002" "0000000000000005" "0000000000000007"),
    (layout.livebirth_key(2, 7, 5), "00000002" "0000000000000007" "0000000000000005"),
    (layout.counter_key(2, 9, 7), "00000002" "0000000000000009" "0000000000000007"),
    (layout.deadidx_key(2, 9, 7, 5),
     "00000002" "0000000000000009" "0000000000000007" "0000000000000005"),
    (layout.pbn_key(0x100), "0000000000000100"),
    (layout.pending_key(3, 0x100), "0000000000000003" "0000000000000100"),
    (layout.vol_name_key("vm1"), "76" "766d31"),
    (layout.snap_name_key(1, "s"), "73" "00000001" "73"),
    (layout.snap_name_prefix(1), "73" "00000001"),
]


@pytest.mark.parametrize("key,hexed", KEYS)
def test_keys_are_big_endian(key: bytes, hexed: str) -> None:
    assert key.hex() == hexed


def test_key_order_is_numeric_order() -> None:
    assert layout.live_key(1, 255) < layout.live_key(1, 256) < layout.live_key(2, 0)
    assert layout.deadidx_key(1, 2, 9, 9) < layout.deadidx_key(1, 3, 0, 0)


def test_key_decoders_invert_the_builders() -> None:
    assert layout.parse_vol_key(layout.vol_key(7)) == 7
    assert layout.parse_snap_key(layout.snap_key(7, 9)) == (7, 9)
    assert layout.parse_live_key(layout.live_key(7, 9)) == (7, 9)
    assert layout.parse_triple(layout.dead_key(7, 9, 3), "k") == (7, 9, 3)
    assert layout.parse_deadidx_key(layout.deadidx_key(1, 2, 3, 4)) == (1, 2, 3, 4)
    assert layout.parse_pbn_key(layout.pbn_key(5)) == 5
    assert layout.parse_pending_key(layout.pending_key(5, 6)) == (5, 6)
    assert layout.parse_snap_name_key(layout.snap_name_key(3, "x.y")) == (3, "x.y")


VALUES = [
    (layout.encode_rec(3, 1, 0x0102, 5),
     "03000000" "01000000" "0201000000000000" "0500000000000000"),
    (layout.encode_len(0x400), "00040000"),
    (layout.encode_u32(1), "01000000"),
    (layout.encode_u64(0x0102), "0201000000000000"),
    (layout.encode_pair(1, 2), "0100000000000000" "0200000000000000"),
    (layout.encode_volstate(4096, 3, 2, 1, 1, 2),
     "0010000000000000" "0300000000000000" "0200000000000000" "0100000000000000"
     "01000000" "02000000"),
    (layout.NAME_VOL.pack(3), "00000003"),
    (layout.NAME_EPOCH.pack(3), "0000000000000003"),
]


@pytest.mark.parametrize("value,hexed", VALUES)
def test_values_are_little_endian_fixed_structs(value: bytes, hexed: str) -> None:
    assert value.hex() == hexed


def test_value_decoders_invert_the_encoders() -> None:
    assert layout.decode_rec(layout.encode_rec(3, 1, 9, 5)) == (3, 1, 9, 5)
    assert layout.decode_len(layout.encode_len(9), "x") == 9
    assert layout.decode_u32(layout.encode_u32(9), "x") == 9
    assert layout.decode_u64(layout.encode_u64(9), "x") == 9
    assert layout.decode_pair(layout.encode_pair(8, 9), "x") == (8, 9)
    assert layout.decode_refs(layout.encode_pair(8, 2)) == (8, 2)
    vs = VolState(4, 8192, 3, 2, 1, 1, 1)
    assert VolState.decode(4, vs.pack()) == vs


def test_json_records_known_answers() -> None:
    v = VolumeRecord("vm1", 1.5, None, 1, 2)
    assert v.encode() == (b'{"name": "vm1", "created": 1.5, "origin": null, "snapshots_manual": 1, '
                          b'"snapshots_auto": 2, "encryption": null}')
    assert VolumeRecord.decode(v.encode(), 1) == v
    v.extra["tag"] = "x"  # unknown keys survive a round trip
    assert VolumeRecord.decode(v.encode(), 1) == v
    s = SnapshotRecord("s", 2.0, "auto", "hourly", 4096, 1)
    assert s.encode() == (b'{"name": "s", "created": 2.0, "kind": "auto", "policy": "hourly", '
                          b'"size_bytes": 4096, "referenced_blocks": 1}')
    assert SnapshotRecord.decode(s.encode(), 1, 1) == s
    c = StoreConfig(pool_bytes=65536)
    assert c.to_json() == (b'{"pool_bytes": 65536, "sync_commits": false, '
                           b'"manual_snapshot_quota": 256, "auto_snapshot_quota": 256, '
                           b'"map_bytes": 68719476736}')


BAD = [
    (lambda: layout.decode_rec(b"\0" * 23), "expected 24 bytes"),
    (lambda: layout.decode_rec(layout.encode_rec(0, 0, 1, 1)), "length 0"),
    (lambda: layout.decode_rec(layout.encode_rec(1025, 0, 1, 1)), "length 1025"),
    (lambda: layout.decode_rec(None), "nothing"),
    (lambda: layout.decode_len(b"\1\0", "dead index entry"), "dead index entry"),
    (lambda: layout.decode_len(layout.encode_len(0), "x"), "length 0"),
    (lambda: layout.decode_u64(b"", "counter"), "counter"),
    (lambda: layout.decode_refs(layout.encode_pair(4, 1)), "refs 1"),
    (lambda: layout.parse_live_key(b"\0" * 11), "live record key"),
    (lambda: layout.parse_snap_name_key(b"s\0"), "snapshot name key"),
    (lambda: layout.parse_snap_name_key(b"s\0\0\0\1\xff"), "not UTF-8"),
    (lambda: VolState.decode(1, b"\0" * 39), "volume 1 state"),
    (lambda: VolState.decode(1, layout.encode_volstate(4096, 0, 0, 0, 0, 0)), "epoch 0"),
    (lambda: VolState.decode(1, layout.encode_volstate(4096, 2, 2, 0, 0, 0)), "newest"),
    (lambda: VolumeRecord.decode(b"[1]", 1), "not a JSON object"),
    (lambda: VolumeRecord.decode(b"\xff", 1), "not JSON"),
    (lambda: VolumeRecord.decode(b'{"name": 1}', 1), "'name'"),
    (lambda: VolumeRecord.decode(b"[" * 100000, 1), "not JSON"),
    (lambda: VolumeRecord.decode(b'{"name": "v", "created": 1, "snapshots_manual": true, '
                                 b'"snapshots_auto": 0}', 1), "snapshots_manual"),
    (lambda: SnapshotRecord.decode(b'{"name": "s", "created": 1, "kind": "weekly", '
                                   b'"size_bytes": 512, "referenced_blocks": 0}', 1, 1), "kind"),
]


@pytest.mark.parametrize("n", range(len(BAD)))
def test_every_decode_refuses_damage_with_corrupt(n: int) -> None:
    decode, phrase = BAD[n]
    with pytest.raises(errors.Corrupt, match=phrase) as e:
        decode()
    assert e.value.exit_code == 10


def test_out_of_range_keys_are_bad_arguments_not_struct_errors() -> None:
    with pytest.raises(errors.InvalidArgument):
        layout.snap_key(1, 1 << 64)
    with pytest.raises(errors.InvalidArgument):
        layout.snap_key(1, -1)
    with pytest.raises(errors.InvalidName):
        layout.vol_name_key("\ud800")
    with pytest.raises(errors.InvalidName):
        layout.snap_name_key(1, "\udcff")
    assert struct.calcsize("<QQQQII") == layout.VOLSTATE.size == 40


def test_name_rule_is_a_full_match() -> None:
    for bad in ("abc\n", "a\nb", "\nabc", "abc\r", ""):
        with pytest.raises(errors.InvalidName):
            catalog.check_name(bad, "volume")
    catalog.check_name("a" * 64, "volume")
    with pytest.raises(errors.InvalidName):
        catalog.check_name("a" * 65, "volume")
