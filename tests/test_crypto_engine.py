"""Encrypted volumes on the engine: the pool seam's cipher on both write paths, snapshots,
clones, rollback, locked volumes, rotation, the pool format (known answer), snapshot copy
(cancel, kill -9 and --resume), the model-based test and the kill -9 crash loop."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from crypto_helpers import BS, PATTERN, PW, MiB, make_legacy, plaintext_hits

from snapdisk import errors, keys
from snapdisk.engine import Engine
from snapdisk.native import KEY_LOCKED, KEY_PLAIN, KEY_UNLOCKED
from snapdisk.store import StoreConfig


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


def test_pool_format_is_standard_xts_with_the_pbn_as_tweak(engine: Engine) -> None:
    """The documented format (docs/encryption.md): XTS on 4 KiB units, tweak = pbn, decryptable
    by an independent implementation with the data key.  Legacy volumes (format 2's: new ones
    use the logical block, test_raw_encrypted.py checks that)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    v = engine.create_volume("v", MiB, encrypt=PW)
    make_legacy(engine, "v")
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

