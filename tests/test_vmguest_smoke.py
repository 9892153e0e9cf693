"""Smoke tests of the VM harness (tests/vmguest.py): a real Linux kernel's NBD client against a
stand-in server (nbdkit memory), plus the harness's own contract (status, files, timeout kill).

The guest runs Debian's kernel under QEMU/TCG; each boot takes a few seconds.  Every process a
test starts (nbdkit, QEMU and its socat children) is stopped by pid even when the test fails,
and each test asserts that no QEMU naming its tmp dir survives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import vmguest
from waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.slow]

EXPORT = "smoke"


def _procs_mentioning(text: str, name: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if name in cmd and text in cmd:
                found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture
def no_leftover_qemu(tmp_path: Path) -> Iterator[None]:
    yield
    left = _procs_mentioning(str(tmp_path), "qemu-system")
    assert not left, f"QEMU still running after the test: {left}"


@pytest.fixture
def nbdkit_memory(tmp_path: Path) -> Iterator[str]:
    """nbdkit's memory plugin (256M) on a unix socket; stopped by pid afterwards."""
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["nbdkit", "--unix", str(sock), "-f", "--exit-with-parent", "memory", "256M"],
        stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"nbdkit exited {proc.returncode} before listening")
            return sock.exists()

        wait_until(listening, 30, 0.05, f"nbdkit to create {sock}")
        yield str(sock)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _fail_with(r: vmguest.GuestResult, what: str) -> str:
    tail = "\n".join(r.console_text.splitlines()[-60:])
    return f"{what}; guest rc={r.returncode}\n--- output ---\n{r.output}\n--- console ---\n{tail}"


def test_guest_ext4_over_real_nbd(tmp_path: Path, nbdkit_memory: str,
                                  no_leftover_qemu: None) -> None:
    sock = nbdkit_memory
    r = vmguest.run_guest_script(sock, vmguest.ext4_check_script(EXPORT), timeout_s=300,
                                 workdir=tmp_path)
    print(f"\nguest: boot {r.boot_s}s (guest uptime at script start), total {r.elapsed_s:.1f}s")
    assert r.returncode == 0, _fail_with(r, "guest script failed")
    assert "snapdisk vm nbd check: ok" in r.output, _fail_with(r, "no success line")
    assert "Connected /dev/nbd0" in r.output

    # The host sees what the guest's kernel wrote: the ext4 superblock magic...
    import nbd

    h = nbd.NBD()
    h.set_export_name(EXPORT)
    h.connect_unix(sock)
    try:
        assert h.get_size() == 256 << 20
        sb = h.pread(1024, 1024)
    finally:
        h.shutdown()
    assert struct.unpack_from("<H", sb, 56)[0] == 0xEF53

    # ...and a filesystem that checks clean and holds the files, byte for byte.
    img = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", f"nbd+unix:///{EXPORT}?socket={sock}", str(img)], check=True,
                   timeout=120, stdin=subprocess.DEVNULL)
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    hello = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(img)], capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL, check=True)
    assert hello.stdout == vmguest.HELLO_TEXT.encode()
    dumped = tmp_path / "pattern.txt"
    subprocess.run(["debugfs", "-R", f"dump /pattern.txt {dumped}", str(img)],
                   capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=True)
    assert dumped.read_bytes() == vmguest.pattern_bytes()


def test_guest_status_output_and_files(tmp_path: Path, no_leftover_qemu: None) -> None:
    script = "cat /data/in.txt\n/data/tool.sh\necho to-stderr >&2\nexit 7\n"
    files = {"/data/in.txt": "from the host\n", "/data/tool.sh": "#!/bin/sh\necho tool ran\n"}
    r = vmguest.run_guest_script(None, script, timeout_s=120, workdir=tmp_path, files=files)
    assert r.returncode == 7, _fail_with(r, "wrong status")
    assert r.output == "from the host\ntool ran\nto-stderr\n"
    assert "from the host" in r.console_text  # the console has a copy, among kernel messages
    with pytest.raises(vmguest.GuestError, match="exited 7"):
        r.check()


def test_guest_timeout_kills_qemu(tmp_path: Path, no_leftover_qemu: None) -> None:
    t0 = time.monotonic()
    with pytest.raises(vmguest.GuestTimeout) as ei:
        vmguest.run_guest_script(None, "echo sleeping; sleep 600", timeout_s=20,
                                 workdir=tmp_path)
    assert time.monotonic() - t0 < 60
    assert "sleeping" in ei.value.output
    assert not _procs_mentioning(str(tmp_path), "qemu-system")
