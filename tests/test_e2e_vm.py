"""End to end with a real kernel NBD client: a QEMU guest's /dev/nbd0 against snapdisk's server.

One test, in five steps, against a server on a fresh store in tmp_path (conftest's `server`,
stopped by pid at teardown even when the test fails):

1. the host creates a 256 MiB volume through the control socket;
2. guest run 1: nbd-client attaches the volume's export to /dev/nbd0, mkfs.ext4, mount, write
   /hello.txt and /pattern.txt (`seq 1 400000`, 2.7 MB), sync, umount, nbd-client -d;
3. the host takes the snapshot `before`, and checks that its export refuses writes (libnbd's
   own check, then the server's with libnbd's strict mode off: pwrite, zero and trim);
4. guest run 2: attach again, mount, check what run 1 wrote, replace /hello.txt, delete
   /pattern.txt, umount, detach;
5. the host copies VOL@before and VOL out with nbdcopy: both pass `e2fsck -fn`; the snapshot has
   the old hello.txt and the pattern byte for byte, the live volume the new hello.txt and no
   pattern.

The guest (tests/vmguest.py) boots Debian's kernel under QEMU/TCG, about 12-20 s a run on two
cores.  QEMU and its socat children are killed by pid inside run_guest_script; a teardown
check fails the test if any nbdkit, QEMU or socat naming its tmp dir survives it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import vmguest
from conftest import Served
from waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.slow]

VOLUME = "vmdisk"
SNAPSHOT = "before"
SIZE = 256 << 20
DEV = "/dev/nbd0"
HELLO_V1 = "hello from the guest, before the snapshot\n"
HELLO_V2 = "hello from the guest, after the snapshot: changed\n"
PATTERN = vmguest.pattern_bytes()  # what `seq 1 PATTERN_LINES` prints
PATTERN_SHA = hashlib.sha256(PATTERN).hexdigest()
GUEST_FILES = {"/data/hello-v1.txt": HELLO_V1, "/data/hello-v2.txt": HELLO_V2}


def _procs_mentioning(text: str, names: tuple[str, ...]) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if text in cmd and any(n in cmd for n in names):
                found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Requested before `server`, so this runs after the server's teardown."""
    yield
    left = _procs_mentioning(str(tmp_path), ("qemu-system", "nbdkit", "socat"))
    assert not left, f"processes started by the test still run: {left}"


def _guest(sock: str, script: str, tmp_path: Path, what: str) -> vmguest.GuestResult:
    r = vmguest.run_guest_script(sock, script, timeout_s=180, workdir=tmp_path,
                                 files=GUEST_FILES)
    print(f"\n{what}: boot {r.boot_s}s (guest uptime at script start), "
          f"total {r.elapsed_s:.1f}s")
    if r.returncode != 0:
        tail = "\n".join(r.console_text.splitlines()[-60:])
        pytest.fail(f"{what}: guest script exited {r.returncode}\n--- output ---\n{r.output}"
                    f"\n--- console (last 60 lines) ---\n{tail}")
    return r


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _e2fsck_clean(img: Path) -> None:
    p = _run("e2fsck", "-fn", str(img))
    assert p.returncode == 0, f"e2fsck -fn {img.name}: rc={p.returncode}\n" + (
        p.stdout + p.stderr).decode(errors="replace")


def _debugfs(img: Path, request: str) -> bytes:
    p = _run("debugfs", "-R", request, str(img), timeout=60)
    assert p.returncode == 0, f"debugfs -R {request!r} {img.name}: {p.stderr!r}"
    return p.stdout


def _root_names(img: Path) -> set[str]:
    # `ls -p`: one "/inode/mode/uid/gid/name/size/" line per entry
    names = set()
    for line in _debugfs(img, "ls -p /").decode(errors="replace").splitlines():
        parts = line.split("/")
        if len(parts) >= 7:
            names.add(parts[5])
    return names


def _copy_out(server: Served, export: str, dest: Path) -> None:
    p = _run("nbdcopy", server.uri(export), str(dest))
    assert p.returncode == 0, f"nbdcopy {export}: {p.stderr!r}"
    assert dest.stat().st_size == SIZE


def _wait_no_connections(server: Served, timeout: float = 15.0) -> None:
    """The guest detached and powered off: the server must see no client left."""
    def busy() -> dict[str, object]:
        exports = server.call("status")["exports"]  # type: ignore[index]
        return {e: v for e, v in exports.items() if v.get("connections")}

    try:
        wait_until(lambda: not busy(), timeout, 0.2, "no NBD connection counted")
    except AssertionError:
        pytest.fail(f"NBD connections still counted after the guest detached: {busy()}")


def _check_snapshot_read_only(server: Served) -> None:
    import nbd

    export = f"{VOLUME}@{SNAPSHOT}"
    h = server.connect(export, meta=False)
    try:
        assert h.get_size() == SIZE
        assert h.is_read_only() == 1, "the snapshot export is offered writable"
        sb = h.pread(1024, 1024)  # the ext4 superblock run 1 wrote
        assert sb[56:58] == b"\x53\xef"
        with pytest.raises(nbd.Error):  # libnbd's own check
            h.pwrite(b"X" * 1024, 1024)
        h.set_strict_mode(0)  # now the requests go out and the server must refuse them
        for op, request in (("pwrite", lambda: h.pwrite(b"X" * 1024, 1024)),
                            ("zero", lambda: h.zero(1024, 1024)),
                            ("trim", lambda: h.trim(1024, 1024))):
            with pytest.raises(nbd.Error) as ei:
                request()
            code = ei.value.errno  # a name ("EPERM") or a number, by libnbd version
            name = code if isinstance(code, str) else errno.errorcode.get(code or 0)
            assert "command failed" in str(ei.value.string), f"{op}: not the server's refusal"
            assert name in ("EPERM", "EROFS"), f"{op} on the snapshot export: {ei.value}"
        assert h.pread(1024, 1024) == sb
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def script_run1() -> str:
    return f"""set -e
echo "+ attach"
{vmguest.nbd_connect_cmd(VOLUME, DEV)}
size=$(blockdev --getsize64 {DEV})
echo "size: $size"
[ "$size" = {SIZE} ]
echo "+ mkfs"
mkfs.ext4 -F -q {DEV}
mkdir -p /mnt
mount -t ext4 {DEV} /mnt
echo "+ write"
cp /data/hello-v1.txt /mnt/hello.txt
seq 1 {vmguest.PATTERN_LINES} > /mnt/pattern.txt
sync
echo "pattern sha256: $(sha256sum /mnt/pattern.txt | cut -d' ' -f1)"
umount /mnt
echo "+ detach"
{vmguest.nbd_disconnect_cmd(DEV)}
echo "run 1: ok"
"""


def script_run2() -> str:
    return f"""set -e
echo "+ attach"
{vmguest.nbd_connect_cmd(VOLUME, DEV)}
mkdir -p /mnt
mount -t ext4 {DEV} /mnt
echo "+ check run 1's files"
cmp /data/hello-v1.txt /mnt/hello.txt
echo "pattern sha256: $(sha256sum /mnt/pattern.txt | cut -d' ' -f1)"
echo "+ change"
cp /data/hello-v2.txt /mnt/hello.txt
rm /mnt/pattern.txt
sync
ls -la /mnt
umount /mnt
echo "+ detach"
{vmguest.nbd_disconnect_cmd(DEV)}
echo "run 2: ok"
"""


def _pattern_sha(output: str) -> str | None:
    m = re.search(r"pattern sha256: ([0-9a-f]{64})", output)
    return m.group(1) if m else None


def test_real_nbd0_snapshot_end_to_end(tmp_path: Path, no_leftovers: None,
                                       server: Served) -> None:
    t0 = time.monotonic()
    assert server.nbd_socket is not None
    sock = server.nbd_socket

    # 1. a volume, through the control socket
    vol = server.call("volume.create", name=VOLUME, size_bytes=SIZE)
    assert vol["size_bytes"] == SIZE  # type: ignore[index]

    # 2. guest run 1: mkfs, mount, write, detach
    r1 = _guest(sock, script_run1(), tmp_path, "guest run 1")
    assert "run 1: ok" in r1.output and "Connected /dev/nbd0" in r1.output, r1.output
    assert _pattern_sha(r1.output) == PATTERN_SHA, r1.output
    _wait_no_connections(server)

    # 3. snapshot on the host; its export is read-only
    snap = server.call("snapshot.create", volume=VOLUME, name=SNAPSHOT)
    assert snap["name"] == SNAPSHOT  # type: ignore[index]
    _check_snapshot_read_only(server)

    # 4. guest run 2: change hello.txt, delete pattern.txt
    r2 = _guest(sock, script_run2(), tmp_path, "guest run 2")
    assert "run 2: ok" in r2.output, r2.output
    assert _pattern_sha(r2.output) == PATTERN_SHA, r2.output  # read back over /dev/nbd0
    _wait_no_connections(server)

    # 5. the host reads both exports out and checks the filesystems
    snap_img, live_img = tmp_path / "snapshot.img", tmp_path / "live.img"
    _copy_out(server, f"{VOLUME}@{SNAPSHOT}", snap_img)
    _copy_out(server, VOLUME, live_img)
    _e2fsck_clean(snap_img)
    _e2fsck_clean(live_img)

    assert _debugfs(snap_img, "cat /hello.txt") == HELLO_V1.encode()
    assert _debugfs(live_img, "cat /hello.txt") == HELLO_V2.encode()
    dumped = tmp_path / "pattern-from-snapshot.txt"
    _debugfs(snap_img, f"dump /pattern.txt {dumped}")
    assert dumped.read_bytes() == PATTERN
    assert {"hello.txt", "pattern.txt"} <= _root_names(snap_img)
    live_names = _root_names(live_img)
    assert "hello.txt" in live_names and "pattern.txt" not in live_names, live_names

    print(f"end to end: {time.monotonic() - t0:.1f}s")
