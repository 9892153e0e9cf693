"""Encrypted volumes over NBD, the control socket and the CLI: locked volumes not served, key
lock/unlock/rotate, serve --unlock, snapshot copy and clone --new-key, and no plaintext anywhere
under the store directory (a pattern, and an ext4 filesystem holding a known file)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from conftest import Served
from crypto_helpers import BS, PATTERN, make_encrypted_store, plaintext_hits
from e2e_helpers import (  # noqa: F401  (teardown is a fixture)
    Teardown,
    run_cli,
    serve_cli,
    teardown,
)

from snapdisk import errors


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_SCRYPT_LOG2N", "10")  # servers started here inherit it


def test_the_scanner_finds_plaintext(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"\1" * 5 + PATTERN[100:117] + b"\2" * 3)
    assert plaintext_hits(str(tmp_path), PATTERN) == [str(tmp_path / "f")]
    (tmp_path / "f").write_bytes(PATTERN[100:115])  # 15 bytes: no 16-byte window
    assert plaintext_hits(str(tmp_path), PATTERN) == []

# ---- over NBD and the control socket -------------------------------------------------------
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
    r = serve_cli(store, teardown, "--json", "--unlock", "a", "--passphrase-file", str(pw),
                  "--unlock", "b", "--key-file", str(kf))
    assert r.returncode == 0, r
    assert r.json()["unlocked"] == ["a", "b"]
    state = {v["name"]: v["locked"] for v in run_cli(store, "--json", "volume", "list").json()}
    assert state == {"a": False, "b": False, "c": True}  # c has its own key (same key file)
    r = run_cli(store, "serve", "--unlock", "a", "--key-file", str(kf), "--unlock", "c",
                check=False)
    assert r.returncode != 0  # a second server is refused; c's secret is missing anyway


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


