"""Start, stop and query the server of a store: nbdkit running snapdisk's Python plugin.

    serve(store)                 nbdkit in the background; returns once both sockets answer
    serve(store, foreground=True)  replaces this process with nbdkit -f (systemd, containers)
    stop(store)                  over the control socket (flush, close LMDB, exit), then
                                 SIGTERM, then SIGKILL, each after a timeout
    status(store)                pid file, liveness and the server's own `status` op

The command line (nbdkit_command):

    nbdkit --unix STORE/nbd.sock | --ip-addr 127.0.0.1 --port PORT
           --pidfile STORE/server.pid --log=stderr [--foreground] [--verbose]
           python SNAPDISK/nbd_plugin.py store=STORE [log=STORE/server.log] listen=...

with PYTHONPATH naming the directory holding the snapdisk package and this interpreter's
site-packages: nbdkit embeds Debian's /usr/bin/python3 (3.11), which must import snapdisk, its
compiled core and cffi from our venv.  In the background nbdkit forks and sends stderr to
/dev/null, so the plugin sends it to STORE/server.log (log=); start-up errors are read back from
there, and errors before the fork from nbdkit's own stderr.

One server per store: a live pid file, or the store's flock held by anyone (a CLI command
working on the store directly), refuses a second serve.  Stale pid files and sockets left by a
killed server are removed (nbdkit removes neither).  TCP is for loopback only: the protocol has
no authentication or TLS here.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import signal
import site
import socket
import stat
import struct
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

from . import errors
from .control.client import Client

# nbdkit's thread model for the plugin (`serve --threads`); why the default: nbd_plugin's docstring.
THREAD_MODELS = ("serialized", "parallel")
DEFAULT_THREADS = "serialized"

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd_plugin.py")
NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
NBD_OPT_ABORT = 2


@dataclass
class ServerInfo:
    store: str
    pid: int
    listen: str  # "unix:PATH" or "tcp:HOST:PORT"
    nbd_socket: str | None  # the unix socket, None for TCP
    control_socket: str
    log: str | None

    def uri(self, export: str = "") -> str:
        return export_uri(self.listen, export)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paths(store: str) -> dict[str, str]:
    store = os.path.abspath(store)
    return {"store": store, "nbd_socket": os.path.join(store, "nbd.sock"),
            "control_socket": os.path.join(store, "control.sock"),
            "pidfile": os.path.join(store, "server.pid"), "log": os.path.join(store, "server.log"),
            "lock": os.path.join(store, "lock")}


def parse_listen(listen: str | None, store: str) -> tuple[str, str, int]:
    """("unix", path, 0) or ("tcp", host, port).  None means the store's nbd.sock."""
    if listen is None or listen == "unix":
        return "unix", paths(store)["nbd_socket"], 0
    kind, _, rest = listen.partition(":")
    if kind == "unix" and rest:
        return "unix", os.path.abspath(rest), 0
    if kind == "tcp":
        host, _, port_s = rest.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_s)
            addr = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            raise errors.InvalidArgument(
                f"invalid listen address {listen!r}: use tcp:127.0.0.1:PORT") from None
        if not addr.is_loopback:
            raise errors.InvalidArgument(
                f"refusing to listen on {host}: only loopback addresses are allowed (NBD here "
                "has no authentication or encryption; tunnel it, e.g. over ssh)")
        if not 0 < port < 65536:
            raise errors.InvalidArgument(f"invalid port {port} in {listen!r}")
        return "tcp", str(addr), port
    raise errors.InvalidArgument(f"invalid listen address {listen!r}: use unix:PATH or "
                                 "tcp:127.0.0.1:PORT")


def _listen_str(kind: str, where: str, port: int) -> str:
    if kind == "unix":
        return f"unix:{where}"
    return f"tcp:[{where}]:{port}" if ":" in where else f"tcp:{where}:{port}"


def export_uri(listen: str, export: str = "") -> str:
    """The NBD URI of an export: nbd+unix:///VOL@SNAP?socket=PATH or nbd://127.0.0.1:PORT/VOL."""
    kind, where, port = parse_listen(listen, "/")
    name = urllib.parse.quote(export, safe="@")
    if kind == "unix":
        return f"nbd+unix:///{name}?socket={where}"
    host = f"[{where}]" if ":" in where else where
    return f"nbd://{host}:{port}/{name}"


def python_path() -> list[str]:
    """Where nbdkit's embedded Python finds snapdisk and this venv's packages."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = [pkg_parent, *site.getsitepackages()]
    extra = os.environ.get("PYTHONPATH")
    if extra:
        out += extra.split(os.pathsep)
    return list(dict.fromkeys(p for p in out if p))


def nbdkit_command(store: str, listen: str | None = None, foreground: bool = False, *,
                   log: str | None = None, verbose: bool = False, exit_with_parent: bool = False,
                   nbdkit: str = "nbdkit", threads: str | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that serve a store."""
    p = paths(store)
    kind, where, port = parse_listen(listen, p["store"])
    argv = [nbdkit]
    argv += ["--unix", where] if kind == "unix" else ["--ip-addr", where, "--port", str(port)]
    # Errors to stderr, also in the background (where nbdkit's default is syslog): it is
    # STORE/server.log there (the plugin's log=), the journal under systemd.
    argv += ["--pidfile", p["pidfile"], "--log=stderr"]
    if foreground:
        argv.append("--foreground")
        if exit_with_parent:  # never in the background: the CLI that started it exits at once
            argv.append("--exit-with-parent")
    if verbose:
        argv.append("--verbose")
    argv += ["python", PLUGIN, f"store={p['store']}", f"listen={_listen_str(kind, where, port)}"]
    if log:
        argv.append(f"log={os.path.abspath(log)}")
    if threads:
        argv.append(f"threads={threads}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(python_path())
    env.pop("PYTHONHOME", None)  # a venv's would point nbdkit's python at the wrong stdlib
    return argv, env


# ---- liveness -----------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    """pid runs and is an nbdkit (a recycled pid is not ours).  A process that is exiting
    (its memory, hence its command line, already gone) counts as alive until it is a zombie:
    only then are its files, and so the store's flock, released."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X", b"x") and (not cmd or b"nbdkit" in cmd)


def _read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def running_pid(store: str) -> int | None:
    """The pid of the live server of store, if any."""
    pid = _read_pid(paths(store)["pidfile"])
    return pid if pid is not None and _alive(pid) else None


def _lock_free(store: str) -> bool:
    fd = os.open(paths(store)["lock"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the lock if taken


def _wait_lock_free(store: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if _lock_free(store):
            return True
    return False


def _remove_stale(store: str, listen_path: str | None = None) -> None:
    p = paths(store)
    for path in (p["pidfile"], p["nbd_socket"], p["control_socket"], listen_path):
        if path and os.path.lexists(path) and (path == p["pidfile"] or _is_socket(path)):
            os.unlink(path)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _nbd_answers(kind: str, where: str, port: int) -> bool:
    """The NBD listener answers: read the newstyle greeting, then end the handshake politely
    (NBD_OPT_ABORT, as `nbdinfo --can connect` would) so nbdkit logs no error."""
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr: Any = where
        else:
            s = socket.socket(socket.AF_INET6 if ":" in where else socket.AF_INET,
                              socket.SOCK_STREAM)
            addr = (where, port)
        with s:
            s.settimeout(2.0)
            s.connect(addr)
            hello = s.recv(18, socket.MSG_WAITALL)  # NBDMAGIC, IHAVEOPT, handshake flags
            if hello[:16] != NBD_MAGIC + IHAVEOPT:
                return False
            s.sendall(struct.pack(">I", 1) + IHAVEOPT + struct.pack(">II", NBD_OPT_ABORT, 0))
            s.recv(20, socket.MSG_WAITALL)  # the ACK (or nothing: either is fine)
            return True
    except OSError:
        return False


def _control_answers(path: str) -> bool:
    try:
        with Client(path, timeout=2.0):
            return True
    except errors.SnapdiskError:
        return False


def _tail(path: str, max_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL after timeout."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, wait):
            return


# ---- serve, stop, status ------------------------------------------------------------------

def serve(store: str, listen: str | None = None, foreground: bool = False, *,
          timeout: float = 30.0, verbose: bool = False, nbdkit: str = "nbdkit",
          threads: str | None = None) -> ServerInfo:
    """Serve every volume of store over NBD, with the control socket.

    Background (default): returns once the NBD listener and the control socket answer, or
    raises ServerError with nbdkit's error output.  foreground=True replaces this process with
    nbdkit (it does not return); stop it with SIGTERM or `stop`."""
    p = paths(store)
    store = p["store"]
    if not os.path.exists(os.path.join(store, "meta", "data.mdb")):
        raise errors.StoreNotFound(f"no snapdisk store in {store} (run `snapdisk init`)")
    kind, where, port = parse_listen(listen, store)
    pid = running_pid(store)
    if pid is not None:
        raise errors.StoreLocked(f"a snapdisk server is already serving {store} (pid {pid}); "
                                 "`snapdisk stop` it first")
    if not _lock_free(store) and not _wait_lock_free(store, 2.0):  # a server may be exiting
        raise errors.StoreLocked(f"{store} is in use by another process (a snapdisk command "
                                 "working on the store, or a server without a pid file)")
    if kind == "unix" and len(where.encode()) > 107:
        raise errors.InvalidArgument(f"socket path {where!r} is too long for a unix socket")
    _remove_stale(store, where if kind == "unix" else None)
    log = None if foreground else p["log"]
    argv, env = nbdkit_command(store, listen, foreground, log=log, verbose=verbose, nbdkit=nbdkit,
                               threads=threads)
    if foreground:
        os.execvpe(argv[0], argv, env)
    log_start = os.path.getsize(p["log"]) if os.path.exists(p["log"]) else 0
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        except FileNotFoundError:
            raise errors.ServerError(f"{nbdkit} not found: install nbdkit and "
                                     "nbdkit-plugin-python") from None
        try:
            rc = proc.wait(timeout)  # nbdkit's first process exits once it has forked
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = -1
        err.seek(0)
        early = err.read().decode(errors="replace").strip()
    if rc != 0:
        raise errors.ServerError(f"nbdkit failed to start (exit status {rc}): {early}")

    def since_start() -> str:
        try:
            with open(p["log"], "rb") as f:
                f.seek(log_start)
                return f.read()[-4000:].decode(errors="replace").strip()
        except OSError:
            return ""

    deadline = time.monotonic() + timeout
    while True:
        pid = _read_pid(p["pidfile"])
        if pid is not None and not _alive(pid):
            _remove_stale(store, where if kind == "unix" else None)
            raise errors.ServerError(f"the server exited while starting: {since_start()}")
        if (pid is not None and _control_answers(p["control_socket"])
                and _nbd_answers(kind, where, port)):
            break
        if time.monotonic() > deadline:
            if pid is not None:
                _kill(pid, 5.0)
            raise errors.ServerError(f"the server did not answer within {timeout}s: "
                                     f"{since_start()}")
        time.sleep(0.05)
    return ServerInfo(store, pid, _listen_str(kind, where, port),
                      where if kind == "unix" else None, p["control_socket"], log)


def stop(store: str, timeout: float = 30.0) -> int:
    """Stop the server of store: the control op `stop` (flush, close LMDB, exit); SIGTERM if
    it is not gone after timeout; SIGKILL 10 s later.  Returns its pid; NotRunning if none."""
    p = paths(store)
    pid = running_pid(store)
    if pid is None:
        _remove_stale(p["store"])
        raise errors.NotRunning(f"no snapdisk server is running for {p['store']}")
    try:
        with Client(p["control_socket"], timeout=min(timeout, 30.0)) as c:
            c.call("stop")
    except errors.SnapdiskError:
        pass  # not answering: signals below
    if not _wait_gone(pid, timeout):
        _kill(pid, min(10.0, timeout))
    if not _alive(pid):
        _remove_stale(p["store"])
    return pid


def status(store: str, timeout: float = 5.0) -> dict[str, Any]:
    """{"running": bool, "pid", "store", ...} plus, when it answers, the server's own status
    (uptime, sockets, connections per export)."""
    p = paths(store)
    pid = running_pid(store)
    out: dict[str, Any] = {"running": pid is not None, "pid": pid, "store": p["store"],
                           "control_socket": p["control_socket"], "pidfile": p["pidfile"],
                           "log": p["log"]}
    if pid is None:
        return out
    try:
        with Client(p["control_socket"], timeout=timeout) as c:
            out.update(c.call("status"))
    except errors.SnapdiskError as e:
        out["error"] = f"the server does not answer on its control socket: {e.message}"
    return out
