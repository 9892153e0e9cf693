"""The host side that both attach methods use: running tools, reading the mount table and
sysfs, the checks that come before any of it (root, installed tools)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator

from .. import errors


def mounts() -> Iterator[tuple[str, str]]:
    """(major:minor, mount point) of every mount, from /proc/self/mountinfo.  Unlike
    os.path.ismount this sees a FUSE mount whose server died (stat fails with ENOTCONN)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield fields[2], re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])


def is_mountpoint(path: str) -> bool:
    return any(mp == path for _, mp in mounts())


def mounted_at(dev: str) -> str | None:
    """The first mount point of the block device (matched by major:minor, so a device mounted
    through another name is still found)."""
    try:
        rdev = os.stat(dev).st_rdev
    except OSError:
        return None
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    return next((mp for devno, mp in mounts() if devno == want), None)


def holders(dev: str) -> list[str]:
    name = os.path.basename(os.path.realpath(dev))
    try:
        return sorted(os.listdir(f"/sys/block/{name}/holders"))
    except OSError:
        return []


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise errors.Unsupported(f"{what} needs root (loop and nbd devices are root's)")


def require_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        raise errors.Unsupported(f"{tool} is not installed (scripts/setup installs it)")


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise errors.SnapdiskError(f"{cmd[0]} failed: {msg[-1] if msg else f'exit {r.returncode}'}")
    return r.stdout


def tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"

