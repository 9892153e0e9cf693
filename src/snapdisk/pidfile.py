"""Which process is a store's server: the pid file names it with its start time.

The server writes STORE/server.pid itself (write_pidfile, in the plugin's after_fork) as "PID
START", START being field 22 of /proc/PID/stat (clock ticks since boot).  A process is the
server only if both match: a stale pid file naming a recycled pid, a kernel thread or any
process called nbdkit is stale, and nothing signals it.  nbdkit's own pid file ("PID" only,
written just before after_fork) names a server that is starting: serve reads it for liveness
only.
"""

from __future__ import annotations

import os
import signal
import time


def proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time in clock ticks since boot: field 22) of pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name may hold spaces and ')'
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """pid runs (any process).  One that is exiting counts as alive until it is a zombie: only
    then are its files, and so the store's flock, released."""
    st = proc_stat(pid)
    return st is not None and st[0] not in (b"Z", b"X", b"x")


def write_pidfile(path: str, pid: int) -> None:
    """Record pid as the server, with its start time (the server calls this itself)."""
    st = proc_stat(pid)
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid} {st[1] if st else 0}\n")
    os.replace(tmp, path)


def read_pidfile(pidfile: str) -> tuple[int, int | None] | None:
    """(pid, start time or None) from a pid file: snapdisk's "PID START", or nbdkit's "PID"
    (written before the server's own, at start)."""
    try:
        with open(pidfile) as f:
            parts = f.read().split()
        return int(parts[0]), (int(parts[1]) if len(parts) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None


def read_pid(pidfile: str) -> int | None:
    rec = read_pidfile(pidfile)
    return rec[0] if rec else None


def pidfile_names(pidfile: str, pid: int) -> bool:
    """The pid file names pid, started when pid did: the server and no other process."""
    rec = read_pidfile(pidfile)
    st = proc_stat(pid)
    return (rec is not None and st is not None and rec[0] == pid and rec[1] == st[1]
            and st[0] not in (b"Z", b"X", b"x"))


def same_process(pid: int, start: int | None) -> bool:
    """pid is alive and, if start is known, is the process that started then."""
    st = proc_stat(pid)
    return st is not None and st[0] not in (b"Z", b"X", b"x") and start in (None, st[1])


def wait_gone(pid: int, timeout: float, start: int | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while same_process(pid, start):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def kill_process(pid: int, timeout: float, start: int | None = None) -> None:
    """SIGTERM, then SIGKILL after timeout: to pid only while it is the process that started
    at `start` (a pid the kernel has since given to another process is left alone)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not same_process(pid, start):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, wait, start):
            return
