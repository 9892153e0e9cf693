"""Attach over nbdfuse and a loop device (the kernel has no nbd driver):

    /dev/loopN -> STORE/attach/EXPORT/disk (FUSE, nbdfuse) -> STORE/nbd.sock

Its record adds "mountpoint", "file", "nbdfuse_pid" and "log".  Teardown checks that the loop
device is still backed by our FUSE file, and that the pid is still our nbdfuse on our mount
point, before touching either (after a reboot the numbers may belong to someone else)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any

from .. import errors
from .host import is_mountpoint, require_tool, run, tail
from .records import attach_dir, export_uri, forget, save

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def attach(store: str, export: str, readonly: bool) -> dict[str, Any]:
    for tool in ("nbdfuse", "losetup", "fusermount3"):
        require_tool(tool)
    mountpoint = os.path.join(attach_dir(store), export)
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    pidfile = os.path.join(attach_dir(store), export + ".pid")
    log = os.path.join(attach_dir(store), export + ".log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    rec: dict[str, Any] = {"export": export, "method": "loop", "device": None,
                           "readonly": readonly, "created": time.time(),
                           "mountpoint": mountpoint, "file": os.path.join(mountpoint, "disk"),
                           "nbdfuse_pid": None, "log": log}
    cmd = ["nbdfuse", "-P", pidfile] + (["-r"] if readonly else [])
    cmd += [rec["file"], export_uri(store, export)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    rec["nbdfuse_pid"] = proc.pid
    save(store, rec)  # from here on, a failure is cleaned up from the record
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.exists(pidfile):
            if proc.poll() is not None:
                raise errors.ServerError(f"nbdfuse could not serve {export}: {tail(log)}")
            if time.monotonic() > deadline:
                raise errors.ServerError(f"nbdfuse did not come up for {export} within "
                                         f"{READY_TIMEOUT_S:g} s: {tail(log)}")
            time.sleep(0.02)
        # Direct I/O: no second page cache (the filesystem on the loop device has its own), and
        # what the loop device acknowledges has reached the server, not FUSE's dirty pages.
        args = ["losetup", "--find", "--show", "--direct-io=on"]
        args += ["--read-only"] if readonly else []
        rec["device"] = run(args + [rec["file"]]).strip()
        save(store, rec)
    except BaseException:
        teardown(rec)
        forget(store, export)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
    return rec


def backing(dev: str) -> str | None:
    name = os.path.basename(os.path.realpath(dev))
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def nbdfuse_is_ours(rec: dict[str, Any]) -> bool:
    pid = rec.get("nbdfuse_pid")
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and bool(argv) and os.path.basename(argv[0]) == b"nbdfuse" \
        and rec["file"].encode() in argv


def teardown(rec: dict[str, Any]) -> None:
    dev = rec.get("device")
    if dev and backing(dev) == rec["file"]:
        run(["losetup", "--detach", dev])
    mp = rec["mountpoint"]
    pid = rec.get("nbdfuse_pid")
    ours = nbdfuse_is_ours(rec)
    # The loop driver lets go of the file asynchronously: unmounting may be busy for a moment.
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while is_mountpoint(mp) and time.monotonic() < deadline:
        if subprocess.run(["fusermount3", "-u", mp], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    if ours and pid:
        _stop_pid(pid, lambda: nbdfuse_is_ours(rec))
    if is_mountpoint(mp):  # nbdfuse is gone but the kernel still has the mount
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    with contextlib.suppress(OSError):
        os.rmdir(mp)
    with contextlib.suppress(OSError):
        os.unlink(rec["log"])


def _stop_pid(pid: int, still_ours: Any) -> None:
    """Wait for pid to exit (it does once its mount is gone), then TERM, then KILL."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and still_ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S / 2
        while time.monotonic() < deadline:
            _reap(pid)
            if not still_ours():
                return
            time.sleep(0.05)


def _reap(pid: int) -> None:
    """If pid is our own child (attach called in this process), collect its exit status."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)

