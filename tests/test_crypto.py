"""Encrypted volumes end to end: the pool seam's cipher, keys over the control socket and the
CLI, locked volumes not served, and no plaintext anywhere under the store directory."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest
from conftest import Served
from e2e_helpers import (  # noqa: F401  (teardown is a fixture)
    Teardown,
    kill_pid,
    pid_alive,
    run_cli,
    server_pid,
    teardown,
)

from snapdisk import errors, keys
from snapdisk.engine import Engine
from snapdisk.native import KEY_LOCKED, KEY_PLAIN, KEY_UNLOCKED
from snapdisk.store import StoreConfig

BS = 4096
MiB = 1 << 20
PW = keys.Secret(passphrase=b"open sesame")
PATTERN = random.Random(11).randbytes(2 * BS)  # incompressible, no runs


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_SCRYPT_LOG2N", "10")  # servers started here inherit it


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.create(str(tmp_path / "store"), StoreConfig(pool_bytes=64 * MiB))
    try:
        yield e
    finally:
        e.close()


def plaintext_hits(root: str, pattern: bytes) -> list[str]:
    """Files under root holding any 16-byte window of pattern.  Any such window contains an
    8-byte window of pattern at an 8-aligned file offset: look those up, then confirm."""
    eights = {pattern[i:i + 8]: i for i in range(len(pattern) - 7)}
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = _data_regions(f)
            if _has_window(data, pattern, eights):
                hits.append(path)
    return hits


def _data_regions(f: object) -> bytes:
    fd = f.fileno()  # type: ignore[attr-defined]
    size = os.fstat(fd).st_size
    out, pos = bytearray(), 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % 8
        out += b"\0" * 16 + os.pread(fd, end - start, start)  # keep 8-alignment
        pos = end
    return bytes(out)


def _has_window(data: bytes, pattern: bytes, eights: dict[bytes, int]) -> bool:
    mv = memoryview(data)
    for off in range(0, len(data) - 7, 8):
        if bytes(mv[off:off + 8]) in eights:
            for j in range(max(0, off - 8), off + 1):
                if data[j:j + 16] and data[j:j + 16] in pattern and len(data[j:j + 16]) == 16:
                    return True
    return False


def test_the_scanner_finds_plaintext(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"\1" * 5 + PATTERN[100:117] + b"\2" * 3)
    assert plaintext_hits(str(tmp_path), PATTERN) == [str(tmp_path / "f")]
    (tmp_path / "f").write_bytes(PATTERN[100:115])  # 15 bytes: no 16-byte window
    assert plaintext_hits(str(tmp_path), PATTERN) == []


# ---- the engine -------------------------------------------------------------------------------

@pytest.mark.parametrize("c_path", [True, False])
def test_round_trip_snapshot_clone_rollback(engine: Engine, c_path: bool) -> None:
    engine._c_redirect = c_path
    v = engine.create_volume("v", 8 * MiB, encrypt=PW)
    assert v.encrypted and not v.locked
    assert engine.native.vol_key_state(v.id) == KEY_UNLOCKED
    engine.write(v.id, 0, PATTERN)
    engine.write(v.id, 3 * BS + 100, PATTERN[:5000])  # sub-block, across blocks, new blocks
    engine.write(v.id, 700, b"x" * 10)  # sub-block, in place
    expect = bytearray(8 * BS)
    expect[:len(PATTERN)] = PATTERN
    expect[3 * BS + 100:3 * BS + 5100] = PATTERN[:5000]
    expect[700:710] = b"x" * 10
    assert engine.read(v.id, 0, len(expect)) == expect
    snap = engine.create_snapshot("v", "s1")
    engine.write(v.id, 0, b"y" * (2 * BS + 3))  # redirected (held by the snapshot)
    assert engine.read_snapshot(v.id, snap.id, 0, len(expect)) == expect
    c = engine.clone("v", "s1", "c")
    assert c.encrypted and not c.locked
    assert engine.read(c.id, 0, len(expect)) == expect
    engine.write(c.id, BS + 1, b"c" * 100)
    engine.rollback("v", "s1")
    assert engine.read(v.id, 0, len(expect)) == expect
    # The pool holds ciphertext: the raw block (no volume, no key) is not the data.
    raw = engine.pool.read(1, BS)  # some block of the volume, read without the cipher
    assert PATTERN[:16] not in raw and raw != PATTERN[:BS]
    assert plaintext_hits(engine.path, PATTERN) == []


def test_locked_volume_serves_nothing_and_writes_nothing(engine: Engine) -> None:
    v = engine.create_volume("v", MiB, encrypt=PW)
    engine.write(v.id, 0, PATTERN)
    engine.create_snapshot("v", "s")
    info = engine.lock("v")
    assert info["locked"] and engine.volume_info("v").locked
    assert engine.native.vol_key_state(v.id) == KEY_LOCKED
    usage = engine.volume_info("v").live_bytes
    for op in (lambda: engine.read(v.id, 0, BS), lambda: engine.write(v.id, 0, b"z" * BS),
               lambda: engine.write(v.id, 10 * BS + 1, b"z"),
               lambda: engine.read_snapshot(v.id, 1, 0, BS)):
        with pytest.raises(errors.BadKey):
            op()
    assert engine.volume_info("v").live_bytes == usage
    engine.unlock("v", PW)
    assert engine.read(v.id, 0, len(PATTERN)) == PATTERN


def test_reopen_starts_locked_and_clones_share_the_key(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    with Engine.create(path, StoreConfig(pool_bytes=64 * MiB)) as e:
        v = e.create_volume("v", MiB, encrypt=PW)
        plain = e.create_volume("plain", MiB)
        e.write(v.id, 0, PATTERN)
        e.create_snapshot("v", "s")
        c = e.clone("v", "s", "c")
    with Engine.open(path) as e:
        state = {i.name: (i.encrypted, i.locked) for i in e.list_volumes()}
        assert state == {"v": (True, True), "c": (True, True), "plain": (False, False)}
        assert e.native.vol_key_state(plain.id) == KEY_PLAIN
        info = e.unlock("c", PW)  # unlocking the clone unlocks its origin: one key
        assert info["volumes"] == ["c", "v"] and not info["locked"]
        assert e.read(v.id, 0, len(PATTERN)) == PATTERN == e.read(c.id, 0, len(PATTERN))


def test_wrong_secret_changes_nothing_and_rotation(engine: Engine) -> None:
    v = engine.create_volume("v", MiB, encrypt=PW)
    engine.write(v.id, 0, PATTERN)
    engine.lock("v")
    before = engine.key_info("v")
    with pytest.raises(errors.BadKey):
        engine.unlock("v", keys.Secret(passphrase=b"open sesamE"))
    with pytest.raises(errors.BadKey):
        engine.unlock("v", keys.Secret(key_file=bytes(32)))
    with pytest.raises(errors.BadKey):
        engine.rotate_key("v", keys.Secret(passphrase=b"nope"), keys.Secret(passphrase=b"x"))
    assert engine.key_info("v") == before and engine.volume_info("v").locked
    new = keys.Secret(key_file=os.urandom(32))
    after = engine.rotate_key("v", PW, new)
    assert after["key_id"] == before["key_id"] and after["kek"] == {"kind": "key-file"}
    assert after["locked"]  # rotation does not unlock
    with pytest.raises(errors.BadKey):
        engine.unlock("v", PW)
    engine.unlock("v", new)
    assert engine.read(v.id, 0, len(PATTERN)) == PATTERN


def test_plain_volumes_are_not_converted_in_place(engine: Engine) -> None:
    engine.create_volume("p", MiB)
    with pytest.raises(errors.Unsupported, match="snapshot copy"):
        engine.unlock("p", PW)
    with pytest.raises(errors.Unsupported, match="snapshot copy"):
        engine.rotate_key("p", PW, PW)
    assert engine.key_info("p") == {"volume": "p", "encrypted": False}


# ---- over NBD and the control socket -------------------------------------------------------

def make_encrypted_store(path: Path) -> str:
    with Engine.create(str(path), StoreConfig(pool_bytes=128 * MiB)) as e:
        e.create_volume("sec", 16 * MiB, encrypt=PW)
        e.create_volume("plain", MiB)
    return str(path)


def test_nbd_round_trip_lock_and_unlock(tmp_path: Path, served: Callable[..., Served]) -> None:
    s = served(make_encrypted_store(tmp_path / "store"))
    with pytest.raises(nbd.Error):  # locked after the server starts: nothing served
        s.connect("sec")
    log = Path(s.store, "server.log").read_text()
    assert "encrypted and locked" in log
    with pytest.raises(errors.BadKey):
        s.call("key.unlock", volume="sec", passphrase="wrong")
    with pytest.raises(nbd.Error):
        s.connect("sec")
    info = s.call("key.unlock", volume="sec", passphrase="open sesame")
    assert isinstance(info, dict) and not info["locked"] and "wrapped" not in info
    h = s.connect("sec")
    h.pwrite(PATTERN, 0)
    h.pwrite(PATTERN[:1024], 5 * BS + 512)
    h.flush()
    s.call("snapshot.create", volume="sec", name="s1")
    h.pwrite(b"n" * BS, 0)
    assert h.pread(BS, 0) == b"n" * BS
    s.call("clone", volume="sec", snapshot="s1", name="cl")
    for export in ("sec@s1", "cl"):
        h2 = s.connect(export)
        assert h2.pread(len(PATTERN), 0) == PATTERN
        assert h2.pread(1024, 5 * BS + 512) == PATTERN[:1024]
        h2.shutdown()
    s.call("rollback", volume="sec", snapshot="s1", force=True)
    h = s.connect("sec")
    assert h.pread(len(PATTERN), 0) == PATTERN
    with pytest.raises(errors.Busy):  # clients connected: refused without force
        s.call("key.lock", volume="sec")
    out = s.call("key.lock", volume="sec", force=True)
    assert isinstance(out, dict) and out["locked"] and out["disconnected"] >= 1
    for export in ("sec", "sec@s1", "cl"):
        with pytest.raises(nbd.Error):
            s.connect(export)
    vols = {v["name"]: v for v in s.call("volume.list")}  # type: ignore[union-attr]
    assert vols["sec"]["locked"] and vols["cl"]["locked"] and not vols["plain"]["encrypted"]


def test_no_plaintext_under_the_store(tmp_path: Path, served: Callable[..., Served]) -> None:
    store = make_encrypted_store(tmp_path / "store")
    s = served(store)
    s.call("key.unlock", volume="sec", passphrase="open sesame")
    h = s.connect("sec")
    for i in range(8):  # aligned, unaligned, sub-block, rewritten in place and redirected
        h.pwrite(PATTERN, i * 3 * BS + (i * 512) % BS)
    h.flush()
    s.call("snapshot.create", volume="sec", name="a")
    h.pwrite(PATTERN[:3072], 1024)
    s.call("clone", volume="sec", snapshot="a", name="cl")
    h2 = s.connect("cl")
    h2.pwrite(PATTERN, 40 * BS + 1536)
    h2.flush()
    h2.shutdown()
    h.shutdown()
    s.call("rollback", volume="sec", snapshot="a")
    s.call("stop")
    assert plaintext_hits(store, PATTERN) == []


def test_cli_create_info_lock_unlock_rotate(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    run_cli(store, "init", "--pool-size", "64M")
    pw, pw2, kf = tmp_path / "pw", tmp_path / "pw2", tmp_path / "key"
    pw.write_text("s3cret passphrase\n")
    pw2.write_text("another one\n")
    kf.write_bytes(os.urandom(32))
    run_cli(store, "volume", "create", "v", "4M", "--encrypt", "--passphrase-file", str(pw))
    info = run_cli(store, "--json", "key", "info", "v").json()
    assert info["encrypted"] and info["kek"]["kdf"] == "scrypt" and info["volumes"] == ["v"]
    text = run_cli(store, "key", "info", "v").stdout
    assert "s3cret" not in text and info["key_id"] in text
    listing = run_cli(store, "volume", "list").stdout  # offline: each command opens the store
    assert "ENCRYPTED" in listing and "LOCKED" in listing
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    r = run_cli(store, "key", "unlock", "v", "--passphrase-file", str(bad), check=False)
    assert r.returncode == errors.BadKey.exit_code and "wrong" not in r.stdout
    run_cli(store, "key", "unlock", "v", "--passphrase-file", str(pw))
    run_cli(store, "key", "rotate", "v", "--passphrase-file", str(pw),
            "--new-key-file", str(kf))
    r = run_cli(store, "key", "unlock", "v", "--passphrase-file", str(pw), check=False)
    assert r.returncode == errors.BadKey.exit_code
    run_cli(store, "key", "rotate", "v", "--key-file", str(kf),
            "--new-passphrase-file", str(pw2))
    run_cli(store, "key", "unlock", "v", "--passphrase-file", str(pw2))
    r = run_cli(store, "volume", "create", "w", "4M", "--encrypt", check=False)
    assert r.returncode == errors.InvalidArgument.exit_code  # no terminal, no file
    run_cli(store, "volume", "create", "p", "4M")
    r = run_cli(store, "key", "unlock", "p", "--passphrase-file", str(pw), check=False)
    assert r.returncode == errors.Unsupported.exit_code and "snapshot copy" in r.stderr


def test_serve_unlock(tmp_path: Path, teardown: Teardown) -> None:  # noqa: F811
    store = str(tmp_path / "store")
    run_cli(store, "init", "--pool-size", "64M")
    pw, kf = tmp_path / "pw", tmp_path / "key"
    pw.write_text("open sesame\n")
    kf.write_bytes(os.urandom(32))
    run_cli(store, "volume", "create", "a", "4M", "--encrypt", "--passphrase-file", str(pw))
    run_cli(store, "volume", "create", "b", "4M", "--encrypt", "--key-file", str(kf))
    run_cli(store, "volume", "create", "c", "4M", "--encrypt", "--key-file", str(kf))
    r = run_cli(store, "--json", "serve", "--unlock", "a", "--passphrase-file", str(pw),
                "--unlock", "b", "--key-file", str(kf), check=False)
    pid = server_pid(store)
    if pid is not None:
        def stop() -> None:
            run_cli(store, "stop", check=False)
            if pid_alive(pid):
                kill_pid(pid)
        teardown.push(f"server {pid}", stop)
    assert r.returncode == 0, r
    assert r.json()["unlocked"] == ["a", "b"]
    state = {v["name"]: v["locked"] for v in run_cli(store, "--json", "volume", "list").json()}
    assert state == {"a": False, "b": False, "c": True}  # c has its own key (same key file)
    r = run_cli(store, "serve", "--unlock", "a", "--key-file", str(kf), "--unlock", "c",
                check=False)
    assert r.returncode != 0  # a second server is refused; c's secret is missing anyway


def test_pool_format_is_standard_xts_with_the_pbn_as_tweak(engine: Engine) -> None:
    """The documented format (docs/encryption.md): XTS on 4 KiB units, tweak = pbn, decryptable
    by an independent implementation with the data key."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    v = engine.create_volume("v", MiB, encrypt=PW)
    engine.write(v.id, 2 * BS, PATTERN[:BS])
    with engine.native.txn() as t:
        (rec,) = t.live_overlap(v.id, 2, 1)
    pbn = rec.pbn + 2 - rec.lba
    raw = engine.pool.read(pbn, BS)  # vol 0: the bytes as stored
    key_id = engine.key_info("v")["key_id"]
    key = engine.keyring.get(key_id)
    assert key is not None
    tweak = pbn.to_bytes(8, "little") + bytes(8)
    d = Cipher(algorithms.AES(bytes(key)), modes.XTS(tweak)).decryptor()
    assert d.update(raw) + d.finalize() == PATTERN[:BS]


def test_delete_wipes_the_key_when_no_volume_uses_it(engine: Engine) -> None:
    v = engine.create_volume("v", MiB, encrypt=PW)
    engine.create_snapshot("v", "s")
    c = engine.clone("v", "s", "c")
    key_id = engine.key_info("v")["key_id"]
    key = engine.keyring.get(key_id)
    engine.delete_volume("v")
    assert engine.native.vol_key_state(v.id) == KEY_PLAIN
    assert engine.keyring.get(key_id) is key  # the clone still uses it
    engine.delete_volume("c")
    assert engine.native.vol_key_state(c.id) == KEY_PLAIN
    assert engine.keyring.get(key_id) is None and key == bytearray(64)


# ---- snapshot copy --------------------------------------------------------------------------

def test_snapshot_copy_encrypt_decrypt_same(engine: Engine) -> None:
    p = engine.create_volume("p", 4 * MiB)
    engine.write(p.id, BS, PATTERN)
    engine.write(p.id, 3 * MiB, PATTERN[:BS])
    engine.create_snapshot("p", "s")
    seen: list[tuple[int, int]] = []
    e = engine.copy_snapshot("p", "s", "e", "encrypt", PW,
                             progress=lambda d, t: seen.append((d, t)))
    assert e.encrypted and not e.locked and seen[-1][0] == seen[-1][1] > 0
    assert engine.read(e.id, 0, 4 * MiB) == engine.read_snapshot(p.id, 1, 0, 4 * MiB)
    allocated = [r for r in engine.block_status(e.id, 0, 4 * MiB) if r[2]]
    assert sum(n for _, n, _ in allocated) < MiB  # holes stay holes
    engine.create_snapshot("e", "s")
    engine.lock("e")
    with pytest.raises(errors.BadKey):
        engine.copy_snapshot("e", "s", "d", "decrypt")
    assert "d" not in {v.name for v in engine.list_volumes()}
    d = engine.copy_snapshot("e", "s", "d", "decrypt", PW)
    assert not d.encrypted and engine.read(d.id, BS, len(PATTERN)) == PATTERN
    same = engine.copy_snapshot("e", "s", "e2")
    assert same.encrypted and engine.key_info("e2")["key_id"] == engine.key_info("e")["key_id"]
    assert engine.read(same.id, BS, len(PATTERN)) == PATTERN
    with pytest.raises(errors.Unsupported, match="snapshot copy"):
        engine.unlock("p", PW)  # in place: refused, naming the way


def test_snapshot_copy_cancelled_leaves_no_volume(engine: Engine) -> None:
    p = engine.create_volume("p", 8 * MiB)
    engine.write(p.id, 0, bytes([7]) * 4 * MiB)
    engine.create_snapshot("p", "s")

    def progress(done: int, total: int) -> None:
        if done >= 2:
            raise errors.Cancelled("stop")

    with pytest.raises(errors.Cancelled):
        engine.copy_snapshot("p", "s", "e", "encrypt", PW, progress=progress)
    assert [v.name for v in engine.list_volumes()] == ["p"]


def test_snapshot_copy_over_the_socket_keeps_no_secret_in_jobs(
        tmp_path: Path, served: Callable[..., Served]) -> None:
    s = served(make_encrypted_store(tmp_path / "store"))
    h = s.connect("plain")
    h.pwrite(PATTERN, 0)
    h.flush()
    h.shutdown()
    s.call("snapshot.create", volume="plain", name="s")
    with s.client() as c:
        job = c.start_job("snapshot.copy", volume="plain", snapshot="s", name="enc",
                          encrypt=True, passphrase="copy secret")
        result = job.wait()
        listing = c.call("job.list")
    assert result.get("ok"), result
    assert "copy secret" not in repr(listing) and "<secret>" in repr(listing)
    h = s.connect("enc")
    assert h.pread(len(PATTERN), 0) == PATTERN
    h.shutdown()
    s.call("stop")
    assert plaintext_hits(s.store, PATTERN)  # the plain volume's own blocks: found


def test_cli_snapshot_copy(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    run_cli(store, "init", "--pool-size", "64M")
    pw = tmp_path / "pw"
    pw.write_text("copy me\n")
    run_cli(store, "volume", "create", "p", "4M")
    run_cli(store, "snapshot", "create", "p", "--name", "s")
    r = run_cli(store, "--json", "snapshot", "copy", "p@s", "e", "--encrypt",
                "--passphrase-file", str(pw))
    assert r.json()["encrypted"] is True
    run_cli(store, "snapshot", "create", "e", "--name", "s")
    r = run_cli(store, "snapshot", "copy", "e@s", "d", "--decrypt", check=False)
    assert r.returncode == errors.BadKey.exit_code  # locked (each offline command opens anew)
    r = run_cli(store, "--json", "snapshot", "copy", "e@s", "d", "--decrypt",
                "--passphrase-file", str(pw))
    assert r.json()["encrypted"] is False
    r = run_cli(store, "--json", "clone", "d@s", "d2", "--new-key", check=False)
    assert r.returncode == errors.InvalidArgument.exit_code and "no passphrase" in r.stderr
    r = run_cli(store, "clone", "e@s", "e2", "--new-key", "--passphrase-file", str(pw),
                check=False)  # offline the source is locked: its key is in no server
    assert r.returncode == errors.BadKey.exit_code and "unlock" in r.stderr
    r = run_cli(store, "--json", "clone", "p@s", "p2", "--new-key", "--passphrase-file", str(pw))
    assert r.json()["encrypted"] is True


def test_ext4_image_with_a_known_file_nbdcopy_and_qemu_img_compare(
        tmp_path: Path, served: Callable[..., Served]) -> None:
    """An ext4 filesystem holding a known file (mke2fs -d: no mount needed) copied onto an
    encrypted volume with nbdcopy, compared with qemu-img, snapshotted, cloned and rolled
    back: the file's bytes appear nowhere under the store."""
    import subprocess
    secret = random.Random(5).randbytes(64 * 1024)
    root = tmp_path / "root"
    root.mkdir()
    (root / "known.bin").write_bytes(secret)
    img = tmp_path / "fs.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), str(img), "16M"],
                   check=True, capture_output=True)
    assert secret[:4096] in img.read_bytes()  # the file is in the image, in the clear
    s = served(make_encrypted_store(tmp_path / "store"))
    s.call("key.unlock", volume="sec", passphrase="open sesame")
    subprocess.run(["nbdcopy", str(img), s.uri("sec")], check=True, capture_output=True,
                   timeout=120)
    s.call("snapshot.create", volume="sec", name="fs")
    s.call("clone", volume="sec", snapshot="fs", name="fsclone")
    h = s.connect("sec")
    h.pwrite(bytes(BS), 0)  # change something, then roll it back
    h.shutdown()
    s.call("rollback", volume="sec", snapshot="fs", force=True)
    for export in ("sec", "sec@fs", "fsclone"):
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img),
                            s.uri(export)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (export, r.stdout, r.stderr)
    s.call("stop")
    img.unlink()
    (root / "known.bin").unlink()
    assert plaintext_hits(s.store, secret) == []
    assert plaintext_hits(str(tmp_path), secret) == []


def test_a_server_with_a_key_is_not_dumpable(engine: Engine) -> None:
    import ctypes
    engine.create_volume("v", MiB, encrypt=PW)  # loads a key: xm_vol_set_key
    pr_get_dumpable = 3
    assert ctypes.CDLL(None).prctl(pr_get_dumpable, 0, 0, 0, 0) == 0


# ---- the model-based test, with encrypted volumes ------------------------------------------

import test_model  # noqa: E402  (a module, not its names: pytest would collect them twice)
from hypothesis import settings  # noqa: E402
from hypothesis.stateful import invariant, rule  # noqa: E402

MODEL_KEY = keys.Secret(key_file=bytes(range(1, 33)))  # no KDF: fast


class EncryptedModel(test_model.EngineModel):
    """test_model's state machine with every other volume encrypted (and clones of them), the
    key reloaded after each reopen: reads, snapshots, rollbacks and capacity all match."""

    @rule(target=test_model.EngineModel.volumes, size=test_model.st.integers(1, 24))
    def create_volume(self, size: int) -> str:
        n = next(self.names)
        name = f"v{n}"
        self.engine.create_volume(name, size * BS, encrypt=MODEL_KEY if n % 2 == 0 else None)
        self.model[name] = test_model.MVol(size)
        return name

    @invariant()
    def encrypted_as_made(self) -> None:
        for v in self.engine.list_volumes():
            if v.origin is None:  # clones follow their origin
                assert v.encrypted == (int(v.name[1:]) % 2 == 0), v.name
            assert not v.locked, v.name

    @rule()
    def reopen(self) -> None:
        super().reopen()
        for v in self.engine.list_volumes():
            if v.encrypted and v.locked:
                self.engine.unlock(v.name, MODEL_KEY)


TestEncryptedModel = EncryptedModel.TestCase
TestEncryptedModel.settings = settings(test_model.SETTINGS,
                                       max_examples=int(os.environ.get(
                                           "SNAPDISK_MODEL_EXAMPLES", "40")))


def test_clone_new_key(tmp_path: Path, served: Callable[..., Served]) -> None:
    s = served(make_encrypted_store(tmp_path / "store"))
    s.call("key.unlock", volume="sec", passphrase="open sesame")
    h = s.connect("sec")
    h.pwrite(PATTERN, 0)
    h.flush()
    h.shutdown()
    s.call("snapshot.create", volume="sec", name="s")
    with pytest.raises(errors.InvalidArgument):
        s.call("clone", volume="sec", snapshot="s", name="x", passphrase="p")
    out = s.call("clone", volume="sec", snapshot="s", name="other", new_key=True,
                 passphrase="other secret")
    assert isinstance(out, dict) and out["encrypted"]
    a, b = s.call("key.info", volume="sec"), s.call("key.info", volume="other")
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["key_id"] != b["key_id"] and b["volumes"] == ["other"]
    s.call("key.lock", volume="sec")
    h = s.connect("other")  # its own key: still served
    assert h.pread(len(PATTERN), 0) == PATTERN
    h.shutdown()
    s.call("key.lock", volume="other")
    with pytest.raises(errors.BadKey):
        s.call("key.unlock", volume="other", passphrase="open sesame")
    s.call("key.unlock", volume="other", passphrase="other secret")


# ---- kill -9 at random moments, encrypted ----------------------------------------------------

def test_kill9_encrypted(tmp_path: Path) -> None:
    """test_crash's loop on encrypted volumes (fewer kills: SNAPDISK_CRASH_KILLS_ENC, 8): after
    each SIGKILL the store opens, checks clean, and every block decrypts to content written to
    it (never torn, never another block's), flushed writes kept."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import crash_worker_enc
    import test_crash
    from waiting import wait_until
    store, log_path = tmp_path / "store", tmp_path / "ops.log"
    with Engine.create(str(store), StoreConfig(pool_bytes=64 * MiB)) as e:
        for name in ("a", "b"):
            e.create_volume(name, test_crash.NBLOCKS * BS, encrypt=crash_worker_enc.KEY)
    base: test_crash.State = {"vols": {"a": {}, "b": {}}, "snaps": {"a": {}, "b": {}}}
    rng = random.Random(4321)
    worker = os.path.join(os.path.dirname(__file__), "crash_worker_enc.py")
    seq = 0
    for kill in range(int(os.environ.get("SNAPDISK_CRASH_KILLS_ENC", "8"))):
        log_path.write_text("")
        proc = subprocess.Popen([sys.executable, worker, str(store), str(log_path),
                                 str(rng.randrange(1 << 30)), str(seq)], stderr=subprocess.PIPE)
        try:
            wait_until(lambda p=proc: log_path.stat().st_size > 0 or p.poll() is not None, 30,
                       0.01, "the worker's first logged operation")
            time.sleep(rng.uniform(0.0, 0.4))  # the random moment is the point of the test
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        seq = max([seq] + [s for r in log if r["op"] == "w" for s in r["seqs"]])
        _, candidates, since = test_crash.expectations(log, base)
        e = crash_worker_enc.open_unlocked(str(store))
        try:
            report = e.check()
            assert report.ok, (kill, report.problems)
            assert all(v.encrypted and not v.locked for v in e.list_volumes())
            base = test_crash.actual_state(e)
        finally:
            e.close()
        test_crash.verify(base, candidates, since)
    assert plaintext_hits(str(store), crash_worker_block_sample()) == []


def crash_worker_block_sample() -> bytes:
    """Filler of a block the crash worker wrote (its seq 1 content, header left out)."""
    import crash_worker
    return crash_worker.block(0, 1)[64:1024]


COPY_CHILD = """
import sys
from snapdisk import keys
from snapdisk.engine import Engine
from snapdisk import snapcopy
import time
snapcopy.CHECKPOINT = 1 << 20  # a checkpoint per chunk: a kill lands between many
_write = Engine.write
def slow_write(self, *a, **k):  # slow enough (>= 0.3 s in all) for a kill to land midway
    time.sleep(0.03)
    return _write(self, *a, **k)
Engine.write = slow_write
e = Engine.open(sys.argv[1])
resume = "dst" in {v.name for v in e.list_volumes()}
done = e.volume_info("dst").extra["copying"]["done"] if resume else 0
print("started", done, flush=True)
e.copy_snapshot("src", "s", "dst", "encrypt", keys.Secret(key_file=bytes(range(32))),
                resume=resume)
print("finished", flush=True)
"""


def test_snapshot_copy_killed_and_resumed_gives_the_same_bytes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time
    store = str(tmp_path / "store")
    size = 24 * MiB
    with Engine.create(store, StoreConfig(pool_bytes=128 * MiB)) as e:
        v = e.create_volume("src", size)
        rng = random.Random(3)
        for i in range(0, size, 2 * MiB):  # data with holes between
            e.write(v.id, i, rng.randbytes(MiB))
        e.create_snapshot("src", "s")
        want = e.read_snapshot(v.id, 1, 0, size)
    kf = keys.Secret(key_file=bytes(range(32)))
    kills, resumed_from = 0, []
    for attempt in range(20):
        proc = subprocess.Popen([sys.executable, "-c", COPY_CHILD, store],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert line[:1] == ["started"], proc.stderr
            resumed_from.append(int(line[1]))
            time.sleep(random.Random(attempt).uniform(0.02, 0.3))  # the random moment
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
        if "finished" in out:
            break
        with Engine.open(store) as e:  # a crash leaves the half-made volume and its marker
            if "dst" in {x.name for x in e.list_volumes()}:
                assert "copying" in e.volume_info("dst").extra
    else:
        pytest.fail("the copy never finished")
    with Engine.open(store) as e:
        info = e.volume_info("dst")
        assert "copying" not in info.extra and info.encrypted
        e.unlock("dst", kf)
        assert e.read(info.id, 0, size) == want
        assert e.check().ok
    assert kills >= 1 and max(resumed_from) > 0, resumed_from  # resumed from a checkpoint
