"""keys.py: data-key wrapping, wrong and damaged secrets, the rate limit, what is shown."""

from __future__ import annotations

import base64
import json
import time

import pytest

from snapdisk import errors, keys

PW = keys.Secret(passphrase=b"correct horse")
KF = keys.Secret(key_file=bytes(range(32)))


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_SCRYPT_LOG2N", "10")


def test_wrap_unwrap_round_trip_with_passphrase_and_key_file() -> None:
    for secret in (PW, KF):
        key = keys.new_data_key()
        rec = keys.wrap(key, secret)
        assert len(key) == 64 and key[:32] != key[32:]
        assert keys.unwrap(rec, secret) == key
        assert key.hex() not in json.dumps(rec)  # only the wrapped form is stored


def test_record_format() -> None:
    rec = keys.wrap(keys.new_data_key(), PW)
    assert rec["version"] == 1 and rec["cipher"] == "aes-256-xts-plain64"
    assert rec["data_unit"] == 4096
    assert rec["wrap"] == "aes-256-gcm" and len(rec["key_id"]) == 32
    assert rec["kek"]["kdf"] == "scrypt" and rec["kek"]["n"] == 1024
    assert len(base64.b64decode(rec["kek"]["salt"])) == 16
    assert len(base64.b64decode(rec["wrapped"])) == 64 + 16
    assert keys.wrap(keys.new_data_key(), KF)["kek"] == {"kind": "key-file"}


def test_default_kdf_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAPDISK_SCRYPT_LOG2N")
    t = time.monotonic()
    rec = keys.wrap(keys.new_data_key(), PW)
    assert rec["kek"]["n"] == 1 << 16 and rec["kek"]["r"] == 8 and rec["kek"]["p"] == 1
    assert time.monotonic() - t > 0.05  # memory-hard: not instant


def test_wrong_secrets_are_bad_key() -> None:
    key = keys.new_data_key()
    rec = keys.wrap(key, PW)
    with pytest.raises(errors.BadKey):
        keys.unwrap(rec, keys.Secret(passphrase=b"correct horsf"))
    with pytest.raises(errors.BadKey):
        keys.unwrap(rec, KF)  # a key file for a passphrase-wrapped key
    rec2 = keys.wrap(key, KF)
    with pytest.raises(errors.BadKey):
        keys.unwrap(rec2, keys.Secret(key_file=bytes(32)))
    with pytest.raises(errors.BadKey):
        keys.Secret(key_file=b"short")


@pytest.mark.parametrize("damage", ["flip", "truncate", "salt", "n", "key_id", "huge_n",
                                    "version", "unit", "garbage"])
def test_tampered_or_truncated_records_are_bad_key(damage: str) -> None:
    rec = keys.wrap(keys.new_data_key(), PW)
    w = bytearray(base64.b64decode(rec["wrapped"]))
    if damage == "flip":
        w[5] ^= 1
        rec["wrapped"] = base64.b64encode(w).decode()
    elif damage == "truncate":
        rec["wrapped"] = base64.b64encode(w[:40]).decode()
    elif damage == "salt":
        rec["kek"]["salt"] = base64.b64encode(bytes(16)).decode()
    elif damage == "n":
        rec["kek"]["n"] = 2048  # a valid value, but not the one the key was wrapped with
    elif damage == "key_id":
        rec["key_id"] = "0" * 32  # bound to the wrap as associated data
    elif damage == "huge_n":
        rec["kek"]["n"] = 1 << 40  # refused before deriving: no huge allocation
    elif damage == "version":
        rec["version"] = 2
    elif damage == "unit":
        rec["data_unit"] = 512
    else:
        rec["wrapped"] = "not base64!"
    with pytest.raises(errors.BadKey) as e:
        keys.unwrap(rec, PW)
    assert "correct horse" not in str(e.value)


def test_secret_repr_and_info_never_show_key_material() -> None:
    assert "correct" not in repr(PW) and "000102" not in repr(KF)
    rec = keys.wrap(keys.new_data_key(), PW)
    info = keys.public_info(rec)
    assert "wrapped" not in json.dumps(info) and "salt" not in json.dumps(info)
    assert info["key_id"] == rec["key_id"] and info["kek"]["n"] == 1024


def test_throttle_doubles_the_delay_per_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(keys.time, "sleep", slept.append)
    th = keys.Throttle()
    for _ in range(8):
        th.failed("k")
    assert slept[:3] == [keys.FAIL_DELAY, 2 * keys.FAIL_DELAY, 4 * keys.FAIL_DELAY]
    assert slept[-1] == keys.FAIL_DELAY_MAX
    th.succeeded("k")
    th.failed("k")
    assert slept[-1] == keys.FAIL_DELAY


def test_keyring_zeroes_dropped_keys() -> None:
    ring = keys.Keyring()
    key = keys.new_data_key()
    ring.put("a", key)
    assert ring.get("a") is key and "a" in ring
    ring.clear()
    assert key == bytearray(64) and ring.get("a") is None


def test_a_malformed_secret_argument_is_not_echoed() -> None:
    from snapdisk.control import ops
    with pytest.raises(errors.InvalidArgument) as e:
        ops.validate(ops.OPS["key.unlock"], {"volume": "v", "passphrase": 123456789})
    assert "123456789" not in str(e.value) and "passphrase" in str(e.value)
    with pytest.raises(errors.InvalidArgument) as e:
        ops.validate(ops.OPS["key.unlock"], {"volume": 123456789})
    assert "123456789" in str(e.value)  # other arguments are shown, as before
