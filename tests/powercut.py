"""Power-cut harness: a filesystem on a recording disk, and the disks a power cut could leave.

The stack (everything on tmpfs, torn down by pid and by exact device/path, even on failure):

    ext4 (mounted at FS) -> /dev/loopN (--direct-io, 4 KiB sectors) -> nbdfuse file
        -> nbdkit + powercut_device.py (serves DISK.img, logs every write/zero/FLUSH)

A workload runs against a store on FS and logs, with CLOCK_MONOTONIC times, what it started and
what returned.  Afterwards `replay` walks the device log once, and for each cut instant T builds
the disk a power cut at T could leave: every request logged before the last FLUSH before T
applied (flushed writes are durable), every FUA write applied, and for each 4 KiB sector
written since that FLUSH, one of its versions (the durable one or any later one), chosen by a
seeded rng: a disk's volatile cache may write back any subset of its unflushed sectors, in any
order.  Nothing still in a page cache above the device at T (the loop device's, ext4's,
LMDB's map) is in the log, so it is lost, as in a power cut.  4 KiB sectors are atomic (the
loop device's logical block size; a 512e disk could also tear a 4 KiB block, which ext4
tolerates and snapdisk's docs admit for in-place writes).

Why this is faithful and not merely harsh: see docs/powercut.md.  The harness checks its own
model on every cut: ext4 must come back clean (journal replay, then `e2fsck -fn` exit 0); a
model that lost flushed data or tore sectors would break ext4 too.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE_PLUGIN = os.path.join(HERE, "powercut_device.py")
REC = struct.Struct("<BBxxxxxxQQd")  # powercut_device.REC
WRITE, FLUSH, ZERO = 1, 2, 3
FUA = 1
SECTOR = 4096


def tools_missing() -> list[str]:
    need = ["nbdkit", "nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "e2fsck", "mount"]
    missing = [t for t in need if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def _run(args: list[str], timeout: float = 60) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def _stop_pid(proc: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL, this one process (never by name)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Cleanup:
    """Undo actions run in reverse; a failing one does not stop the rest."""

    def __init__(self) -> None:
        self.stack: list[tuple[str, Callable[[], object]]] = []
        self.errors: list[str] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self.stack.append((what, fn))

    def run(self) -> None:
        while self.stack:
            what, fn = self.stack.pop()
            try:
                fn()
            except Exception as e:
                self.errors.append(f"{what}: {e!r}")


def loop_attach(path: str, cleanup: Cleanup, *extra: str) -> str:
    dev = _run(["losetup", "--find", "--show", *extra, path]).strip()
    cleanup.push(f"loop {dev}", lambda: _detach_loop(dev, path))
    return dev


def _detach_loop(dev: str, path: str) -> None:
    # only if it is still ours: backed by our file
    out = _run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE", dev])
    if os.path.realpath(path) in out or path in out:
        _run(["losetup", "-d", dev])


def mount(dev: str, where: str, cleanup: Cleanup, *opts: str) -> None:
    os.makedirs(where, exist_ok=True)
    _run(["mount", *opts, dev, where])
    cleanup.push(f"mount {where}", lambda: _umount(where))


def _umount(where: str) -> None:
    if _mounted(where):
        r = subprocess.run(["umount", where], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", where], capture_output=True, timeout=60)
            raise RuntimeError(f"umount {where}: {r.stderr.strip()} (lazily unmounted)")


@dataclass
class Rig:
    """The recording stack; `fs` is the mounted filesystem, `log` the device's request log."""

    root: str
    size: int
    cleanup: Cleanup = field(default_factory=Cleanup)
    fs: str = ""
    log: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, args: list[str], what: str, **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        self.cleanup.push(f"{what} pid {proc.pid}", lambda: _stop_pid(proc))
        return proc


@contextlib.contextmanager
def recording_fs(root: str, size: int = 256 << 20) -> Iterator[Rig]:
    """ext4 of `size` bytes over the recording disk; its files in root (a tmpfs directory the
    caller removes), the device log (rig.log) kept there for the replay."""
    rig = Rig(root, size)
    try:
        image, rig.log = os.path.join(root, "disk.img"), os.path.join(root, "rec.log")
        sock, fuse_dir = os.path.join(root, "nbd.sock"), os.path.join(root, "fuse")
        with open(image, "wb") as f:
            f.truncate(size)
        os.makedirs(fuse_dir)
        errlog = open(os.path.join(root, "servers.log"), "wb")  # noqa: SIM115
        rig.cleanup.push("close log", errlog.close)
        nbdkit = rig.spawn(["nbdkit", "-f", "-U", sock, "python", DEVICE_PLUGIN,
                            f"image={image}", f"log={rig.log}", f"size={size}"], "nbdkit",
                           stdout=errlog, stderr=errlog)
        _wait_for(lambda: os.path.exists(sock), nbdkit, "nbdkit socket")
        fuse_file, pidfile = os.path.join(fuse_dir, "disk"), os.path.join(root, "nbdfuse.pid")
        nbdfuse = rig.spawn(["nbdfuse", "-C", "1", "-P", pidfile, fuse_file,
                             f"nbd+unix:///?socket={sock}"], "nbdfuse",
                            stdout=errlog, stderr=errlog)
        rig.cleanup.push(f"fuse {fuse_dir}", lambda: _fuse_unmount(fuse_dir))
        _wait_for(lambda: os.path.exists(pidfile), nbdfuse, "nbdfuse")
        dev = loop_attach(fuse_file, rig.cleanup, "--direct-io=on", "--sector-size",
                          str(SECTOR))
        _run(["mkfs.ext4", "-q", "-F", "-b", str(SECTOR),
              "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev])
        rig.fs = os.path.join(root, "fs")
        mount(dev, rig.fs, rig.cleanup)
        yield rig
    finally:
        for proc in rig.procs[2:]:  # workers first: they hold files on the filesystem
            _stop_pid(proc)
        rig.cleanup.run()
    if rig.cleanup.errors:
        raise RuntimeError(f"power-cut rig teardown: {rig.cleanup.errors}")


def _fuse_unmount(fuse_dir: str) -> None:
    if _mounted(fuse_dir):
        _run(["fusermount3", "-u", fuse_dir])


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after 30 s")
        time.sleep(0.02)


# ---- replay ------------------------------------------------------------------------------------

@dataclass
class Cut:
    """One cut's disk image and what the replay knew when it made it."""

    index: int
    t: float  # the cut instant (CLOCK_MONOTONIC)
    image: str
    pending_sectors: int  # sectors written since the last FLUSH
    kept: int  # ... of which a newer version than the durable one reached the image
    mode: str


def read_log(path: str) -> tuple[mmap.mmap, list[tuple[int, int, int, int, float, int]]]:
    """The device log: (kind, flags, offset, length, time, data position) per request."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    recs, pos = [], 0
    while pos + REC.size <= len(m):
        kind, flags, off, length, t = REC.unpack_from(m, pos)
        pos += REC.size
        recs.append((kind, flags, off, length, t, pos))
        if kind == WRITE:
            pos += length
    return m, recs


def cut_times(log_path: str, start: float, end: float, n: int, rng: random.Random
              ) -> list[float]:
    """n cut instants spread over [start, end): one per equal slot, at a uniformly random
    time in even slots (where a power cut lands: mostly between flushes, with nothing
    unflushed on the device) and just after a random device write in odd ones (inside a
    flush's or a writeback's burst, where the interesting states are)."""
    m, recs = read_log(log_path)
    m.close()
    times = [r[4] for r in recs]
    writes = [k for k, r in enumerate(recs) if r[0] != FLUSH and start <= r[4] < end]
    wt = [times[k] for k in writes]
    slot, out = (end - start) / n, []
    for i in range(n):
        lo, hi = start + i * slot, start + (i + 1) * slot
        a, b = bisect.bisect_left(wt, lo), bisect.bisect_left(wt, hi)
        if i % 2 == 0 or a == b:
            out.append(rng.uniform(lo, hi))
            continue
        k = writes[rng.randrange(a, b)]
        nxt = times[k + 1] if k + 1 < len(times) else times[k] + 1e-3
        out.append((times[k] + nxt) / 2)
    return out


def replay(log_path: str, size: int, cut_times: list[float], seed: int, workdir: str
           ) -> Iterator[Cut]:
    """For each time in cut_times (ascending): the image a power cut at that instant could
    leave, built in workdir; it is deleted when the caller asks for the next one."""
    m, recs = read_log(log_path)
    rng = random.Random(seed)
    durable = os.path.join(workdir, "durable.img")
    with open(durable, "wb") as f:
        f.truncate(size)
    dfd = os.open(durable, os.O_RDWR)
    # sector -> versions since the last FLUSH; a FUA version first means "no older choice"
    pending: dict[int, list[tuple[bytes, bool]]] = {}
    zero = bytes(SECTOR)

    def latest(sec: int) -> bytes:
        v = pending.get(sec)
        return v[-1][0] if v else os.pread(dfd, SECTOR, sec * SECTOR)

    try:
        i = 0
        for n, t_cut in enumerate(cut_times):
            while i < len(recs) and recs[i][4] < t_cut:
                kind, flags, off, length, _, dpos = recs[i]
                i += 1
                if kind == FLUSH:
                    for sec, versions in pending.items():
                        os.pwrite(dfd, versions[-1][0], sec * SECTOR)
                    pending.clear()
                    continue
                for sec in range(off // SECTOR, -(-(off + length) // SECTOR)):
                    s, e = max(off, sec * SECTOR), min(off + length, (sec + 1) * SECTOR)
                    new = (m[dpos + s - off:dpos + e - off] if kind == WRITE else zero[:e - s])
                    if e - s < SECTOR:  # a partial sector: the rest is what the disk holds
                        old = bytearray(latest(sec))
                        old[s - sec * SECTOR:e - sec * SECTOR] = new
                        new = bytes(old)
                    if flags & FUA:
                        pending[sec] = [(new, True)]
                    else:
                        pending.setdefault(sec, []).append((new, False))
            image = os.path.join(workdir, f"cut{n}.img")
            _run(["cp", "--sparse=always", durable, image])
            mode = rng.choice(["lose-all", "keep-all", "random", "random"])
            kept = 0
            with open(image, "r+b") as img:
                for sec, versions in pending.items():
                    choices = ([] if versions[0][1] else [None]) + [v for v, _ in versions]
                    if mode == "lose-all":
                        pick = choices[0]
                    elif mode == "keep-all":
                        pick = choices[-1]
                    else:
                        pick = rng.choice(choices)
                    if pick is not None:
                        kept += 1
                        os.pwrite(img.fileno(), pick, sec * SECTOR)
            yield Cut(i, t_cut, image, len(pending), kept, mode)
            os.unlink(image)
    finally:
        os.close(dfd)
        m.close()


def recover_fs(image: str) -> str | None:
    """What a reboot does to the cut filesystem: replay ext4's journal; then it must be clean
    (`e2fsck -fn` exit 0).  None if so, else e2fsck's complaint (the harness's model is wrong,
    or ext4 is)."""
    r = subprocess.run(["e2fsck", "-y", "-E", "journal_only", image], capture_output=True,
                       text=True, timeout=120)
    if r.returncode not in (0, 1):  # 1: the journal was replayed
        return f"e2fsck journal replay: exit {r.returncode}: {r.stdout[-800:]}{r.stderr[-400:]}"
    r = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"e2fsck -fn exit {r.returncode} after recovery: {r.stdout[-800:]}"
    return None


def run_in(image: str, root: str, args: list[str], timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    """Mount image (read-write, like a reboot) at root/mnt, run args with MNT in them replaced
    by the mount point, unmount, detach: all undone even if args fails or hangs."""
    cleanup = Cleanup()
    try:
        dev = loop_attach(image, cleanup)
        mnt = os.path.join(root, "mnt")
        mount(dev, mnt, cleanup)
        return subprocess.run([a.replace("MNT", mnt) for a in args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        cleanup.run()
        if cleanup.errors:
            raise RuntimeError(f"cut image teardown: {cleanup.errors}")


PY = sys.executable
