"""The servers under test, each started and stopped by pid.

    with NbdkitFile(raw, sockdir) as p:      # nbdkit's C `file` plugin (the C baseline)
        fio.run(p.target(), ...)

Peers: `RawFile` (no server: fio on the file, the machine's limit), `NbdkitFile`,
`Passthrough` (benchmarks/passthrough_plugin.py, mode=serialized|parallel: the ceiling of any
Python plugin), `QemuNbd` (qcow2), `QemuStorageDaemon` (qcow2 with a QMP monitor, for live
internal snapshots), `Snapdisk` (snapdisk.daemon.serve, threads=parallel|serialized).

Every pid started here goes into STARTED, so the run and the tests can check that nothing is
left behind; `stop()` always ends its process by pid (SIGTERM, then SIGKILL).  The daemons run
in the foreground of a child process (nbdkit -f --exit-with-parent, qemu-nbd, qemu-storage-daemon),
snapdisk in the background as `snapdisk serve` does, stopped through its control socket first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import time
from typing import Any

from benchmarks.fio import Target

HERE = os.path.dirname(os.path.abspath(__file__))
PASSTHROUGH = os.path.join(HERE, "passthrough_plugin.py")
STARTED: list[int] = []
EXPORT = "v"


def alive(pid: int) -> bool:
    """pid runs (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X", b"x")


def kill_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL; returns once pid is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if not alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def nbd_answers(path: str) -> bool:
    """The NBD listener on unix socket path greets us; end the handshake politely."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(path)
            hello = s.recv(18, socket.MSG_WAITALL)
            if hello[:8] != b"NBDMAGIC":
                return False
            s.sendall(struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 2, 0))
            with contextlib.suppress(OSError):
                s.recv(20, socket.MSG_WAITALL)
            return True
    except OSError:
        return False


def rss(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon (the process's own memory), RssFile (mapped file pages: LMDB's map) in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


class Peer:
    """A server (or none) that fio can reach; a context manager that starts and stops it."""

    name = "peer"
    label = "peer"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def target(self, export: str = EXPORT) -> Target:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RawFile(Peer):
    def __init__(self, path: str, name: str = "raw-fio",
                 label: str = "fio on the raw file (io_uring)") -> None:
        self.path, self.name, self.label = path, name, label

    def target(self, export: str = EXPORT) -> Target:
        return Target(filename=self.path, engine="io_uring")


class Daemon(Peer):
    """A server run in the foreground of a child process, serving EXPORT on a unix socket."""

    def __init__(self, name: str, label: str, sock: str, log: str) -> None:
        self.name, self.label, self.sock, self.log = name, label, sock, log
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env(), start_new_session=True)
        STARTED.append(self.proc.pid)
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.sock) and nbd_answers(self.sock)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start: {tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        kill_pid(self.proc.pid)
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        self.proc = None

    def target(self, export: str = EXPORT) -> Target:
        return Target(uri=f"nbd+unix:///{export}?socket={self.sock}")


class NbdkitFile(Daemon):
    def __init__(self, path: str, sock: str, log: str) -> None:
        super().__init__("nbdkit-file", "nbdkit file plugin (C)", sock, log)
        self.path = path

    def argv(self) -> list[str]:
        return ["nbdkit", "-f", "--exit-with-parent", "--unix", self.sock, "-e", EXPORT,
                "file", self.path]


class Passthrough(Daemon):
    def __init__(self, path: str, mode: str, sock: str, log: str) -> None:
        super().__init__(f"passthrough-{mode}", f"Python passthrough plugin, {mode}", sock, log)
        self.path, self.mode = path, mode

    def argv(self) -> list[str]:
        return ["nbdkit", "-f", "--exit-with-parent", "--unix", self.sock, "-e", EXPORT,
                "python", PASSTHROUGH, f"file={self.path}", f"mode={self.mode}"]


QEMU_NBD_OPTS = ["--cache=writeback", "--aio=threads"]


class QemuNbd(Daemon):
    """qemu-nbd on a qcow2 image: page cache on (cache=writeback, the default), aio=threads,
    persistent so fio can connect many times, up to 8 clients."""

    def __init__(self, image: str, name: str, label: str, sock: str, log: str) -> None:
        super().__init__(name, label, sock, log)
        self.image = image

    def argv(self) -> list[str]:
        return ["qemu-nbd", "-f", "qcow2", "-k", self.sock, "-x", EXPORT, *QEMU_NBD_OPTS,
                "--persistent", "--shared=8", self.image]


class Qmp:
    """A minimal QMP client: greeting, qmp_capabilities, then execute()."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, cmd: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QemuStorageDaemon(Daemon):
    """qemu-storage-daemon: the qcow2 image exported over NBD, with a QMP monitor for live
    internal snapshots (blockdev-snapshot-internal-sync), the way a running VM takes them."""

    def __init__(self, image: str, sock: str, qmp_sock: str, log: str) -> None:
        super().__init__("qsd-qcow2", "qemu-storage-daemon, qcow2", sock, log)
        self.image, self.qmp_sock = image, qmp_sock
        self.qmp: Qmp | None = None

    def argv(self) -> list[str]:
        return ["qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=file0,filename={self.image},aio=threads,cache.direct=off",
                "--blockdev", "driver=qcow2,node-name=disk,file=file0",
                "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                "--export", f"type=nbd,id=exp0,node-name=disk,name={EXPORT},writable=on",
                "--chardev", f"socket,id=qmp0,path={self.qmp_sock},server=on,wait=off",
                "--monitor", "chardev=qmp0"]

    def start(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_sock)
        super().start(timeout)
        self.qmp = Qmp(self.qmp_sock)

    def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        super().stop()

    def snapshot(self, name: str) -> None:
        assert self.qmp is not None
        self.qmp.execute("blockdev-snapshot-internal-sync", device="disk", name=name)

    def delete_snapshot(self, name: str) -> None:
        assert self.qmp is not None
        self.qmp.execute("blockdev-snapshot-delete-internal-sync", device="disk", name=name)


class Snapdisk(Peer):
    """snapdisk serving a store (every volume an export), as `snapdisk serve` does."""

    def __init__(self, store: str, threads: str | None, name: str, label: str) -> None:
        self.store, self.threads, self.name, self.label = store, threads, name, label
        self.info: Any = None

    @property
    def pid(self) -> int | None:
        return self.info.pid if self.info else None

    def start(self, timeout: float = 60.0) -> None:
        from snapdisk import daemon as srv
        if self.info is not None and alive(self.info.pid):
            return
        self.info = srv.serve(self.store, timeout=timeout, threads=self.threads)
        STARTED.append(self.info.pid)

    def stop(self) -> None:
        from snapdisk import daemon as srv
        if self.info is None:
            return
        pid = self.info.pid
        if alive(pid):
            with contextlib.suppress(Exception):
                srv.stop(self.store, timeout=10)
        kill_pid(pid)
        self.info = None

    def target(self, export: str = EXPORT) -> Target:
        return Target(uri=self.info.uri(export))

    def call(self, op: str, **args: Any) -> Any:
        from snapdisk.control.client import Client
        with Client(self.info.control_socket, timeout=120) as c:
            return c.call(op, **args)

    def client(self) -> Any:
        from snapdisk.control.client import Client
        return Client(self.info.control_socket, timeout=120)


class Shared:
    """Peers that cannot run at once (two thread models of one snapdisk store): starting one
    stops the other."""

    def __init__(self) -> None:
        self.current: Peer | None = None

    def switch(self, peer: Peer) -> None:
        if self.current is peer:
            peer.start()
            return
        if self.current is not None:
            self.current.stop()
        self.current = peer
        peer.start()


def tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def leftovers() -> list[int]:
    """Pids started here that still run."""
    return [pid for pid in STARTED if alive(pid)]


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.splitlines()[0] if out else "unknown"
