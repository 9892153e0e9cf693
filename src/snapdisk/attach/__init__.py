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

The package: this module chooses a method and dispatches to it; `nbd` and `loop` are the two
methods, `records` the records, the lock and the paths, `host` the tools and the mount table.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from .. import errors
from ..exportspec import ExportSpec
from . import loop, nbd
from .host import holders, mounted_at, require_root
from .records import attach_dir, export_uri, forget, load, locked, nbd_socket

__all__ = ["METHODS", "attach", "attach_dir", "detach", "export_uri", "find", "list_attachments",
           "nbd_socket"]

METHODS = ("auto", "nbd", "loop")


# ---- public API ------------------------------------------------------------------------------

def attach(store: str, export: str, method: str = "auto", readonly: bool = False) -> str:
    """Attach `export` (VOLUME or VOLUME@SNAPSHOT) of the store's running server as a block
    device and return its path.  Snapshots are always read-only."""
    if method not in METHODS:
        raise errors.InvalidArgument(f"attach method must be one of {METHODS}, not {method!r}")
    spec = ExportSpec.parse(export)  # also what makes it safe as a file name in STORE/attach
    readonly = readonly or spec.snapshot is not None
    require_root("attach")
    if not _server_listening(store):
        raise errors.NotRunning(
            f"no snapdisk server is listening on {nbd_socket(store)}: start one with "
            "`snapdisk serve` (attach needs its NBD socket)")
    with locked(store):
        old = load(store, export)
        if old is not None:
            if _alive(old):
                raise errors.AlreadyExists(f"{export} is already attached as {old['device']}")
            _teardown(old)  # stale (reboot, crash): clear what is left of it
            forget(store, export)
        if method == "auto":
            method = "nbd" if nbd.have_driver() else "loop"
        elif method == "nbd" and not nbd.have_driver():
            raise errors.Unsupported("this kernel has no nbd driver (modprobe nbd failed): "
                                     "use --method loop (nbdfuse and a loop device)")
        rec = (nbd.attach(store, export, readonly) if method == "nbd"
               else loop.attach(store, export, readonly))
        return str(rec["device"])


def detach(store: str, target: str) -> dict[str, Any]:
    """Detach what attach made for `target`: an export name, or the device it returned.
    Refused (Busy) while the device is mounted.  Returns the record it undid."""
    require_root("detach")
    with locked(store):
        rec = find(store, target)
        dev = rec["device"]
        if _ours(rec):
            where = mounted_at(dev)
            if where:
                raise errors.Busy(f"{dev} ({rec['export']}) is mounted on {where}: "
                                  "unmount it first")
            users = holders(dev)
            if users:
                raise errors.Busy(f"{dev} ({rec['export']}) is in use by {', '.join(users)}")
        _teardown(rec)
        forget(store, rec["export"])
        return rec


def list_attachments(store: str) -> list[dict[str, Any]]:
    """Every attach record of the store, each with `alive`: whether its pieces still exist."""
    d = attach_dir(store)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            rec = load(store, name[:-5])
            if rec is not None:
                out.append({**rec, "alive": _alive(rec)})
    return out


def find(store: str, target: str) -> dict[str, Any]:
    """The record for an export name or a device path."""
    if not target.startswith("/"):
        rec = load(store, target)
        if rec is not None:
            return rec
    else:
        real = os.path.realpath(target)
        for rec in list_attachments(store):
            if os.path.realpath(rec["device"]) == real:
                return rec
    raise errors.NotFound(f"nothing attached from {store} as {target!r} "
                          "(`snapdisk status` lists what is attached)")

# ---- dispatch by method -------------------------------------------------------------------------

def _ours(rec: dict[str, Any]) -> bool:
    """Whether the record's device is still the one attach made."""
    dev = rec.get("device")
    if not dev:
        return False
    if rec["method"] == "loop":
        return bool(loop.backing(dev) == rec["file"])
    return nbd.connected(dev)


def _alive(rec: dict[str, Any]) -> bool:
    if rec["method"] == "loop":
        return _ours(rec) and loop.nbdfuse_is_ours(rec)
    return _ours(rec)


def _teardown(rec: dict[str, Any]) -> None:
    if rec["method"] == "loop":
        loop.teardown(rec)
    else:
        nbd.teardown(rec)


def _server_listening(store: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(nbd_socket(store)).st_mode)
    except OSError:
        return False
