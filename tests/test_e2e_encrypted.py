"""End to end on an encrypted volume (issue 11): `snapdisk attach --method loop` (nbdfuse and a
loop device), mkfs.ext4, mount, a known file and a known plaintext pattern written through the
filesystem and raw to the device, snapshots (frozen), a clone mounted and written, a rollback,
everything read back; then the server is stopped and EVERY file under the store directory is
scanned for any 16-byte window of the pattern or of the file: none may appear.

The same steps on a plain volume in a second store, scanned the same way, must find both (so
the scan can fail).  Needs root, /dev/fuse and loop devices (skipped otherwise); every server,
attachment and mount is undone by the `teardown` fixture by pid and path, and nothing under
the test's directory may be left mounted, looped or running.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from crypto_helpers import PATTERN, plaintext_hits
from e2e_helpers import (  # noqa: F401  (teardown is a fixture)
    Teardown,
    attach,
    have_e2e,
    init_store,
    leftovers,
    mount,
    run_cli,
    start_server,
    teardown,
    umount,
)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(have_e2e() is not None,
                                                  reason=have_e2e() or "")]

MiB = 1 << 20
VOLUME = "128M"
FS_BYTES = 96 * MiB  # the filesystem leaves the volume's tail for raw pattern blocks
KNOWN = random.Random(2026).randbytes(256 * 1024)  # the known file's content


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPDISK_SCRYPT_LOG2N", "10")  # servers started here inherit it


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    assert leftovers(str(tmp_path)) == []


def raw_write(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(dev: str, offset: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def scenario(tmp_path: Path, teardown: Teardown, encrypted: bool) -> str:  # noqa: F811
    """The whole life of one volume in its own store; returns the (stopped) store's path."""
    tag = "enc" if encrypted else "plain"
    store = init_store(str(tmp_path / f"store-{tag}"), pool="1G")
    pw = tmp_path / f"pw-{tag}"
    pw.write_text("correct horse battery staple\n")
    start_server(store, teardown)
    secret = ["--encrypt", "--passphrase-file", str(pw)] if encrypted else []
    run_cli(store, "volume", "create", "disk", VOLUME, *secret)
    info = run_cli(store, "--json", "volume", "info", "disk").json()
    assert info["encrypted"] is encrypted and not info["locked"]

    dev = attach(store, "disk", teardown, "--method", "loop")
    # the pattern raw in the tail (sector-aligned, then 512 bytes off), outside the filesystem
    raw_write(dev, FS_BYTES + MiB, PATTERN)
    raw_write(dev, FS_BYTES + 2 * MiB + 512, PATTERN * 2)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev, str(FS_BYTES // 1024)], check=True,
                   capture_output=True)
    mnt = mount(dev, str(tmp_path / f"mnt-{tag}"), teardown)
    (Path(mnt) / "known.bin").write_bytes(KNOWN)
    (Path(mnt) / "pattern.bin").write_bytes(b"\1" * 100 + PATTERN)  # unaligned in its block
    run_cli(store, "snapshot", "create", "disk", "--name", "s1", "--freeze", mnt)
    (Path(mnt) / "after.bin").write_bytes(PATTERN * 3)  # written after s1 (redirected)
    (Path(mnt) / "known.bin").unlink()
    run_cli(store, "snapshot", "create", "disk", "--name", "s2", "--freeze", mnt)

    # a clone of s1 (same key), mounted and written beside the source
    run_cli(store, "clone", "disk@s1", "copy")
    dev2 = attach(store, "copy", teardown, "--method", "loop")
    mnt2 = mount(dev2, str(tmp_path / f"mnt-{tag}-copy"), teardown)
    assert (Path(mnt2) / "known.bin").read_bytes() == KNOWN
    (Path(mnt2) / "clone.bin").write_bytes(KNOWN[:50000] + PATTERN)
    umount(mnt2)
    run_cli(store, "detach", "copy")

    # roll back to s1: the known file is back, the raw pattern still in the tail
    umount(mnt)
    run_cli(store, "detach", "disk")
    run_cli(store, "rollback", "disk@s1")
    dev = attach(store, "disk", teardown, "--method", "loop")
    assert raw_read(dev, FS_BYTES + MiB, len(PATTERN)) == PATTERN
    assert raw_read(dev, FS_BYTES + 2 * MiB + 512, 2 * len(PATTERN)) == PATTERN * 2
    mnt = mount(dev, mnt, teardown)
    assert (Path(mnt) / "known.bin").read_bytes() == KNOWN
    assert not (Path(mnt) / "after.bin").exists()
    umount(mnt)
    r = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    run_cli(store, "detach", "disk")
    run_cli(store, "stop")  # LMDB closed, everything flushed: the files are what remains
    return store


def test_no_plaintext_under_an_encrypted_store(tmp_path: Path, no_leftovers: object,
                                               teardown: Teardown) -> None:  # noqa: F811
    store = scenario(tmp_path, teardown, encrypted=True)
    files = [p for p in Path(store).rglob("*") if p.is_file()]
    assert any(p.name == "pool" or p.stat().st_size > 64 * MiB for p in files), files
    assert plaintext_hits(store, PATTERN) == []
    assert plaintext_hits(store, KNOWN) == []


def test_the_scan_finds_a_plain_volumes_plaintext(tmp_path: Path, no_leftovers: object,
                                                  teardown: Teardown) -> None:  # noqa: F811
    store = scenario(tmp_path, teardown, encrypted=False)
    assert plaintext_hits(store, PATTERN) != []
    assert plaintext_hits(store, KNOWN) != []
