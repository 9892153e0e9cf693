"""Raw send and backup of encrypted volumes (issue 13): the XTS tweak is the logical block
(known answer against `cryptography`, C and Python write paths giving the same ciphertext),
the seam's raw mode, send | receive into a store without the key (no plaintext in its files,
unlocked with the sender's secret, every snapshot compared), incrementals, a wrong key id,
legacy pbn-tweak volumes refused with the conversion hint, and backup | restore against the
real radosgw (tests/s3_fixture.py)."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest
from conftest import new_store
from crypto_helpers import BS, PATTERN, PW, MiB, make_legacy, plaintext_hits

from snapdisk import backup_repo, encryption, errors, keys, stream
from snapdisk.engine import Engine
from snapdisk.native import KEY_LOCKED, raw_io
from snapdisk.store import StoreConfig

pytest_plugins = ["s3_fixture"]

SIZE = 16 * MiB
KEY_FILE = keys.Secret(key_file=bytes(range(32)))


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_SCRYPT_LOG2N", "10")


def xts(key: bytes, tweak: int, data: bytes, enc: bool) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    c = Cipher(algorithms.AES(key), modes.XTS(tweak.to_bytes(8, "little") + bytes(8)))
    x = c.encryptor() if enc else c.decryptor()
    return x.update(data) + x.finalize()


def pbn_of(e: Engine, vol: int, lba: int) -> int:
    e.commit_batch()
    with e.native.txn() as t:
        (rec,) = [r for r in t.live_overlap(vol, lba, 1) if r.lba <= lba < r.lba + r.len]
    return rec.pbn + lba - rec.lba


def data_key(e: Engine, name: str) -> bytes:
    key = e.keyring.get(e.key_info(name)["key_id"])
    assert key is not None
    return bytes(key)


# ---- the tweak ------------------------------------------------------------------------------

@pytest.mark.parametrize("c_path", [True, False])
def test_new_volumes_use_the_logical_block_as_tweak(tmp_path: Path, c_path: bool) -> None:
    """Known answer: a new volume's pool block is XTS with tweak = lba (not the pbn), on both
    write paths and through a sub-block read-modify-write; the record says "tweak": "lba"."""
    with new_store(tmp_path / "s") as e:
        e._c_redirect = c_path
        v = e.create_volume("v", MiB, encrypt=PW)
        assert e.key_info("v")["tweak"] == "lba"
        e.write(v.id, 0, os.urandom(8 * BS))  # so that pbn != lba below
        e.create_snapshot("v", "s")  # held: the next writes are redirected (ROW)
        e.write(v.id, 5 * BS, PATTERN[:BS])
        e.write(v.id, 6 * BS + 100, PATTERN[:200])  # sub-block: read-modify-write
        key = data_key(e, "v")
        for lba, want in ((5, PATTERN[:BS]), (6, e.read(v.id, 6 * BS, BS))):
            pbn = pbn_of(e, v.id, lba)
            assert pbn != lba
            raw = e.pool.read(pbn, BS)  # vol 0: as stored
            assert xts(key, lba, raw, False) == want
            assert xts(key, pbn, raw, False) != want
        assert e.read(v.id, 6 * BS + 100, 200) == PATTERN[:200]


def test_c_and_python_paths_and_clones_make_the_same_ciphertext(tmp_path: Path) -> None:
    """The C seam's twin is `cryptography`'s XTS (above); here the C redirect-on-write path and
    the Python general path write the same block of a volume and of its clone (same key,
    different pbns): equal ciphertext, which only a position-independent tweak gives."""
    with new_store(tmp_path / "s") as e:
        v = e.create_volume("v", MiB, encrypt=PW)
        e.write(v.id, 0, os.urandom(4 * BS))
        e.create_snapshot("v", "s")
        c = e.clone("v", "s", "c")
        e._c_redirect = True
        e.write(v.id, 9 * BS, PATTERN[:BS])
        e._c_redirect = False
        e.write(c.id, 9 * BS, PATTERN[:BS])
        pv, pc = pbn_of(e, v.id, 9), pbn_of(e, c.id, 9)
        assert pv != pc
        assert e.pool.read(pv, BS) == e.pool.read(pc, BS) != PATTERN[:BS]
        # a block the clone shares with its origin decrypts alike in both
        assert e.read(c.id, 0, 4 * BS) == e.read(v.id, 0, 4 * BS)


def test_seam_refuses_a_missing_lba_and_sub_block_raw_io(tmp_path: Path) -> None:
    with new_store(tmp_path / "s") as e:
        v = e.create_volume("v", MiB, encrypt=PW)
        e.write(v.id, 3 * BS, PATTERN[:BS])
        pbn = pbn_of(e, v.id, 3)
        with pytest.raises(errors.SnapdiskError):  # never a guessed tweak
            e.pool.read(pbn, BS, vol=v.id)
        assert e.pool.read(pbn, BS, vol=v.id, lba=3) == PATTERN[:BS]
        stored = e.pool.read(pbn, BS)
        e.lock("v")
        with raw_io():  # a locked volume's blocks, as stored
            assert e.pool.read(pbn, BS, vol=v.id) == stored
            with pytest.raises(errors.SnapdiskError):
                e.pool.read(pbn, 100, vol=v.id)
            with pytest.raises(errors.SnapdiskError):
                e.write(v.id, 3 * BS + 1, b"x")
        with pytest.raises(errors.BadKey):  # out of raw mode: locked again
            e.pool.read(pbn, BS, vol=v.id, lba=3)


def test_the_tweak_mode_is_authenticated_and_checked() -> None:
    key = keys.new_data_key()
    rec = keys.wrap(key, PW)
    assert rec["tweak"] == "lba" and keys.record_problem(rec) is None
    assert keys.unwrap(rec, PW) == key
    legacy = {k: v for k, v in rec.items() if k != "tweak"}  # the mode is in the GCM's AAD
    with pytest.raises(errors.BadKey):
        keys.unwrap(legacy, PW)
    with pytest.raises(errors.BadKey):
        keys.unwrap({**rec, "tweak": "other"}, PW)
    old = keys.wrap(key, PW, rec["key_id"], keys.TWEAK_PBN)
    assert "tweak" not in old and keys.tweak_mode(old) == "pbn"
    assert "only 'lba'" in (keys.record_problem(old) or "")
    assert keys.record_problem({**rec, "wrapped": "AAAA"}) == "a bad wrapped"


# ---- send | receive ---------------------------------------------------------------------------

def send(e: Engine, ref: str, base: str | None = None) -> tuple[bytes, dict]:
    vol, snap = ref.split("@")
    out = io.BytesIO()
    summary = e.send_stream(vol, snap, out, base)
    return out.getvalue(), summary


def receive(e: Engine, volume: str, raw: bytes, **kw: object) -> dict:
    return e.receive_stream(volume, io.BytesIO(raw), **kw)  # type: ignore[arg-type]


def write_chain(e: Engine, name: str, rnd: random.Random) -> None:
    """Snapshots s0 < s1 < s2 of an encrypted volume holding the known pattern (aligned,
    unaligned, sub-block, rewritten in place and redirected), random data, trims."""
    vol = e.volume_id(name)
    for i in range(6):
        e.write(vol, i * 3 * BS + (i * 512) % BS, PATTERN)
    e.write(vol, 2 * MiB, rnd.randbytes(MiB))
    e.create_snapshot(name, "s0")
    e.write(vol, 1024, PATTERN[:3072])  # redirected
    e.write(vol, 5 * MiB + 100, PATTERN)
    e.trim(vol, 2 * MiB + 64 * BS, 32 * BS)
    e.create_snapshot(name, "s1")
    e.write(vol, 5 * MiB + 4 * BS, PATTERN[:BS])
    for _ in range(20):
        e.write(vol, rnd.randrange(SIZE // BS) * BS, rnd.randbytes(BS))
    e.create_snapshot(name, "s2")


def same_snapshots(a: Engine, av: str, b: Engine, bv: str, snaps: list[str]) -> None:
    va, vb = a.volume_id(av), b.volume_id(bv)
    for s in snaps:
        want = a.read_snapshot(va, a.snapshot_id(av, s), 0, SIZE)
        assert b.read_snapshot(vb, b.snapshot_id(bv, s), 0, SIZE) == want, s
    assert b.read(vb, 0, SIZE) == b.read_snapshot(vb, b.snapshot_id(bv, snaps[-1]), 0, SIZE)


def test_raw_send_receive_without_the_key(tmp_path: Path) -> None:
    a = new_store(tmp_path / "a")
    b_path = str(tmp_path / "b")
    try:
        a.create_volume("sec", SIZE, encrypt=PW)
        write_chain(a, "sec", random.Random(1))
        streams = [send(a, "sec@s0"), send(a, "sec@s1", "s0"), send(a, "sec@s2", "s1")]
        for raw, summary in streams:
            assert summary["encrypted"] and summary["zero_bytes"] == 0
            assert raw[8:10] == b"\2\0"  # stream format version 2
        # the stream holds the key record, not the key, and no plaintext
        h = stream.StreamReader(io.BytesIO(streams[0][0])).header()
        assert h.encryption is not None and h.encryption["tweak"] == "lba"
        assert h.encryption["key_id"] == a.key_info("sec")["key_id"]
        key = data_key(a, "sec")
        assert key not in streams[0][0] and key.hex().encode() not in streams[0][0]
        sfile = tmp_path / "streams"
        sfile.mkdir()
        (sfile / "all").write_bytes(b"".join(r for r, _ in streams))
        assert plaintext_hits(str(sfile), PATTERN) == []
        a.lock("sec")  # the sender needs no key either
        streams.append(send(a, "sec@s2"))
        a.unlock("sec", PW)
        # the receiver never sees the key
        with Engine.create(b_path, StoreConfig(pool_bytes=256 * MiB)) as b:
            got = receive(b, "dr", streams[0][0])
            assert got["encrypted"]
            info = b.volume_info("dr")
            assert info.encrypted and info.locked
            assert b.native.vol_key_state(info.id) == KEY_LOCKED
            receive(b, "dr", streams[1][0])
            receive(b, "dr", streams[2][0])
            receive(b, "dr2", streams[3][0])  # the full stream of a locked sender
            assert b.keyring.ids() == []
            assert b.check().ok
        assert plaintext_hits(b_path, PATTERN) == []
        # unlocked with the sender's passphrase: every snapshot byte for byte
        with Engine.open(b_path) as b:
            with pytest.raises(errors.BadKey):
                b.read(b.volume_id("dr"), 0, BS)
            b.unlock("dr", PW)
            same_snapshots(a, "sec", b, "dr", ["s0", "s1", "s2"])
            b.unlock("dr2", PW)
            same_snapshots(a, "sec", b, "dr2", ["s2"])
    finally:
        a.close()


def test_the_scan_finds_plaintext_of_a_plain_receive(stores: tuple[Engine, Engine]) -> None:
    """The control: the same steps with a plain volume leave the pattern on the receiver."""
    a, b = stores
    a.create_volume("p", SIZE)
    a.write(a.volume_id("p"), 0, PATTERN)
    a.create_snapshot("p", "s0")
    raw, summary = send(a, "p@s0")
    assert not summary["encrypted"] and raw[8:10] == b"\1\0"  # plain: version 1, as before
    receive(b, "p", raw)
    b.flush()
    assert plaintext_hits(b.path, PATTERN) != []


def test_key_file_volume_and_clone_round_trip(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    v = a.create_volume("k", SIZE, encrypt=KEY_FILE)
    a.write(v.id, 7 * BS, PATTERN)
    a.create_snapshot("k", "s0")
    c = a.clone("k", "s0", "kc")  # a clone shares blocks and key: sent raw as well
    a.write(c.id, 8 * BS + 17, PATTERN[:100])
    a.create_snapshot("kc", "s1")
    receive(b, "k", send(a, "k@s0")[0])
    receive(b, "kc", send(a, "kc@s1")[0])
    assert b.volume_info("kc").locked
    with pytest.raises(errors.BadKey):
        b.unlock("k", PW)
    b.unlock("kc", KEY_FILE)  # one key id on the receiver: both unlock
    assert not b.volume_info("k").locked
    same_snapshots(a, "k", b, "k", ["s0"])
    same_snapshots(a, "kc", b, "kc", ["s1"])


def test_incremental_needs_the_same_key(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    a.create_volume("sec", SIZE, encrypt=PW)
    write_chain(a, "sec", random.Random(2))
    receive(b, "dr", send(a, "sec@s0")[0])
    before = b.volume_info("dr")
    # another key: a copy under a new key (its own guids too, but the key is checked first)
    a.copy_snapshot("sec", "s1", "other", mode="encrypt", secret=PW)
    a.create_snapshot("other", "s0")
    a.write(a.volume_id("other"), 0, b"o" * BS)
    a.create_snapshot("other", "s1")
    with pytest.raises(errors.InvalidArgument, match="same key") as e:
        receive(b, "dr", send(a, "other@s1", "s0")[0])
    assert a.key_info("other")["key_id"] in e.value.message
    # a plain stream onto the encrypted volume, and an encrypted one onto a plain volume
    a.create_volume("p", SIZE)
    a.create_snapshot("p", "s0")
    a.create_snapshot("p", "s1")
    with pytest.raises(errors.InvalidArgument, match="the stream is plain"):
        receive(b, "dr", send(a, "p@s1", "s0")[0])
    receive(b, "pl", send(a, "p@s0")[0])
    with pytest.raises(errors.InvalidArgument, match="encrypted under key id"):
        receive(b, "pl", send(a, "sec@s1", "s0")[0])
    after = b.volume_info("dr")
    assert (after.snapshots_manual, after.live_bytes) == (before.snapshots_manual,
                                                          before.live_bytes)
    receive(b, "dr", send(a, "sec@s1", "s0")[0])  # the right key still applies
    b.unlock("dr", PW)
    same_snapshots(a, "sec", b, "dr", ["s0", "s1"])


def test_tampered_or_bad_encryption_header_is_refused(stores: tuple[Engine, Engine]) -> None:
    a, b = stores
    a.create_volume("sec", SIZE, encrypt=PW)
    a.write(a.volume_id("sec"), 0, PATTERN)
    a.create_snapshot("sec", "s0")
    raw, _ = send(a, "sec@s0")
    h = stream.StreamReader(io.BytesIO(raw)).header()
    assert h.encryption is not None
    for mangle in (lambda e: e["record"].pop("wrapped"),
                   lambda e: e.update(key_id="0" * 32),
                   lambda e: e["record"].update(tweak="pbn")):
        meta = json.loads(json.dumps(h.meta))
        mangle(meta["encryption"])
        out = io.BytesIO()
        w = stream.StreamWriter(out, stream.Header(h.size_bytes, meta))
        w.finish()
        with pytest.raises(errors.FormatError, match="encryption"):
            receive(b, "x", out.getvalue())
    # cut, or a flipped ciphertext byte: refused, nothing left behind (the same undo as plain)
    for bad in (raw[:len(raw) // 2], raw[:3000] + bytes([raw[3000] ^ 1]) + raw[3001:]):
        with pytest.raises(errors.FormatError):
            receive(b, "x", bad)
        assert [v.name for v in b.list_volumes()] == []
    # a version 1 (plain) header on an encrypted stream: never written as plain data
    with pytest.raises(errors.FormatError, match="version 1 .* names an encryption"):
        receive(b, "x", raw[:8] + b"\1\0" + raw[10:])
    assert [v.name for v in b.list_volumes()] == []


def test_legacy_pbn_volume_is_refused_with_the_conversion_hint(stores: tuple[Engine, Engine],
                                                               ) -> None:
    a, b = stores
    a.create_volume("old", SIZE, encrypt=PW)
    make_legacy(a, "old")
    a.write(a.volume_id("old"), 0, PATTERN)
    a.create_snapshot("old", "s0")
    with pytest.raises(errors.Unsupported, match="legacy") as e:
        send(a, "old@s0")
    assert "snapshot copy old@SNAP NEWVOL --encrypt" in e.value.message
    # the conversion the message names: then it sends raw
    a.copy_snapshot("old", "s0", "new", mode="encrypt", secret=PW)
    assert a.key_info("new")["tweak"] == "lba"
    a.create_snapshot("new", "s0")
    receive(b, "new", send(a, "new@s0")[0])
    b.unlock("new", PW)
    assert b.read(b.volume_id("new"), 0, len(PATTERN)) == PATTERN


def test_old_store_format_is_migrated_and_legacy_volumes_still_read(tmp_path: Path) -> None:
    """A format-2 store (legacy volumes): opening it migrates to 3 and changes no record; its
    encrypted volume still unlocks and reads (pbn tweak)."""
    from snapdisk import layout
    from snapdisk.layout import DB_META
    path = str(tmp_path / "s")
    with new_store(Path(path)) as e:
        v = e.create_volume("old", MiB, encrypt=PW)
        make_legacy(e, "old")
        e.write(v.id, 0, PATTERN)
        with e.native.txn(write=True) as t:
            t.put(DB_META, layout.META_FORMAT, layout.encode_u32(2))
            vols = dict(t.scan(layout.DB_VOLUMES, b""))
    with Engine.open(path) as e:
        with e.native.txn() as t:
            assert layout.decode_u32(t.get(DB_META, layout.META_FORMAT), "f") == 3
            assert dict(t.scan(layout.DB_VOLUMES, b"")) == vols
        e.unlock("old", PW)
        assert e.key_info("old")["tweak"] == "pbn"
        assert e.read(v.id, 0, len(PATTERN)) == PATTERN


# ---- backup | restore (real radosgw) --------------------------------------------------------

def test_raw_backup_and_restore_without_the_key(tmp_path: Path, s3_url: str) -> None:
    a = new_store(tmp_path / "a")
    b_path = str(tmp_path / "b")
    try:
        a.create_volume("sec", SIZE, encrypt=PW)
        write_chain(a, "sec", random.Random(3))
        full = a.backup("sec", "s0", s3_url)
        a.lock("sec")  # backs up locked too: raw
        inc = a.backup("sec", "s1", s3_url)
        assert full["encrypted"] and inc["encrypted"] and inc["base"] == full["name"]
        a.unlock("sec", PW)
        from snapdisk.backup import Repository
        r = Repository.open(s3_url)
        m = r.manifest(inc["name"])
        with a.native.txn() as t:
            assert m.encryption is not None
            assert m.encryption["record"] == encryption.record(t, a.volume_id("sec"))
        assert m.encryption["key_id"] == a.key_info("sec")["key_id"]
        raw_manifest = r.bucket.get(m.name)
        assert backup_repo.decode_manifest(raw_manifest, m.name).encryption == m.encryption
        # no chunk holds plaintext, nor the data key
        key = data_key(a, "sec")
        objs = tmp_path / "objects"
        objs.mkdir()
        for k in m.chunk_keys():
            body = bytes(r.fetch(k))
            assert key not in body
            (objs / k).write_bytes(body)
        assert plaintext_hits(str(objs), PATTERN) == []
        with Engine.create(b_path, StoreConfig(pool_bytes=256 * MiB)) as b:
            got = b.restore_backup(s3_url, "sec", "s1", "dr")
            assert got["encrypted"] and got["locked"]
            assert b.keyring.ids() == []
            b.restore_backup(s3_url, "sec", "s0", "dr0")
            assert b.check().ok
        assert plaintext_hits(b_path, PATTERN) == []
        with Engine.open(b_path) as b:
            b.unlock("dr", PW)
            same_snapshots(a, "sec", b, "dr", ["s1"])
            b.unlock("dr0", PW)
            same_snapshots(a, "sec", b, "dr0", ["s0"])
        # verify and list see an encrypted backup like any
        from snapdisk import backup
        assert backup.verify(s3_url, "sec", "s1")["ok"]
        assert all(x["encrypted"] for x in backup.list_backups(s3_url) if x["volume"] == "sec")
    finally:
        a.close()


def test_legacy_volume_backup_is_refused(tmp_path: Path, s3_url: str) -> None:
    with new_store(tmp_path / "a") as a:
        a.create_volume("old", SIZE, encrypt=PW)
        make_legacy(a, "old")
        a.create_snapshot("old", "s0")
        with pytest.raises(errors.Unsupported, match="snapshot copy old@SNAP NEWVOL --encrypt"):
            a.backup("old", "s0", s3_url)


def test_cli_send_receive_unlock_offline(tmp_path: Path) -> None:
    """The same commands as for plain volumes, offline (each command opens its store, so the
    sender is locked): `send -o`, `receive -i`, `key unlock` with the sender's passphrase."""
    from e2e_helpers import run_cli
    sa, sb = str(tmp_path / "a"), str(tmp_path / "b")
    pw = tmp_path / "pw"
    pw.write_text("open sesame\n")
    with new_store(Path(sa)) as a:
        v = a.create_volume("sec", SIZE, encrypt=PW)
        a.write(v.id, 0, PATTERN)
        a.create_snapshot("sec", "s0")
        want = a.read(v.id, 0, len(PATTERN))
    new_store(Path(sb)).close()
    out = tmp_path / "s.sdstream"
    sent = run_cli(sa, "--json", "send", "sec@s0", "-o", str(out)).json()
    assert sent["encrypted"] is True
    got = run_cli(sb, "--json", "receive", "dr", "-i", str(out)).json()
    assert got["encrypted"] is True
    assert "LOCKED" in run_cli(sb, "volume", "list").stdout
    assert run_cli(sb, "--json", "key", "info", "dr").json()["tweak"] == "lba"
    run_cli(sb, "key", "unlock", "dr", "--passphrase-file", str(pw))
    with Engine.open(sb) as b:
        b.unlock("dr", PW)
        assert b.read(b.volume_id("dr"), 0, len(PATTERN)) == want
    assert plaintext_hits(sb, PATTERN) == []


def test_through_servers_without_the_key(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    """Both stores served: the sender unlocked and written over NBD, the CLI pipe through both
    control sockets; the receiving server never gets the key until unlocked with the sender's
    passphrase, then qemu-img compares the snapshots over NBD; no plaintext under it."""
    from test_sendrecv import CLI, qemu_compare, sh
    sa_path, sb_path = tmp_path / "a", tmp_path / "b"
    with new_store(sa_path) as e:
        e.create_volume("v", SIZE, encrypt=PW)
    new_store(sb_path).close()
    sa, sb = served(str(sa_path)), served(str(sb_path))
    sa.call("key.unlock", volume="v", passphrase="open sesame")
    h = sa.connect("v")
    for i in range(6):
        h.pwrite(PATTERN, i * 5 * BS + (i * 512) % BS)
    h.flush()
    h.shutdown()
    sa.call("snapshot.create", volume="v", name="s0")
    sh(f"{CLI} --store {sa.store} send v@s0 | {CLI} --store {sb.store} receive w", tmp_path)
    h = sa.connect("v")
    h.pwrite(PATTERN[:5120], 7 * BS + 512)
    h.flush()
    h.shutdown()
    sa.call("snapshot.create", volume="v", name="s1")
    sh(f"{CLI} --store {sa.store} send v@s1 --from v@s0 | {CLI} --store {sb.store} receive w",
       tmp_path)
    info = sb.call("volume.info", name="w")
    assert info["encrypted"] and info["locked"]  # type: ignore[index]
    sb.call("key.unlock", volume="w", passphrase="open sesame")
    for s in ("s0", "s1"):
        qemu_compare(sa.uri(f"v@{s}"), sb.uri(f"w@{s}"))
    sb.call("stop")
    assert plaintext_hits(str(sb_path), PATTERN) == []
