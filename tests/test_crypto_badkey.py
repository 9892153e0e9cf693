"""Bad keys through the CLI and a server (issue 11): a wrong passphrase, a wrong or short key
file, and a truncated or tampered wrapped key in the store all give exit code 14 (bad-key),
with nothing served and nothing changed (the key records and the pool's bytes are the same
afterwards, and the right secret on the undamaged record still opens the data)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import nbd
import pytest
from crypto_helpers import PATTERN
from e2e_helpers import (  # noqa: F401  (teardown is a fixture)
    Teardown,
    run_cli,
    serve_cli,
    teardown,
)

from snapdisk import catalog, errors, keys
from snapdisk.engine import Engine
from snapdisk.store import StoreConfig

MiB = 1 << 20
BAD_KEY = errors.BadKey.exit_code


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_SCRYPT_LOG2N", "10")


def make(tmp_path: Path) -> tuple[str, Path, Path]:
    store = str(tmp_path / "store")
    pw, kf = tmp_path / "pw", tmp_path / "key"
    pw.write_text("open sesame\n")
    kf.write_bytes(os.urandom(32))
    with Engine.create(store, StoreConfig(pool_bytes=64 * MiB)) as e:
        for name, secret in (("sec", keys.Secret(passphrase=b"open sesame")),
                             ("kf", keys.Secret(key_file=kf.read_bytes()))):
            v = e.create_volume(name, 4 * MiB, encrypt=secret)
            e.write(v.id, 0, PATTERN)
            e.create_snapshot(name, "s")
    return store, pw, kf


def state(store: str) -> tuple[dict[str, Any], str]:
    """Every volume's key record, and a digest of the pool file."""
    with Engine.open(store) as e, e.native.txn() as t:
        recs = {v.name: catalog.vol_record(t, v.id).encryption for v in e.list_volumes()}
    h = hashlib.sha256()
    for p in sorted(Path(store).iterdir()):
        if p.is_file() and p.stat().st_size >= 16 * MiB:  # the pool
            h.update(p.read_bytes())
    return recs, h.hexdigest()


def tamper(store: str, volume: str, how: str) -> dict[str, Any]:
    """Damage volume's wrapped key in the store; returns the record as it was."""
    with Engine.open(store) as e, e.native.txn(write=True) as t:
        vol = e.volume_id(volume)
        vr = catalog.vol_record(t, vol)
        old = dict(vr.encryption or {})
        rec = dict(old)
        w = bytearray(base64.b64decode(rec["wrapped"]))
        if how == "flip":
            w[7] ^= 0x10
        elif how == "truncate":
            w = w[:33]
        rec["wrapped"] = base64.b64encode(w).decode()
        vr.encryption = rec
        catalog.put_vol_record(t, vol, vr)
    return old


def restore(store: str, volume: str, rec: dict[str, Any]) -> None:
    with Engine.open(store) as e, e.native.txn(write=True) as t:
        vol = e.volume_id(volume)
        vr = catalog.vol_record(t, vol)
        vr.encryption = rec
        catalog.put_vol_record(t, vol, vr)


def test_wrong_secrets_offline_are_bad_key_and_change_nothing(tmp_path: Path) -> None:
    store, pw, kf = make(tmp_path)
    before = state(store)
    wrong_pw, wrong_kf, short_kf = tmp_path / "wpw", tmp_path / "wkf", tmp_path / "skf"
    wrong_pw.write_text("open sesamE\n")
    wrong_kf.write_bytes(os.urandom(32))
    short_kf.write_bytes(os.urandom(16))
    for args in (["key", "unlock", "sec", "--passphrase-file", str(wrong_pw)],
                 ["key", "unlock", "sec", "--key-file", str(kf)],
                 ["key", "unlock", "kf", "--key-file", str(wrong_kf)],
                 ["key", "unlock", "kf", "--key-file", str(short_kf)],
                 ["key", "unlock", "kf", "--passphrase-file", str(pw)],
                 ["key", "rotate", "sec", "--passphrase-file", str(wrong_pw),
                  "--new-passphrase-file", str(pw)],
                 ["key", "rotate", "kf", "--key-file", str(wrong_kf),
                  "--new-key-file", str(kf)],
                 ["snapshot", "copy", "sec@s", "x", "--decrypt", "--passphrase-file",
                  str(wrong_pw)]):
        r = run_cli(store, *args, check=False)
        assert r.returncode == BAD_KEY, r
        assert "sesam" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert state(store) == before
    run_cli(store, "key", "unlock", "sec", "--passphrase-file", str(pw))  # the right ones work
    run_cli(store, "key", "unlock", "kf", "--key-file", str(kf))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_tampered_wrapped_key_is_bad_key_and_nothing_is_served(
        tmp_path: Path, teardown: Teardown, how: str) -> None:  # noqa: F811
    store, pw, kf = make(tmp_path)
    good = tamper(store, "sec", how)
    before = state(store)
    for args in (["key", "unlock", "sec", "--passphrase-file", str(pw)],
                 ["key", "rotate", "sec", "--passphrase-file", str(pw),
                  "--new-key-file", str(kf)]):
        r = run_cli(store, *args, check=False)
        assert r.returncode == BAD_KEY, r
    assert state(store) == before

    r = serve_cli(store, teardown, "--unlock", "sec", "--passphrase-file", str(pw))
    assert r.returncode == BAD_KEY, r
    vols = {v["name"]: v for v in run_cli(store, "--json", "volume", "list").json()}
    assert vols["sec"]["locked"] and vols["kf"]["locked"]
    sock = os.path.join(store, "nbd.sock")
    for export in ("sec", "sec@s"):
        h = nbd.NBD()
        with pytest.raises(nbd.Error):  # nothing served
            h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    run_cli(store, "stop")
    assert state(store) == before  # the server changed nothing either

    restore(store, "sec", good)  # the undamaged record: the same secret opens the same data
    with Engine.open(store) as e:
        e.unlock("sec", keys.Secret(passphrase=b"open sesame"))
        assert e.read(e.volume_id("sec"), 0, len(PATTERN)) == PATTERN
