"""Attach through the kernel's nbd driver: nbd-client -unix STORE/nbd.sock /dev/nbdN -N EXPORT
(nbd-client 3.24 hands the socket to the kernel over netlink and exits)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

from .. import errors
from .host import require_tool, run
from .records import nbd_socket, save


def have_driver() -> bool:
    if os.path.isdir("/sys/module/nbd"):
        return True
    if shutil.which("modprobe") is None:
        return False
    r = subprocess.run(["modprobe", "nbd"], capture_output=True)
    return r.returncode == 0 and os.path.isdir("/sys/module/nbd")


def _free_device() -> str:
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


def attach(store: str, export: str, readonly: bool) -> dict[str, Any]:
    require_tool("nbd-client")
    dev = _free_device()
    rec: dict[str, Any] = {"export": export, "method": "nbd", "device": dev,
                           "readonly": readonly, "created": time.time()}
    cmd = ["nbd-client", "-unix", nbd_socket(store), dev, "-N", export]
    run(cmd + (["-readonly"] if readonly else []))
    save(store, rec)
    return rec


def connected(dev: str) -> bool:
    name = os.path.basename(os.path.realpath(dev))
    return os.path.exists(f"/sys/block/{name}/pid")


def teardown(rec: dict[str, Any]) -> None:
    if connected(rec["device"]):
        run(["nbd-client", "-d", rec["device"]])

