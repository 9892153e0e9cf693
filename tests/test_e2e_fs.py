"""End to end with real block devices and filesystems: `snapdisk attach` (a loop device over
nbdfuse, the path machines without the nbd driver take), mkfs.ext4, mount, files written,
snapshotted (frozen), changed and deleted, rolled back, found again byte for byte; a clone
mounted beside its source; a snapshot attached read-only; e2fsck clean at the end.

Needs root, /dev/fuse and loop devices (skipped otherwise).  Every server, attachment and
mount is undone by the `teardown` fixture, by pid and path, even when a step fails; the last
check is that nothing under the test's directory is left mounted, looped or running.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import (  # noqa: F401  (teardown is a fixture)
    Teardown,
    attach,
    attach_record,
    have_e2e,
    init_store,
    is_mounted,
    leftovers,
    mount,
    pid_alive,
    run_cli,
    start_server,
    teardown,
    umount,
)

from snapdisk import errors

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(have_e2e() is not None,
                                                  reason=have_e2e() or "")]


def write_tree(root: Path, seed: int) -> dict[str, bytes]:
    """A few files of different shapes (tiny, block-unaligned, multi-MiB, nested)."""
    files = {
        "hello.txt": f"hello from snapdisk, seed {seed}\n".encode(),
        "odd.bin": os.urandom(12345),
        "big.bin": os.urandom(6 << 20),
        "dir/nested/deep.bin": os.urandom(70000),
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "lost+found" not in p.parts}


def digest(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def fsck_clean(dev: str) -> None:
    r = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    assert r.returncode == 0, f"e2fsck -fn {dev}: {r.stdout}{r.stderr}"


@pytest.fixture
def served(tmp_path: Path, teardown: Teardown) -> str:  # noqa: F811
    store = init_store(str(tmp_path / "store"), pool="4G")
    start_server(store, teardown)
    return store


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    assert leftovers(str(tmp_path)) == []


def test_filesystem_snapshot_rollback_clone(tmp_path: Path, no_leftovers: object,
                                            teardown: Teardown, served: str) -> None:  # noqa: F811
    store = served
    run_cli(store, "volume", "create", "disk", "256M")

    # attach, mkfs, mount, write
    dev = attach(store, "disk", teardown)
    assert dev.startswith(("/dev/loop", "/dev/nbd")), dev
    rec = attach_record(store, "disk")
    assert rec["method"] == "loop" or dev.startswith("/dev/nbd")
    if rec["method"] == "loop":  # direct I/O: nothing acknowledged waits in FUSE's page cache
        with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
            assert f.read().strip() == "1"
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt = mount(dev, str(tmp_path / "mnt"), teardown)
    original = write_tree(Path(mnt), seed=1)

    # a snapshot with the filesystem frozen around it (and thawed: the next write works)
    s = run_cli(store, "--json", "snapshot", "create", "disk", "--name", "v1",
                "--freeze", mnt).json()
    assert s["name"] == "v1"
    # a mounted device cannot be detached, nor the server stopped under it
    r = run_cli(store, "detach", dev, check=False)
    assert r.returncode == errors.Busy.exit_code and "mounted" in r.stderr, r
    r = run_cli(store, "stop", check=False)
    assert r.returncode == errors.Busy.exit_code and "attached" in r.stderr, r

    # change, add and delete files after the snapshot
    (Path(mnt) / "hello.txt").write_bytes(b"overwritten\n")
    (Path(mnt) / "big.bin").unlink()
    (Path(mnt) / "dir/nested/deep.bin").write_bytes(os.urandom(1000))
    (Path(mnt) / "new.bin").write_bytes(os.urandom(1 << 20))
    changed = read_tree(Path(mnt))
    assert changed != original

    # unmount, detach, roll back
    umount(mnt)
    run_cli(store, "detach", dev)
    assert not os.path.exists(os.path.join(store, "attach", "disk.json"))
    assert not pid_alive(rec["nbdfuse_pid"]) if rec.get("nbdfuse_pid") else True
    run_cli(store, "rollback", "disk@v1")

    # attach and mount again: the files of the snapshot, byte for byte
    dev = attach(store, "disk", teardown)
    mnt = mount(dev, mnt, teardown)
    assert digest(read_tree(Path(mnt))) == digest(original)

    # clone the snapshot and mount the clone beside the source
    run_cli(store, "clone", "disk@v1", "copy")
    dev2 = attach(store, "copy", teardown)
    assert dev2 != dev
    mnt2 = mount(dev2, str(tmp_path / "mnt-copy"), teardown)
    assert is_mounted(mnt) and is_mounted(mnt2)
    assert digest(read_tree(Path(mnt2))) == digest(original)
    (Path(mnt2) / "only-in-clone.txt").write_bytes(b"clone\n")
    (Path(mnt) / "only-in-source.txt").write_bytes(b"source\n")
    assert not (Path(mnt) / "only-in-clone.txt").exists()
    assert not (Path(mnt2) / "only-in-source.txt").exists()

    usage = run_cli(store, "--json", "usage").json()
    assert {v["volume"] for v in usage["volumes"]} == {"disk", "copy"}

    # both filesystems clean
    umount(mnt2)
    umount(mnt)
    fsck_clean(dev)
    fsck_clean(dev2)
    run_cli(store, "detach", "copy")
    run_cli(store, "detach", dev)
    assert run_cli(store, "--json", "status").json()["attached"] == []
    assert run_cli(store, "--json", "check").json()["ok"] is True


def test_snapshot_attached_read_only(tmp_path: Path, no_leftovers: object,
                                     teardown: Teardown, served: str) -> None:  # noqa: F811
    store = served
    run_cli(store, "volume", "create", "ro", "64M")
    dev = attach(store, "ro", teardown)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt = mount(dev, str(tmp_path / "mnt"), teardown)
    files = write_tree(Path(mnt), seed=2)
    del files["big.bin"]
    (Path(mnt) / "big.bin").unlink()
    run_cli(store, "snapshot", "create", "ro", "--name", "s", "--freeze", mnt)

    for missing in ("nosuch", "ro@nosuch"):
        r = run_cli(store, "attach", missing, check=False)
        assert r.returncode == errors.NotFound.exit_code and "nosuch" in r.stderr, r
    sdev = attach(store, "ro@s", teardown)
    assert attach_record(store, "ro@s")["readonly"] is True
    with open(f"/sys/block/{os.path.basename(sdev)}/ro") as f:
        assert f.read().strip() == "1"
    smnt = mount(sdev, str(tmp_path / "snap"), teardown, "-o", "ro,noload")
    assert digest(read_tree(Path(smnt))) == digest(files)
    r = subprocess.run(["dd", "if=/dev/zero", f"of={sdev}", "bs=4096", "count=1",
                        "oflag=direct"], capture_output=True)
    assert r.returncode != 0  # a snapshot cannot be written
    umount(smnt)
    run_cli(store, "detach", "ro@s")
    umount(mnt)
    run_cli(store, "detach", "ro")


def test_freeze_thaws_on_error(tmp_path: Path, no_leftovers: object,
                               teardown: Teardown, served: str) -> None:  # noqa: F811
    """--freeze on a failing snapshot (no such volume): the error, and the filesystem
    thawed afterwards."""
    store = served
    run_cli(store, "volume", "create", "fz", "64M")
    dev = attach(store, "fz", teardown)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt = mount(dev, str(tmp_path / "mnt"), teardown)
    r = run_cli(store, "snapshot", "create", "nosuch", "--freeze", mnt, check=False)
    assert r.returncode == errors.VolumeNotFound.exit_code, r
    r2 = subprocess.run(["timeout", "10", "sh", "-c", f"echo ok > {mnt}/after && sync"],
                        capture_output=True)
    assert r2.returncode == 0, "the filesystem stayed frozen"
    r = run_cli(store, "snapshot", "create", "fz", "--freeze", str(tmp_path), check=False)
    assert r.returncode == errors.InvalidArgument.exit_code and "mount point" in r.stderr, r
    umount(mnt)
    run_cli(store, "detach", "fz")


def test_attach_while_serving_tcp(tmp_path: Path, no_leftovers: object,
                                  teardown: Teardown) -> None:  # noqa: F811
    """--listen adds TCP beside the unix socket: attach (which uses the unix socket) works
    while TLS clients use TCP, and both see the same volume."""
    import socket

    import nbd
    store = init_store(str(tmp_path / "store"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start_server(store, teardown, "--listen", f"tcp:127.0.0.1:{port}")
    run_cli(store, "volume", "create", "t", "16M")
    dev = attach(store, "t", teardown)
    data = os.urandom(1 << 16)
    with open(dev, "r+b", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(os.path.join(store, "tls.psk"))
    h.set_tls_username("snapdisk")
    h.set_export_name("t")
    h.connect_tcp("127.0.0.1", str(port))
    assert h.pread(len(data), 0) == data
    h.shutdown()
    run_cli(store, "detach", "t")


def test_attach_needs_a_server(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "store"))
    run_cli(store, "volume", "create", "v", "1M")
    r = run_cli(store, "attach", "v", check=False)
    assert r.returncode == errors.NotRunning.exit_code and "snapdisk serve" in r.stderr, r
    r = run_cli(store, "detach", "v", check=False)
    assert r.returncode == errors.NotFound.exit_code, r


FROZEN_SLOW_OP = """
import sys, time
from snapdisk import fsfreeze
def op():
    print("frozen", flush=True)
    time.sleep(3)
    print("op done", flush=True)
    return "returned"
print(fsfreeze.run_frozen(sys.argv[1], op), flush=True)
"""


def test_freeze_thaws_on_interrupt(tmp_path: Path, no_leftovers: object,
                                   teardown: Teardown, served: str) -> None:  # noqa: F811
    """Ctrl-C while the filesystem is frozen: the signal waits for the thaw; the process then
    ends as interrupted, and the filesystem takes writes."""
    store = served
    run_cli(store, "volume", "create", "fi", "64M")
    dev = attach(store, "fi", teardown)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt = mount(dev, str(tmp_path / "mnt"), teardown)
    p = subprocess.Popen([sys.executable, "-c", FROZEN_SLOW_OP, mnt], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "frozen"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0 and "KeyboardInterrupt" in err, (out, err)
    # the op finished, and the signal was taken only after the thaw (so run_frozen raised
    # KeyboardInterrupt instead of returning)
    assert "op done" in out and "returned" not in out, (out, err)
    r = subprocess.run(["timeout", "10", "sh", "-c", f"echo ok > {mnt}/after && sync"],
                       capture_output=True)
    assert r.returncode == 0, "the filesystem stayed frozen"
    umount(mnt)
    run_cli(store, "detach", "fi")
