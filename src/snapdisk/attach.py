"""Attach an export of the running server as a block device; detach it again.

Two ways to a block device, chosen by what the kernel has:

    nbd   the kernel's nbd driver:  nbd-client -unix STORE/nbd.sock /dev/nbdN -N EXPORT
          (nbd-client 3.24 hands the socket to the kernel over netlink and exits).

    loop  no nbd driver (common in containers and minimal VMs): nbdfuse serves the export
          as a file on a FUSE mount, and a loop device is set up over that file:

              /dev/loopN -> STORE/attach/EXPORT/disk (FUSE, nbdfuse) -> STORE/nbd.sock

          Every I/O crosses the kernel twice (loop, then FUSE), so this is slower than nbd,
          but it needs only FUSE and loop, which every distribution kernel has.  The loop
          device does direct I/O on the file, so nothing it acknowledged waits in FUSE's page
          cache (a snapshot sees it) and data is not cached twice.

Both go through the store's unix socket (STORE/nbd.sock, which a server always listens on, TCP
or not): no TLS is needed there, the store directory's mode is the protection.

Snapshot exports (VOLUME@SNAPSHOT) are attached read-only (nbd-client -readonly; nbdfuse -r and
losetup -r).

What attach made is recorded in STORE/attach/EXPORT.json, and detach tears down exactly that
and nothing else: it checks that the loop device is still backed by our FUSE file, and that
the pid is still our nbdfuse on our mount point, before touching either (after a reboot the
record is stale and the numbers may belong to someone else).  A mounted device is never
detached: the caller unmounts first.

    {"export", "method": "loop"|"nbd", "device", "readonly", "created",
     "mountpoint", "file", "nbdfuse_pid", "log"}                  (loop)

STORE/attach/.lock (flock) serializes attaches and detaches of one store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from . import errors
from .exportspec import ExportSpec

METHODS = ("auto", "nbd", "loop")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def attach_dir(store: str) -> str:
    return os.path.join(os.path.abspath(store), "attach")


def nbd_socket(store: str) -> str:
    return os.path.join(os.path.abspath(store), "nbd.sock")


def export_uri(store: str, export: str) -> str:
    from .listen import export_uri
    return export_uri(f"unix:{nbd_socket(store)}", export)


def _record_path(store: str, export: str) -> str:
    return os.path.join(attach_dir(store), export + ".json")


# ---- public API ------------------------------------------------------------------------------

def attach(store: str, export: str, method: str = "auto", readonly: bool = False) -> str:
    """Attach `export` (VOLUME or VOLUME@SNAPSHOT) of the store's running server as a block
    device and return its path.  Snapshots are always read-only."""
    if method not in METHODS:
        raise errors.InvalidArgument(f"attach method must be one of {METHODS}, not {method!r}")
    spec = ExportSpec.parse(export)  # also what makes it safe as a file name in STORE/attach
    readonly = readonly or spec.snapshot is not None
    _require_root("attach")
    if not _server_listening(store):
        raise errors.NotRunning(
            f"no snapdisk server is listening on {nbd_socket(store)}: start one with "
            "`snapdisk serve` (attach needs its NBD socket)")
    with _locked(store):
        old = _load(store, export)
        if old is not None:
            if _alive(old):
                raise errors.AlreadyExists(f"{export} is already attached as {old['device']}")
            _teardown(old)  # stale (reboot, crash): clear what is left of it
            _forget(store, export)
        if method == "auto":
            method = "nbd" if _have_nbd_driver() else "loop"
        elif method == "nbd" and not _have_nbd_driver():
            raise errors.Unsupported("this kernel has no nbd driver (modprobe nbd failed): "
                                     "use --method loop (nbdfuse and a loop device)")
        if method == "nbd":
            rec = _attach_nbd(store, export, readonly)
        else:
            rec = _attach_loop(store, export, readonly)
        return str(rec["device"])


def detach(store: str, target: str) -> dict[str, Any]:
    """Detach what attach made for `target`: an export name, or the device it returned.
    Refused (Busy) while the device is mounted.  Returns the record it undid."""
    _require_root("detach")
    with _locked(store):
        rec = find(store, target)
        dev = rec["device"]
        if _ours(rec):
            where = _mounted_at(dev)
            if where:
                raise errors.Busy(f"{dev} ({rec['export']}) is mounted on {where}: "
                                  "unmount it first")
            holders = _holders(dev)
            if holders:
                raise errors.Busy(f"{dev} ({rec['export']}) is in use by {', '.join(holders)}")
        _teardown(rec)
        _forget(store, rec["export"])
        return rec


def list_attachments(store: str) -> list[dict[str, Any]]:
    """Every attach record of the store, each with `alive`: whether its pieces still exist."""
    d = attach_dir(store)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            rec = _load(store, name[:-5])
            if rec is not None:
                out.append({**rec, "alive": _alive(rec)})
    return out


def find(store: str, target: str) -> dict[str, Any]:
    """The record for an export name or a device path."""
    if not target.startswith("/"):
        rec = _load(store, target)
        if rec is not None:
            return rec
    else:
        real = os.path.realpath(target)
        for rec in list_attachments(store):
            if os.path.realpath(rec["device"]) == real:
                return rec
    raise errors.NotFound(f"nothing attached from {store} as {target!r} "
                          "(`snapdisk status` lists what is attached)")


# ---- loop over nbdfuse -------------------------------------------------------------------------

def _attach_loop(store: str, export: str, readonly: bool) -> dict[str, Any]:
    for tool in ("nbdfuse", "losetup", "fusermount3"):
        _require_tool(tool)
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
    _save(store, rec)  # from here on, a failure is cleaned up from the record
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.exists(pidfile):
            if proc.poll() is not None:
                raise errors.ServerError(f"nbdfuse could not serve {export}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise errors.ServerError(f"nbdfuse did not come up for {export} within "
                                         f"{READY_TIMEOUT_S:g} s: {_tail(log)}")
            time.sleep(0.02)
        # Direct I/O: no second page cache (the filesystem on the loop device has its own), and
        # what the loop device acknowledges has reached the server, not FUSE's dirty pages.
        args = ["losetup", "--find", "--show", "--direct-io=on"]
        args += ["--read-only"] if readonly else []
        rec["device"] = _run(args + [rec["file"]]).strip()
        _save(store, rec)
    except BaseException:
        _teardown(rec)
        _forget(store, export)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
    return rec


def _loop_backing(dev: str) -> str | None:
    name = os.path.basename(os.path.realpath(dev))
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def _nbdfuse_is_ours(rec: dict[str, Any]) -> bool:
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


def _teardown_loop(rec: dict[str, Any]) -> None:
    dev = rec.get("device")
    if dev and _loop_backing(dev) == rec["file"]:
        _run(["losetup", "--detach", dev])
    mp = rec["mountpoint"]
    pid = rec.get("nbdfuse_pid")
    ours = _nbdfuse_is_ours(rec)
    # The loop driver lets go of the file asynchronously: unmounting may be busy for a moment.
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _is_mountpoint(mp) and time.monotonic() < deadline:
        if subprocess.run(["fusermount3", "-u", mp], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    if ours and pid:
        _stop_pid(pid, lambda: _nbdfuse_is_ours(rec))
    if _is_mountpoint(mp):  # nbdfuse is gone but the kernel still has the mount
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


# ---- kernel nbd --------------------------------------------------------------------------------

def _have_nbd_driver() -> bool:
    if os.path.isdir("/sys/module/nbd"):
        return True
    if shutil.which("modprobe") is None:
        return False
    r = subprocess.run(["modprobe", "nbd"], capture_output=True)
    return r.returncode == 0 and os.path.isdir("/sys/module/nbd")


def _free_nbd_device() -> str:
    names = sorted((n for n in os.listdir("/sys/block") if n.startswith("nbd")),
                   key=lambda n: int(n[3:]))
    if not names:
        raise errors.Unsupported("the nbd driver has no devices (load it with nbds_max=N)")
    for name in names:
        if not os.path.exists(f"/sys/block/{name}/pid") and _sysfs_int(f"/sys/block/{name}/size") == 0:
            return f"/dev/{name}"
    raise errors.Busy("every /dev/nbdN is in use (load nbd with a larger nbds_max)")


def _sysfs_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return -1


def _attach_nbd(store: str, export: str, readonly: bool) -> dict[str, Any]:
    _require_tool("nbd-client")
    dev = _free_nbd_device()
    rec: dict[str, Any] = {"export": export, "method": "nbd", "device": dev,
                           "readonly": readonly, "created": time.time()}
    cmd = ["nbd-client", "-unix", nbd_socket(store), dev, "-N", export]
    _run(cmd + (["-readonly"] if readonly else []))
    _save(store, rec)
    return rec


def _nbd_connected(dev: str) -> bool:
    name = os.path.basename(os.path.realpath(dev))
    return os.path.exists(f"/sys/block/{name}/pid")


def _teardown_nbd(rec: dict[str, Any]) -> None:
    if _nbd_connected(rec["device"]):
        _run(["nbd-client", "-d", rec["device"]])


# ---- shared ------------------------------------------------------------------------------------

def _ours(rec: dict[str, Any]) -> bool:
    """Whether the record's device is still the one attach made."""
    dev = rec.get("device")
    if not dev:
        return False
    if rec["method"] == "loop":
        return _loop_backing(dev) == rec["file"]
    return _nbd_connected(dev)


def _alive(rec: dict[str, Any]) -> bool:
    if rec["method"] == "loop":
        return _ours(rec) and _nbdfuse_is_ours(rec)
    return _ours(rec)


def _teardown(rec: dict[str, Any]) -> None:
    if rec["method"] == "loop":
        _teardown_loop(rec)
    else:
        _teardown_nbd(rec)


def _mounts() -> Iterator[tuple[str, str]]:
    """(major:minor, mount point) of every mount, from /proc/self/mountinfo.  Unlike
    os.path.ismount this sees a FUSE mount whose server died (stat fails with ENOTCONN)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield fields[2], re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])


def _is_mountpoint(path: str) -> bool:
    return any(mp == path for _, mp in _mounts())


def _mounted_at(dev: str) -> str | None:
    """The first mount point of the block device (matched by major:minor, so a device mounted
    through another name is still found)."""
    try:
        rdev = os.stat(dev).st_rdev
    except OSError:
        return None
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    return next((mp for devno, mp in _mounts() if devno == want), None)


def _holders(dev: str) -> list[str]:
    name = os.path.basename(os.path.realpath(dev))
    try:
        return sorted(os.listdir(f"/sys/block/{name}/holders"))
    except OSError:
        return []


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise errors.Unsupported(f"{what} needs root (loop and nbd devices are root's)")


def _require_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        raise errors.Unsupported(f"{tool} is not installed (scripts/setup installs it)")


def _server_listening(store: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(nbd_socket(store)).st_mode)
    except OSError:
        return False


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise errors.SnapdiskError(f"{cmd[0]} failed: {msg[-1] if msg else f'exit {r.returncode}'}")
    return r.stdout


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"


@contextlib.contextmanager
def _locked(store: str) -> Iterator[None]:
    if not os.path.isdir(store):
        raise errors.StoreNotFound(f"no snapdisk store in {store}")
    os.makedirs(attach_dir(store), mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(attach_dir(store), ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(store: str, export: str) -> dict[str, Any] | None:
    try:
        with open(_record_path(store, export)) as f:
            rec: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    return rec


def _save(store: str, rec: dict[str, Any]) -> None:
    path = _record_path(store, rec["export"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _forget(store: str, export: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(store, export))
