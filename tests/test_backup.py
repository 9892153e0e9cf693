"""Backups against a real S3 server the tests start (tests/radosgw.py: one-node Ceph radosgw on
127.0.0.1, memstore): full and incremental backups, restore into a second store compared byte
for byte, dedup, prune, radosgw killed mid-backup, a deleted chunk, encrypted volumes, the CLI
offline and through a running server (with qemu-img compare over the NBD exports)."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from conftest import new_store, served_store
from e2e_helpers import run_cli
from radosgw import Radosgw

from snapdisk import backup, backup_repo, backup_restore, catalog, errors, extmap, keys
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

pytest_plugins = ["s3_fixture"]

MiB = 1 << 20
BS = 4096
SIZE = 24 * MiB


def fill(e: Engine, name: str, rng: random.Random) -> int:
    """A volume with random data, a run of zeros (written), and holes."""
    e.create_volume(name, SIZE)
    vol = e.volume_id(name)
    e.write(vol, 0, rng.randbytes(5 * MiB + 3 * BS))
    e.write(vol, 9 * MiB, bytes(2 * MiB))  # written zeros: restored as a hole
    e.write(vol, 16 * MiB - BS, rng.randbytes(3 * BS))  # across a chunk window
    return vol


def scatter(e: Engine, vol: int, rng: random.Random, n: int) -> int:
    for _ in range(n):
        off = rng.randrange(SIZE // BS) * BS
        if not 9 * MiB <= off < 11 * MiB:  # the written zeros stay zeros (same() checks them)
            e.write(vol, off, rng.randbytes(BS))
    e.trim(vol, 2 * MiB, 64 * 1024)
    return n * BS


def same(a: Engine, vol: int, snap: str, b: Engine, name: str) -> None:
    epoch = a.snapshot_id(a_name(a, vol), snap)
    want = a.read_snapshot(vol, epoch, 0, SIZE)
    wid = b.volume_id(name)
    assert b.read(wid, 0, SIZE) == want
    restored_snap = b.snapshot_id(name, snap)
    assert b.read_snapshot(wid, restored_snap, 0, SIZE) == want
    # holes stay holes: nothing is allocated where the source has a hole or wrote zeros
    mapped = sum(n for _, n, a in b.block_status(wid, 0, SIZE) if a)
    assert mapped <= sum(n for _, n, x in a.snapshot_block_status(vol, epoch, 0, SIZE) if x)
    assert not any(x for _, _, x in b.block_status(wid, 9 * MiB, 2 * MiB))


def a_name(e: Engine, vol: int) -> str:
    return next(v.name for v in e.list_volumes() if v.id == vol)


def test_full_then_incremental_restore_elsewhere(stores: tuple[Engine, Engine],
                                                 s3_url: str) -> None:
    a, b = stores
    rng = random.Random(1)
    vol = fill(a, "web", rng)
    a.create_snapshot("web", "s1")
    full = a.backup("web", "s1", s3_url)
    assert full["base"] is None and full["uploaded_bytes"] == full["mapped_bytes"]
    assert full["mapped_bytes"] == 5 * MiB + 6 * BS  # the written zeros are not uploaded
    changed = scatter(a, vol, rng, 40)
    a.create_snapshot("web", "s2")
    inc = a.backup("web", "s2", s3_url)
    assert inc["base"] == full["name"]
    # only changed ranges were read and uploaded (block granular: no whole chunks)
    assert inc["changed_bytes"] <= changed and inc["uploaded_bytes"] <= changed
    again = a.backup("web", "s2", s3_url)
    assert again["already_backed_up"] and again["uploaded_bytes"] == 0
    names = [x["snapshot"] for x in backup.list_backups(s3_url)]
    assert names == ["s1", "s2"]
    for snap, new in (("s1", "r1"), ("s2", "r2")):
        b.restore_backup(s3_url, "web", snap, new)
        same(a, vol, snap, b, new)
    assert backup.verify(s3_url, "web", "s2")["ok"]


def test_clone_backup_deduplicates(stores: tuple[Engine, Engine], s3_url: str) -> None:
    a, _ = stores
    fill(a, "web", random.Random(2))
    a.create_snapshot("web", "s1")
    first = a.backup("web", "s1", s3_url)
    a.clone("web", "s1", "web-clone")
    a.write(a.volume_id("web-clone"), 20 * MiB, b"c" * BS)
    a.create_snapshot("web-clone", "c1")
    r = a.backup("web-clone", "c1", s3_url)
    assert r["base"] is None  # another volume: a full backup...
    assert r["uploaded_chunks"] <= 1 and r["uploaded_bytes"] <= BS  # ...of almost nothing new
    assert r["reused_chunks"] == first["uploaded_chunks"]


def test_prune_keeps_what_is_referenced(stores: tuple[Engine, Engine], s3_url: str) -> None:
    a, b = stores
    rng = random.Random(3)
    vol = fill(a, "web", rng)
    a.create_snapshot("web", "s1")
    a.backup("web", "s1", s3_url)
    for i in (2, 3):  # s3 rewrites the blocks s2 changed: s2's own chunk is no longer needed
        a.write(vol, 3 * MiB, rng.randbytes(2 * BS))
        a.write(vol, 20 * MiB, rng.randbytes(BS))
        a.create_snapshot("web", f"s{i}")
        assert a.backup("web", f"s{i}", s3_url)["uploaded_chunks"] == 1
    r = backup.prune(s3_url, keep_last=1)
    assert [backup_repo.parse_manifest_name(n)[2] for n in r["deleted_backups"]] == ["s1", "s2"]
    assert r["deleted_chunks"] == 1  # s2's; s1's are still named by s3
    assert [x["snapshot"] for x in backup.list_backups(s3_url)] == ["s3"]
    assert backup.verify(s3_url, "web", "s3")["ok"]
    b.restore_backup(s3_url, "web", "s3", "r3")
    same(a, vol, "s3", b, "r3")
    assert backup.prune(s3_url, keep_days=1)["deleted_chunks"] == 0
    assert backup.prune(s3_url, keep_last=0)["kept_chunks"] == 0
    assert backup.list_backups(s3_url) == []


def test_radosgw_killed_mid_backup_then_resumed(
        s3_server: Radosgw, stores: tuple[Engine, Engine], s3_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = stores
    monkeypatch.setattr(backup, "THREADS", 2)  # few uploads in flight: the kill is midway
    vol = fill(a, "web", random.Random(4))
    a.write(vol, 11 * MiB, random.Random(5).randbytes(4 * MiB))
    a.create_snapshot("web", "s1")
    seen = []

    def kill_midway(done: int, total: int) -> None:
        seen.append(done)
        if done >= 3 * MiB and s3_server.pids.get("client.rgw.gw"):
            s3_server.kill_rgw()

    try:
        with pytest.raises(errors.SnapdiskError):
            a.backup("web", "s1", s3_url, progress=kill_midway)
    finally:
        s3_server.start_rgw()
    assert backup.list_backups(s3_url) == []  # invisible: no manifest
    r = a.backup("web", "s1", s3_url, resume=True)
    assert 0 < r["uploaded_bytes"] < r["mapped_bytes"]  # what the first run uploaded stays
    assert backup.verify(s3_url, "web", "s1")["ok"]
    b.restore_backup(s3_url, "web", "s1", "r1")
    same(a, vol, "s1", b, "r1")


def test_deleted_chunk_found_by_verify_and_refused_by_restore(
        s3_server: Radosgw, stores: tuple[Engine, Engine], s3_url: str) -> None:
    a, b = stores
    fill(a, "web", random.Random(6))
    a.create_snapshot("web", "s1")
    a.backup("web", "s1", s3_url)
    r = backup.Repository.open(s3_url)
    m = r.find("web", "s1")
    victim = m.chunk_keys()[-1]
    saved = r.bucket.get(backup_repo.chunk_name(victim))
    r.bucket.delete([backup_repo.chunk_name(victim)])
    with pytest.raises(errors.Corrupt, match=f"chunk {victim} .*missing"):
        backup.verify(s3_url, "web", "s1")
    with pytest.raises(errors.Corrupt, match=f"chunk {victim}"):
        b.restore_backup(s3_url, "web", "s1", "r1")
    assert [v.name for v in b.list_volumes()] == []  # nothing half-made left
    # a damaged chunk (a flipped byte) likewise; the missing one is back (restore fetches
    # in parallel: with two bad chunks, either may be the one named)
    r.bucket.put(backup_repo.chunk_name(victim), saved)
    other = m.chunk_keys()[0]
    raw = bytearray(r.bucket.get(backup_repo.chunk_name(other)))
    raw[-1] ^= 1
    r.bucket.put(backup_repo.chunk_name(other), bytes(raw))
    with pytest.raises(errors.Corrupt, match=f"chunk {other}.*checksum"):
        b.restore_backup(s3_url, "web", "s1", "r1")
    assert [v.name for v in b.list_volumes()] == []


def test_restore_leftover_of_a_crash_is_cleaned(stores: tuple[Engine, Engine],
                                                s3_url: str) -> None:
    a, b = stores
    fill(a, "web", random.Random(7))
    a.create_snapshot("web", "s1")
    a.backup("web", "s1", s3_url)
    with b.native.txn(write=True) as t:  # what a kill -9 mid-restore leaves
        catalog.new_volume(t, backup_restore.HIDDEN + "dead", SIZE, None,
                           {backup_restore.MARKER: {"name": "r0"}})
    b.restore_backup(s3_url, "web", "s1", "r1")
    assert [v.name for v in b.list_volumes()] == ["r1"]
    with pytest.raises(errors.AlreadyExists):
        b.restore_backup(s3_url, "web", "s1", "r1")


def test_restore_leftover_is_cleaned_when_the_store_opens(tmp_path: Path) -> None:
    e = new_store(tmp_path / "s")
    e.create_volume("keep", SIZE)
    with e.native.txn(write=True) as t:  # what a kill -9 mid-restore leaves
        catalog.new_volume(t, backup_restore.HIDDEN + "dead", SIZE, None,
                           {backup_restore.MARKER: {"name": "r0"}})
    e.close()
    e = Engine.open(str(tmp_path / "s"))
    try:
        assert [v.name for v in e.list_volumes()] == ["keep"]
        assert e.check().ok
    finally:
        e.close()


def test_encrypted_volume_is_refused(stores: tuple[Engine, Engine], s3_url: str) -> None:
    """A legacy (pbn-tweak) encrypted volume; new ones are backed up raw
    (test_raw_encrypted.py)."""
    from crypto_helpers import make_legacy
    a, _ = stores
    a.create_volume("sec", 4 * MiB, encrypt=keys.Secret(passphrase=b"pw"))
    make_legacy(a, "sec", keys.Secret(passphrase=b"pw"))
    a.write(a.volume_id("sec"), 0, b"s" * BS)
    a.create_snapshot("sec", "s1")
    with pytest.raises(errors.Unsupported, match="physical block number.*--decrypt"):
        a.backup("sec", "s1", s3_url)
    # the workaround works
    a.copy_snapshot("sec", "s1", "sec-plain", mode="decrypt")
    a.create_snapshot("sec-plain", "s1")
    assert a.backup("sec-plain", "s1", s3_url)["mapped_bytes"] == BS


def test_cli_offline_and_through_the_server(s3_server: Radosgw, tmp_path: Path,
                                            s3_url: str) -> None:
    sa, sb = str(tmp_path / "a"), str(tmp_path / "b")
    with new_store(Path(sa)) as a:
        vol = fill(a, "web", random.Random(8))
        a.create_snapshot("web", "s1")
    # offline: no server runs for store a
    r = run_cli(sa, "--json", "backup", "web@s1", s3_url).json()
    assert r["base"] is None and r["uploaded_chunks"] > 0
    out = run_cli(sa, "backup", "list", s3_url).stdout
    assert "web" in out and "s1" in out and "full" in out
    # no store at all: list and verify still work
    assert run_cli(str(tmp_path / "none"), "--json", "backup", "verify", s3_url,
                   "web@s1").json()["ok"]
    with served_store(sa) as srv_a:
        with srv_a.client() as c:
            c.call("snapshot.create", volume="web", name="s2")
            c.call("volume.info", name="web")
        r2 = run_cli(sa, "--json", "backup", "web@s2", s3_url, "--resume").json()
        assert r2["base"] == r["name"] and r2["uploaded_bytes"] == 0
        bad = run_cli(sa, "--json", "backup", "verify", s3_url, "web@nope", check=False)
        assert bad.returncode == errors.NotFound.exit_code and "web@s1" in bad.stderr
        with Engine.create(sb, StoreConfig(pool_bytes=256 * MiB)):
            pass
        with served_store(sb) as srv_b:
            got = run_cli(sb, "--json", "restore", s3_url, "web@s2", "copy").json()
            assert got["name"] == "copy" and got["snapshots"] == 1
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                  srv_a.uri("web@s2"), srv_b.uri("copy@s2")],
                                 capture_output=True, text=True, timeout=120)
            assert cmp.returncode == 0, cmp
        pr = run_cli(sa, "--json", "backup", "prune", s3_url, "--keep-last", "1").json()
        assert len(pr["deleted_backups"]) == 1
    with Engine.open(sb) as b, Engine.open(sa) as a:
        same(a, vol, "s2", b, "copy")


def read_pieces_py(engine: Engine, vol: int, epoch: int, pieces: list[tuple[int, int]]
                   ) -> bytearray:
    """The Python twin of backup._read_pieces (xm_snap_readv): one map lookup for the whole span
    (extmap.view_at), then one pool read per (record, piece) overlap, found by sweeping both
    sorted lists together.  volume.read_snapshot of each piece costs ~0.2 ms (a lookup each),
    and of the whole span ~4 ms per MiB on a fragmented map."""
    lo = pieces[0][0] // BS
    hi = -(-sum(pieces[-1]) // BS)
    buf = bytearray(sum(n for _, n in pieces))  # zeros where no record (none, in a piece)
    view = memoryview(buf)
    read_into = engine.pool.read_into
    with engine.native.gate_shared(), engine.native.txn() as t:
        recs = extmap.view_at(t, vol, epoch, lo, hi)  # sorted, disjoint, not clipped
        i, pos = 0, 0
        for off, n in pieces:
            b0, b1 = off // BS, (off + n) // BS
            while i < len(recs) and recs[i].lba + recs[i].len <= b0:
                i += 1
            j = i
            while j < len(recs) and recs[j].lba < b1:
                r = recs[j]
                s, x = max(r.lba, b0), min(r.lba + r.len, b1)
                read_into(r.pbn + s - r.lba,
                          view[pos + (s - b0) * BS:pos + (x - b0) * BS], vol=vol,
                          lba=s)
                j += 1
            pos += n
    return buf


def test_read_pieces_equals_per_piece_snapshot_reads(tmp_path: Path) -> None:
    """_read_pieces (C: native.snap_readv) and its Python twin against read_snapshot of each
    piece: pieces inside one record, across several, with holes between
    them, and blocks overwritten after the snapshot (dead records the view must still see)."""
    rng = random.Random(7)
    with new_store(tmp_path / "a") as e:
        vol = fill(e, "v", rng)
        for _ in range(200):  # many small records
            e.write(vol, rng.randrange(SIZE // BS) * BS, rng.randbytes(BS))
        e.create_snapshot("v", "s")
        epoch = e.snapshot_id("v", "s")
        scatter(e, vol, rng, 100)  # after the snapshot: its view keeps the old records
        starts = sorted(rng.sample(range(0, SIZE // BS - 8, 9), 300))
        pieces = [(b * BS, rng.randrange(1, 9) * BS) for b in starts]
        want = b"".join(e.read_snapshot(vol, epoch, o, n) for o, n in pieces)
        assert bytes(backup._read_pieces(e, vol, epoch, pieces)) == want  # C
        assert bytes(read_pieces_py(e, vol, epoch, pieces)) == want  # its twin
        assert bytes(backup._read_pieces(e, vol, epoch, pieces[5:6])) == want[
            sum(n for _, n in pieces[:5]):sum(n for _, n in pieces[:6])]
        with pytest.raises(errors.NativeError):  # unsorted pieces are refused
            backup._read_pieces(e, vol, epoch, pieces[1:2] + pieces[:1])


def test_scattered_zero_and_data_pieces_restore_equal(stores: tuple[Engine, Engine],
                                                      s3_url: str) -> None:
    """An incremental of many scattered 4 KiB changes, every fifth of them zeros: the zero
    pieces are dropped from the middle of packed chunks (never uploaded, restored as holes),
    the rest restored byte for byte."""
    a, b = stores
    rng = random.Random(3)
    vol = fill(a, "db", rng)
    a.create_snapshot("db", "s1")
    a.backup("db", "s1", s3_url)
    # even blocks only: no two changes adjacent (a merged zero+data range is uploaded)
    blocks = rng.sample([x for x in range(0, SIZE // BS, 2) if not 9 * MiB <= x * BS < 11 * MiB],
                        600)
    for i, x in enumerate(blocks):
        a.write(vol, x * BS, bytes(BS) if i % 5 == 0 else rng.randbytes(BS))
    a.create_snapshot("db", "s2")
    inc = a.backup("db", "s2", s3_url)
    assert inc["uploaded_bytes"] == 480 * BS and inc["uploaded_chunks"] >= 2
    b.restore_backup(s3_url, "db", "s2", "r")
    same(a, vol, "s2", b, "r")
    wid = b.volume_id("r")
    assert not any(x for _, _, x in b.block_status(wid, blocks[0] * BS, BS))  # a zero piece
