"""Freeze a mounted filesystem around an operation (FIFREEZE / FITHAW), and always thaw it.

`snapshot create --freeze MOUNTPOINT` takes the snapshot inside `frozen(MOUNTPOINT)`: the kernel
flushes the filesystem's dirty data and journal to the block device and blocks new writes, so
the snapshot holds a clean filesystem (no journal replay on mount), the same guarantee as
fsfreeze(8) gives LVM snapshots.

A filesystem left frozen hangs every writer on it, so thawing must not be skippable:
  * SIGINT, SIGTERM and SIGHUP are blocked (pthread_sigmask) from before the freeze until
    after the thaw; one that arrives meanwhile is delivered after the thaw (Ctrl-C then
    interrupts the command as usual, with the filesystem already thawed);
  * the operation runs in a worker thread and the main thread waits at most `timeout_s`:
    past that it thaws anyway and reports the operation as unfinished.
  * a filesystem that holds the store, or the Python running us, is refused: freezing it
    could wait for writes that can only happen after the thaw (a deadlock).
A SIGKILL between freeze and thaw still leaves the filesystem frozen: `fsfreeze -u
MOUNTPOINT` thaws it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

from . import errors

# linux/fs.h: #define FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
DEFAULT_TIMEOUT_S = 60.0

T = TypeVar("T")


def check_freezable(mountpoint: str, keep_writable: list[str]) -> None:
    """Refuse a path that is not a mount point, or one whose filesystem holds any of
    keep_writable (the store, say): freezing it would deadlock the operation."""
    if not os.path.isdir(mountpoint):
        raise errors.InvalidArgument(f"--freeze {mountpoint}: not a directory")
    if not os.path.ismount(mountpoint):
        raise errors.InvalidArgument(f"--freeze {mountpoint}: not a mount point")
    dev = os.stat(mountpoint).st_dev
    for path in keep_writable:
        if os.path.exists(path) and os.stat(path).st_dev == dev:
            raise errors.InvalidArgument(
                f"--freeze {mountpoint}: that filesystem holds {path}, which must stay "
                "writable during the snapshot")


def run_frozen(mountpoint: str, op: Callable[[], T], timeout_s: float = DEFAULT_TIMEOUT_S) -> T:
    """op() with the filesystem mounted at mountpoint frozen; thawed before returning or
    raising, whatever happens."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            raise errors.Unsupported(f"cannot freeze {mountpoint}: {e.strerror}") from None
        try:
            return _run_bounded(op, timeout_s, mountpoint)
        finally:
            _thaw(fd, mountpoint)
    finally:
        os.close(fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _run_bounded(op: Callable[[], T], timeout_s: float, mountpoint: str) -> T:
    result: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(op())
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    worker = threading.Thread(target=work, name="snapdisk-frozen-op", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise errors.ServerError(
            f"the operation did not finish within {timeout_s:g} s; {mountpoint} was thawed "
            "anyway, and the operation may still complete")
    if failure:
        raise failure[0]
    return result[0]


def _thaw(fd: int, mountpoint: str) -> None:
    for _ in range(3):
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            return
        except InterruptedError:
            continue
        except OSError as e:
            raise errors.SnapdiskError(
                f"could not thaw {mountpoint}: {e.strerror}; run `fsfreeze -u {mountpoint}`"
            ) from None
