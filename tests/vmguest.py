"""Run a shell script in a QEMU guest whose real Linux kernel has an NBD client (/dev/nbd0).

    from vmguest import run_guest_script, NBD_HOST, NBD_PORT
    r = run_guest_script("/path/nbd.sock", "nbd-client 10.0.2.100 10809 /dev/nbd0 -N vol ...")
    r.returncode, r.output, r.console_text

How it works:

* The initramfs is built by scripts/build-vm-initramfs (busybox, modules e1000/nbd/ext4...,
  nbd-client, e2fsprogs, /init) once per cache key and cached under $SNAPDISK_VM_CACHE, default
  <repo>/.cache/vmguest/ (git-ignored); the key covers the build script, the kernel version and
  the host binaries it copies, so a changed script or an upgraded package rebuilds it.  Within a
  process the path is memoised, so a pytest session builds (or just checks) it once.
* The script reaches the guest as a second cpio archive (gzip'd newc, /snapdisk/script plus any
  `files`) appended to the cached base archive: the kernel unpacks concatenated initramfs
  archives in order.  No fw_cfg, 9p or virtio needed.
* QEMU (TCG only: never KVM) boots Debian's /boot/vmlinuz-<kver> with -M pc, an e1000 NIC on
  user-mode networking with restrict=on (the guest reaches nothing but the forwards below) and
  guestfwd=tcp:10.0.2.100:10809-cmd:socat - UNIX-CONNECT:<sock>: every guest TCP connection to
  10.0.2.100:10809 gets its own socat to the host's NBD unix socket.  In the guest:
      nbd-client 10.0.2.100 10809 /dev/nbd0 -N EXPORT -b 4096     (newstyle; -d to detach)
* ttyS0 (the console: kernel log, init, and a copy of the script's output) and ttyS1 (the
  script's stdout+stderr alone) go to files in the run's directory.  /init prints
  ===SNAPDISK-GUEST-END rc=N=== on both and powers off.  QEMU runs in its own process group and
  is SIGKILLed by pid/pgid in a finally (timeout, error, KeyboardInterrupt), as are the socat
  children it spawned; QEMU also gets PR_SET_PDEATHSIG=SIGKILL, so it dies with its parent.

Environment: SNAPDISK_VM_CACHE (cache dir), SNAPDISK_VM_KVER (kernel version),
SNAPDISK_VM_ECHO=1 (stream the console to stderr while the guest runs), SNAPDISK_VM_KEEP=1
(keep the run directory even without `workdir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-vm-initramfs"
NBD_HOST = "10.0.2.100"  # where the guest finds the host's NBD socket
NBD_PORT = 10809
GUEST_IP = "10.0.2.15"
BEGIN_MARKER = "===SNAPDISK-GUEST-BEGIN==="
END_RE = re.compile(r"===SNAPDISK-GUEST-END rc=(\d+)===")
POWEROFF_GRACE_S = 15.0  # after the end marker, how long QEMU gets to exit by itself


class GuestError(RuntimeError):
    """The guest did not produce a result (QEMU failed, kernel panic, no end marker), or, from
    GuestResult.check(), the script failed.  Carries the console and the script's output."""

    def __init__(self, message: str, console_text: str = "", output: str = "",
                 returncode: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.console_text = console_text
        self.output = output
        self.returncode = returncode

    def __str__(self) -> str:
        tail = "\n".join(self.console_text.splitlines()[-80:])
        return f"{self.message}\n--- guest console (last 80 lines) ---\n{tail}"


class GuestTimeout(GuestError):
    """The guest ran past timeout_s; QEMU was killed."""


@dataclass(frozen=True)
class GuestResult:
    returncode: int  # the script's exit status in the guest
    console_text: str  # ttyS0: kernel log, init messages, the script's output, the end marker
    output: str  # ttyS1: the script's stdout and stderr only, without markers
    elapsed_s: float  # QEMU start to QEMU exit
    boot_s: float | None  # guest uptime when the script started (from init's log), if known

    def check(self) -> GuestResult:
        """Raise GuestError unless the script exited 0; return self otherwise."""
        if self.returncode != 0:
            raise GuestError(f"guest script exited {self.returncode}; output:\n{self.output}",
                             self.console_text, self.output, self.returncode)
        return self


# ---- kernel and initramfs ------------------------------------------------------------------------

_kver_memo: str | None = None
_initramfs_memo: dict[tuple[str, tuple[str, ...]], Path] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("SNAPDISK_VM_CACHE") or REPO / ".cache" / "vmguest")


def guest_kernel() -> tuple[str, Path]:
    """(version, /boot/vmlinuz-version) of the kernel the guest boots: the one
    build-vm-initramfs picks (which also installs the apt dependencies when missing)."""
    global _kver_memo
    if _kver_memo is None:
        p = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-kver"], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=1800)
        if p.returncode != 0:
            raise GuestError(f"build-vm-initramfs --print-kver failed:\n{p.stderr}")
        _kver_memo = p.stdout.strip()
    return _kver_memo, Path(f"/boot/vmlinuz-{_kver_memo}")


def _fingerprint(kver: str, modules: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(BUILD_SCRIPT.read_bytes())
    h.update(f"{kver}\0{','.join(modules)}\0".encode())
    for name in ("busybox", "nbd-client", "mke2fs", "e2fsck"):
        path = shutil.which(name, path="/bin:/sbin:/usr/bin:/usr/sbin")
        if path:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for path in (f"/lib/modules/{kver}/modules.dep", "/etc/mke2fs.conf"):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def build_initramfs(modules: Sequence[str] = (), force: bool = False) -> Path:
    """The base initramfs for guest_kernel() (plus extra `modules`), built if not cached."""
    kver, _ = guest_kernel()
    key = (kver, tuple(modules))
    if not force and key in _initramfs_memo and _initramfs_memo[key].exists():
        return _initramfs_memo[key]
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"initramfs-{kver}-{_fingerprint(kver, modules)}.cpio.gz"
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions/workers build once
        if force or not out.exists():
            cmd = ["bash", str(BUILD_SCRIPT), "--kver", kver]
            for m in modules:
                cmd += ["--module", m]
            p = subprocess.run(cmd + [str(out)], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=1800)
            if p.returncode != 0 or not out.exists():
                raise GuestError(f"build-vm-initramfs failed ({p.returncode}):\n{p.stderr}")
            for old in d.glob("initramfs-*.cpio.gz"):  # builds superseded a day ago or more
                with contextlib.suppress(OSError):
                    if old != out and time.time() - old.stat().st_mtime > 86400:
                        old.unlink()
    _initramfs_memo[key] = out
    return out


# ---- the script's archive ---------------------------------------------------------------------------

def _cpio_newc(entries: Sequence[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data) entries, owned by root, plus the trailer."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nameb = name.encode() + b"\0"
        trailer = name == "TRAILER!!!"
        fields = (0 if trailer else ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0,
                  len(data), 0, 0, 0, 0, len(nameb), 0)
        out.write(b"070701" + "".join(f"{v:08X}" for v in fields).encode() + nameb)
        pad()
        out.write(data)
        pad()
    return out.getvalue()


def script_archive(script: str, files: Mapping[str, bytes | str | Path] | None = None) -> bytes:
    """gzip'd cpio with /snapdisk/script and `files` (guest path -> content; a Path is read from
    the host and keeps its exec bit; bytes/str starting with '#!' are made executable)."""
    items: dict[str, tuple[int, bytes]] = {"snapdisk/script": (0o755, script.encode())}
    for gpath, content in (files or {}).items():
        rel = os.path.normpath(gpath).lstrip("/")
        if rel.startswith("..") or rel in ("", "."):
            raise ValueError(f"bad guest path {gpath!r}")
        if isinstance(content, Path):
            data = content.read_bytes()
            perm = 0o755 if os.access(content, os.X_OK) else 0o644
        else:
            data = content.encode() if isinstance(content, str) else bytes(content)
            perm = 0o755 if data.startswith(b"#!") else 0o644
        items[rel] = (perm, data)
    dirs = sorted({str(p) for rel in items for p in Path(rel).parents if str(p) != "."})
    entries = [(d, stat.S_IFDIR | 0o755, b"") for d in dirs]
    entries += [(rel, stat.S_IFREG | perm, data) for rel, (perm, data) in items.items()]
    return gzip.compress(_cpio_newc(entries), compresslevel=1, mtime=0)


# ---- processes -----------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = s[s.rfind(")") + 2:].split()
    return int(rest[1]), int(rest[19])


def _note_descendants(root: int, seen: dict[int, int]) -> None:
    """Add every live descendant of root to seen (pid -> starttime)."""
    parents = {root, *seen}
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return
    changed = True
    info = {pid: f for pid in pids if (f := _stat_fields(pid)) is not None}
    while changed:
        changed = False
        for pid, (ppid, start) in info.items():
            if ppid in parents and pid not in parents:
                seen[pid] = start
                parents.add(pid)
                changed = True


def _kill_qemu(proc: subprocess.Popen[bytes], seen: dict[int, int]) -> None:
    """SIGKILL QEMU's process group (it leads its own session) and every descendant recorded,
    each by pid and only if it is still the same process (same start time)."""
    if proc.poll() is None:
        _note_descendants(proc.pid, seen)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    for pid, start in seen.items():
        f = _stat_fields(pid)
        if f is not None and f[1] == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL QEMU if the thread that started it dies (e.g. pytest SIGKILLed)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _qemu_escape(value: str) -> str:
    return value.replace(",", ",,")


_SAFE_PATH = re.compile(r"^[A-Za-z0-9/._+-]+$")


@contextlib.contextmanager
def _run_dir(workdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix="vm-", dir=workdir))
        return
    d = Path(tempfile.mkdtemp(prefix="snapdisk-vm-"))
    try:
        yield d
    finally:
        if not os.environ.get("SNAPDISK_VM_KEEP"):
            shutil.rmtree(d, ignore_errors=True)


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007
        pass
    return found


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
    except OSError:
        return ""


# ---- the entry point --------------------------------------------------------------------------------

def run_guest_script(sock_path: str | os.PathLike[str] | None, script: str,
                     timeout_s: float = 300, workdir: str | os.PathLike[str] | None = None, *,
                     files: Mapping[str, bytes | str | Path] | None = None,
                     modules: Sequence[str] = (), memory_mb: int = 512, cpus: int = 1,
                     append: str = "", echo: bool | None = None) -> GuestResult:
    """Boot the guest, run `script` (busybox sh, as root, cwd /root, stdin /dev/null) and return
    its exit status and output.  With sock_path, the guest reaches that NBD unix socket at
    NBD_HOST:NBD_PORT (10.0.2.100:10809); nothing else is reachable.  The run's files (console.log,
    output.log, qemu.log, initrd) go to a fresh vm-* directory under workdir, kept; without
    workdir, to a temp directory removed afterwards.

    Raises GuestTimeout after timeout_s (wall clock from QEMU's start), GuestError if the guest
    ends without the end marker or QEMU cannot start.  A non-zero script status is returned, not
    raised: call .check() for that.  QEMU and its socat children are killed by pid in every case.
    """
    if echo is None:
        echo = bool(os.environ.get("SNAPDISK_VM_ECHO"))
    base = build_initramfs(modules)  # also installs the apt dependencies when missing
    kver, vmlinuz = guest_kernel()
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise GuestError("qemu-system-x86_64 not found (apt-get install -y qemu-system-x86)")
    if not vmlinuz.exists():
        raise GuestError(f"{vmlinuz} not found")

    with _run_dir(workdir) as run, contextlib.ExitStack() as cleanup:
        initrd = run / "initrd.cpio.gz"
        with open(initrd, "wb") as f:
            with open(base, "rb") as b:
                shutil.copyfileobj(b, f)
            f.write(script_archive(script, files))
        console, output, qemu_log = run / "console.log", run / "output.log", run / "qemu.log"

        netdev = "user,id=n0,restrict=on"
        if sock_path is not None:
            sock = os.path.abspath(sock_path)
            # A symlink with a short, plain path: QEMU option syntax (commas), socat address
            # syntax (':' ',') and sun_path's 108 bytes all stay out of the way.
            link_dir = run if _SAFE_PATH.match(str(run)) and len(str(run)) < 80 else None
            if link_dir is None:
                link_dir = Path(tempfile.mkdtemp(prefix="snapdisk-vm-sock-"))
                cleanup.callback(shutil.rmtree, link_dir, True)
            link = link_dir / "nbd.sock"
            link.symlink_to(sock)
            socat = shutil.which("socat") or "socat"
            netdev += (f",guestfwd=tcp:{NBD_HOST}:{NBD_PORT}-cmd:"
                       f"{_qemu_escape(socat)} - UNIX-CONNECT:{link}")
        kernel_args = ("console=ttyS0 panic=-1 oops=panic loglevel=6 8250.nr_uarts=2 "
                       "random.trust_cpu=on mitigations=off tsc=reliable " + append).strip()
        cmd = [
            qemu, "-M", "pc", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb),
            "-smp", str(cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-monitor", "none",
            "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", kernel_args,
            "-chardev", f"file,id=s0,path={_qemu_escape(str(console))}", "-serial", "chardev:s0",
            "-chardev", f"file,id=s1,path={_qemu_escape(str(output))}", "-serial", "chardev:s1",
            "-netdev", netdev, "-device", "e1000,netdev=n0",
        ]
        (run / "qemu.cmd").write_text(" ".join(repr(a) if " " in a else a for a in cmd) + "\n")

        seen: dict[int, int] = {}
        start = time.monotonic()
        with open(qemu_log, "wb") as qlog:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        timed_out = False
        try:
            end_seen: float | None = None
            echo_pos = 0
            last_scan = 0.0
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if now - last_scan >= 0.5:
                    _note_descendants(proc.pid, seen)
                    last_scan = now
                if echo:
                    with contextlib.suppress(OSError), open(console, "rb") as f:
                        f.seek(echo_pos)
                        chunk = f.read()
                        echo_pos += len(chunk)
                        sys.stderr.write(chunk.decode(errors="replace").replace("\r", ""))
                        sys.stderr.flush()
                if end_seen is None and END_RE.search(_read(output)[-200:]):
                    end_seen = now
                if end_seen is not None and now - end_seen > POWEROFF_GRACE_S:
                    break  # the result is in; the guest just did not power off
                if now - start > timeout_s:
                    timed_out = True
                    break
        finally:
            _kill_qemu(proc, seen)
        elapsed = time.monotonic() - start

        console_text, output_raw = _read(console), _read(output)
        where = (f"run dir {run}" if workdir is not None or os.environ.get("SNAPDISK_VM_KEEP")
                 else "set SNAPDISK_VM_KEEP=1 or pass workdir= to keep the run's files")
        if timed_out:
            raise GuestTimeout(f"guest timed out after {timeout_s:.0f}s (QEMU killed); "
                               f"{where}", console_text, output_raw)
        # The last marker: a script printing one of its own cannot fake the status.
        m = _last(END_RE, output_raw) or _last(END_RE, console_text)
        if m is None:
            raise GuestError(f"guest ended without the end marker (QEMU exit {proc.returncode}; "
                             f"qemu.log: {_read(qemu_log).strip()!r}); {where}",
                             console_text, output_raw)
        m_out = _last(END_RE, output_raw)
        body = output_raw[:m_out.start()] if m_out else ""
        if BEGIN_MARKER in body:
            body = body.split(BEGIN_MARKER + "\n", 1)[-1]
        boot = re.search(r"snapdisk-init: eth0 up .*, up ([0-9.]+)s", console_text)
        return GuestResult(returncode=int(m.group(1)), console_text=console_text, output=body,
                           elapsed_s=elapsed, boot_s=float(boot.group(1)) if boot else None)


# ---- building blocks for guest scripts ---------------------------------------------------------------

def nbd_connect_cmd(export: str = "", device: str = "/dev/nbd0", block_size: int = 4096,
                    extra: str = "") -> str:
    """Shell command attaching `device` to `export` of the forwarded NBD socket: Debian's
    nbd-client 3.24, newstyle negotiation, netlink by default (add extra="-L" for ioctls)."""
    args = ["nbd-client"] + (["-N", shlex.quote(export)] if export else [])
    args += ["-b", str(block_size)] + ([extra] if extra else [])
    return " ".join(args + [NBD_HOST, str(NBD_PORT), device])


def nbd_disconnect_cmd(device: str = "/dev/nbd0") -> str:
    return f"nbd-client -d {device}"


HELLO_TEXT = "snapdisk-vm-ok\n"
PATTERN_LINES = 400_000  # `seq 1 400000`: 2.7 MB, deterministic, cheap to recompute here


def pattern_bytes(lines: int = PATTERN_LINES) -> bytes:
    """What `seq 1 LINES` prints: the pattern file ext4_check_script writes."""
    return "".join(f"{i}\n" for i in range(1, lines + 1)).encode()


def ext4_check_script(export: str = "", device: str = "/dev/nbd0") -> str:
    """The guest half of the smoke check: attach, mkfs.ext4, mount, write /hello.txt and
    /pattern.txt (seq 1 400000), sync, unmount, e2fsck -fn over NBD, detach."""
    return f"""set -e
echo "+ attach"
{nbd_connect_cmd(export, device)}
echo "size: $(blockdev --getsize64 {device}) bytes"
echo "+ mkfs"
mkfs.ext4 -F -q {device}
mkdir -p /mnt
mount -t ext4 {device} /mnt
echo "+ write"
printf '{HELLO_TEXT.rstrip()}\\n' > /mnt/hello.txt
seq 1 {PATTERN_LINES} > /mnt/pattern.txt
sync
echo "pattern sha256: $(sha256sum /mnt/pattern.txt | cut -d' ' -f1)"
umount /mnt
echo "+ fsck"
e2fsck -fn {device}
echo "+ detach"
{nbd_disconnect_cmd(device)}
echo "snapdisk vm nbd check: ok"
"""
