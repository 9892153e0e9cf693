"""Start, stop and query the server of a store: nbdkit running snapdisk's Python plugin.

    serve(store)                 nbdkit in the background; returns once its sockets answer
    serve(store, foreground=True)  replaces this process with nbdkit -f (systemd, containers)
    serve(store, listen="tcp:127.0.0.1:10809")   also TCP, TLS with a pre-shared key required
    stop(store)                  over the control socket (flush, close LMDB, exit), then
                                 SIGTERM, then SIGKILL, each after a timeout
    status(store)                pid file, liveness and the server's own `status` op

The command line (nbdkit_command):

    nbdkit --unix STORE/nbd.sock --pidfile STORE/server.pid --log=stderr [--foreground]
           python SNAPDISK/nbd_plugin.py store=STORE listen=unix:STORE/nbd.sock
           [log=STORE/server.log] [tcp=tcp:HOST:PORT [tls-psk=STORE/tls.psk]]

with PYTHONPATH naming the directory holding the snapdisk package and this interpreter's
site-packages: nbdkit embeds Debian's /usr/bin/python3 (3.11), which must import snapdisk, its
compiled core and cffi from our venv.  In the background nbdkit forks and sends stderr to
/dev/null, so the plugin sends it to STORE/server.log (log=); start-up errors are read back from
there, and errors before the fork from nbdkit's own stderr.  The unix socket is always served;
TCP is added beside it by a second nbdkit that the server starts (snapdisk.service explains
why), and requires TLS with the pre-shared key in STORE/tls.psk (made owner-only at the first
TCP serve) unless plain text is asked for by name (docs/security.md).

One server per store: a live server in the pid file, or the store's flock held by anyone (a CLI
command working on the store directly), refuses a second serve.  The pid file holds the
server's pid and its start time (field 22 of /proc/PID/stat, written by the server itself):
a process is the server only if both match, never because of its name, so a stale pid file
naming an unrelated process is stale.  Stale pid files and sockets left by a killed server are
removed (nbdkit removes neither), and only from a store nobody holds.
"""

from __future__ import annotations

import fcntl
import os
import site
import stat
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from . import errors, startup_error
from .control.client import Client
from .listen import ensure_psk, export_uri, listen_str, nbd_answers, parse_listen
from .pidfile import alive as _alive
from .pidfile import kill_process as _kill
from .pidfile import pidfile_names, read_pidfile
from .pidfile import read_pid as _read_pid
from .pidfile import same_process as _same
from .pidfile import wait_gone as _wait_gone

# nbdkit's thread model for the plugin; why: nbd_plugin's docstring.  PARALLEL is refused.
THREAD_MODELS = ("serialized",)
DEFAULT_THREADS = "serialized"
UNSAFE_THREAD_MODELS = {
    "parallel": "refused: nbdkit 1.32's parallel thread model can abort the server when a "
                "client disconnects with pipelined writes in flight (an assertion in "
                "raw_send_socket), and it was slower for this plugin anyway (see "
                "benchmarks/report.md)"}

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd_plugin.py")


@dataclass
class ServerInfo:
    store: str
    pid: int
    listen: str  # "unix:PATH": the NBD unix socket, always served
    nbd_socket: str  # that socket's path
    control_socket: str
    log: str | None
    tcp: str | None = None  # "tcp:HOST:PORT" when TCP is served too
    tls_psk_file: str | None = None  # what a TCP client needs (None: plain text, insecure)

    def uri(self, export: str = "") -> str:
        """The export's URI on the unix socket."""
        return export_uri(self.listen, export)

    def tcp_uri(self, export: str = "") -> str | None:
        """The export's URI on TCP (nbds:// with the PSK file when TLS is on), if served."""
        return export_uri(self.tcp, export, self.tls_psk_file) if self.tcp else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paths(store: str) -> dict[str, str]:
    store = os.path.abspath(store)
    return {"store": store, "nbd_socket": os.path.join(store, "nbd.sock"),
            "control_socket": os.path.join(store, "control.sock"),
            "pidfile": os.path.join(store, "server.pid"), "log": os.path.join(store, "server.log"),
            "lock": os.path.join(store, "lock"), "tls_psk": os.path.join(store, "tls.psk"),
            "tcp_pidfile": os.path.join(store, "tcp.pid")}


def check_store(store: str) -> str:
    """store's absolute path if it is a snapdisk store this user may open: StoreNotFound if it
    is none, PermissionDenied if this user cannot look (EACCES is not absence)."""
    if not store:
        raise errors.InvalidArgument("the store path is empty: name a store directory")
    store = os.path.abspath(store)
    try:
        os.stat(os.path.join(store, "meta", "data.mdb"))
        os.stat(os.path.join(store, "pool.dat"))
    except PermissionError:
        try:
            owner = f" (owned by uid {os.stat(store).st_uid})"
        except OSError:
            owner = ""
        raise errors.PermissionDenied(f"permission denied: {store}{owner}: a store is its "
                                      "owner's and root's only") from None
    except OSError:
        raise errors.StoreNotFound(f"no snapdisk store in {store} (run `snapdisk init`)") \
            from None
    return store


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
                   nbdkit: str = "nbdkit", tls_psk: str | None = None,
                   clock: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that serve a store: its unix socket (listen=unix:PATH moves
    it), and TCP beside it with listen=tcp:HOST:PORT (TLS with tls_psk, else plain text)."""
    p = paths(store)
    kind, where, port = parse_listen(listen, p["nbd_socket"])
    sock = where if kind == "unix" else p["nbd_socket"]
    argv = [nbdkit, "--unix", sock]
    # Errors to stderr, also in the background (where nbdkit's default is syslog): it is
    # STORE/server.log there (the plugin's log=), the journal under systemd.
    argv += ["--pidfile", p["pidfile"], "--log=stderr"]
    if foreground:
        argv.append("--foreground")
        if exit_with_parent:  # never in the background: the CLI that started it exits at once
            argv.append("--exit-with-parent")
    if verbose:
        argv.append("--verbose")
    argv += ["python", PLUGIN, f"store={p['store']}", f"listen=unix:{sock}"]
    if kind == "tcp":
        argv.append(f"tcp={listen_str(kind, where, port)}")
        if tls_psk:
            argv.append(f"tls-psk={tls_psk}")
    if log:
        argv.append(f"log={os.path.abspath(log)}")
    if clock:  # tests: the scheduler's time from this file (scheduler.py)
        argv.append(f"clock={os.path.abspath(clock)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(python_path())
    env.pop("PYTHONHOME", None)  # a venv's would point nbdkit's python at the wrong stdlib
    return argv, env


def running_pid(store: str) -> int | None:
    """The pid of the live server of store, if any."""
    pidfile = paths(store)["pidfile"]
    pid = _read_pid(pidfile)
    return pid if pid is not None and pidfile_names(pidfile, pid) else None


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
    """What a dead server left: its pid file, sockets, and a TCP forwarder that outlived it
    (it waits for idle clients: see service.py), ended if STORE/tcp.pid names it exactly."""
    p = paths(store)
    fwd = _read_pid(p["tcp_pidfile"])
    if fwd is not None and pidfile_names(p["tcp_pidfile"], fwd):
        start = read_pidfile(p["tcp_pidfile"])
        _kill(fwd, 0.5, start[1] if start else None)
    for path in (p["pidfile"], p["tcp_pidfile"], p["nbd_socket"], p["control_socket"],
                 listen_path):
        if path and os.path.lexists(path) and (path in (p["pidfile"], p["tcp_pidfile"])
                                               or _is_socket(path)):
            os.unlink(path)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
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


# ---- serve, stop, status ------------------------------------------------------------------

def serve(store: str, listen: str | None = None, foreground: bool = False, *,
          timeout: float = 30.0, verbose: bool = False, nbdkit: str = "nbdkit",
          threads: str | None = None, insecure_plaintext_tcp: bool = False,
          clock: str | None = None) -> ServerInfo:
    """Serve every volume of store over NBD, with the control socket: on the unix socket, and
    with listen="tcp:127.0.0.1:PORT" on TCP too, where clients need TLS with the key in
    STORE/tls.psk (made now if missing) unless insecure_plaintext_tcp.

    Background (default): returns once the NBD listeners and the control socket answer, or
    raises ServerError with nbdkit's error output.  foreground=True replaces this process with
    nbdkit (it does not return); stop it with SIGTERM or `stop`."""
    store = check_store(store)
    p = paths(store)
    if threads in UNSAFE_THREAD_MODELS:
        raise errors.Unsupported(f"--threads {threads}: {UNSAFE_THREAD_MODELS[threads]}")
    if threads not in (None, *THREAD_MODELS):
        raise errors.InvalidArgument(f"threads={threads!r}: one of {', '.join(THREAD_MODELS)}")
    kind, where, port = parse_listen(listen, p["nbd_socket"])
    if insecure_plaintext_tcp and kind != "tcp":
        raise errors.InvalidArgument("--insecure-plaintext-tcp goes with --listen tcp:HOST:PORT")
    sock = where if kind == "unix" else p["nbd_socket"]
    pid = running_pid(store)
    if pid is not None:
        raise errors.StoreLocked(f"a snapdisk server is already serving {store} (pid {pid}); "
                                 "`snapdisk stop` it first")
    if not _lock_free(store) and not _wait_lock_free(store, 2.0):  # a server may be exiting
        raise errors.StoreLocked(f"{store} is in use by another process (a snapdisk command "
                                 "working on the store, or a server without a pid file)")
    if len(sock.encode()) > 107:
        raise errors.InvalidArgument(f"socket path {sock!r} is too long for a unix socket")
    psk = None
    if kind == "tcp" and not insecure_plaintext_tcp:
        psk = ensure_psk(p["tls_psk"], os.stat(store).st_uid)
    _remove_stale(store, sock)
    log = None if foreground else p["log"]
    argv, env = nbdkit_command(store, listen, foreground, log=log, verbose=verbose, nbdkit=nbdkit,
                               tls_psk=psk, clock=clock)
    if foreground:
        os.execvpe(argv[0], argv, env)
    log_start = os.path.getsize(p["log"]) if os.path.exists(p["log"]) else 0
    startup_error.clear(store)
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
        failed = startup_error.take(store)
        if failed is not None:
            raise failed
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
        # nbdkit writes its pid before the plugin's after_fork, which rewrites the file with
        # the start time: until then only liveness is known (the file is this start's).
        pid = _read_pid(p["pidfile"])
        if pid is not None and not _alive(pid):
            _remove_stale(store, sock)
            failed = startup_error.take(store)  # the plugin's own error (startup_error.py)
            if failed is not None:
                raise failed
            raise errors.ServerError(f"the server exited while starting: {since_start()}")
        if (pid is not None and running_pid(store) == pid
                and _control_answers(p["control_socket"]) and nbd_answers("unix", sock, 0)
                and (kind != "tcp" or nbd_answers(kind, where, port))):
            break
        if time.monotonic() > deadline:
            if pid is not None:
                _kill(pid, 5.0)
            raise errors.ServerError(f"the server did not answer within {timeout}s: "
                                     f"{since_start()}")
        time.sleep(0.05)
    return ServerInfo(store, pid, f"unix:{sock}", sock, p["control_socket"], log,
                      listen_str(kind, where, port) if kind == "tcp" else None, psk)


def stop(store: str, timeout: float = 30.0) -> int:
    """Stop the server of store: the control op `stop` (flush, close LMDB, exit); SIGTERM if
    it is not gone after timeout; SIGKILL 10 s later.  Returns its pid; NotRunning if none
    (then stale files are removed, if nobody holds the store)."""
    store = check_store(store)
    p = paths(store)
    rec = read_pidfile(p["pidfile"])
    pid = running_pid(store)
    if pid is None or rec is None:
        if _lock_free(store):
            _remove_stale(store)
        raise errors.NotRunning(f"no snapdisk server is running for {store}")
    start = rec[1]
    try:
        with Client(p["control_socket"], timeout=min(timeout, 30.0)) as c:
            c.call("stop")
    except errors.SnapdiskError:
        pass  # not answering: signals below
    if not _wait_gone(pid, timeout, start):
        _kill(pid, min(10.0, timeout), start)
    if not _same(pid, start) and _lock_free(store):
        _remove_stale(store)
    return pid


def status(store: str, timeout: float = 5.0) -> dict[str, Any]:
    """{"running": bool, "pid", "store", ...} plus, when it answers, the server's own status
    (uptime, sockets, connections per export), the store's `space` and its `warnings` (the
    ones `usage` gives: a pool or filesystem close to full)."""
    store = check_store(store)
    p = paths(store)
    pid = running_pid(store)
    out: dict[str, Any] = {"running": pid is not None, "pid": pid, "store": store,
                           "control_socket": p["control_socket"], "pidfile": p["pidfile"],
                           "log": p["log"]}
    if pid is None:
        return out
    from .capacity import add_space_warnings  # the C core: only once a server answers
    try:
        with Client(p["control_socket"], timeout=timeout) as c:
            out.update(c.call("status"))
            # Space, and warnings before writes fail with ENOSPC (capacity.space_warnings).
            st = add_space_warnings(c.call("usage").get("store") or {}, store)
            out["space"] = {k: st[k] for k in SPACE_FIELDS if k in st}
            out["warnings"] = st["warnings"]
    except errors.SnapdiskError as e:
        out["error"] = f"the server does not answer on its control socket: {e.message}"
    return out


SPACE_FIELDS = ("pool_bytes", "used_bytes", "free_bytes", "pool_file_bytes",
                "filesystem_free_bytes", "metadata_space_low")
