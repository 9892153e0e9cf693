"""The server process of one store, composed: what runs inside nbdkit, minus nbdkit.

    svc = Service(store, socket_path=STORE/nbd.sock, tcp="tcp:127.0.0.1:10809",
                  tls_psk=STORE/tls.psk, on_stop=nbdkit.shutdown)
    svc.start()          # in nbdkit's after_fork: pid file, Engine, control server, TCP
    h = svc.open_export("vm1@3", readonly=False)   # the plugin's open()
    svc.close()          # in nbdkit's cleanup, once every connection is gone

A `Service` builds and owns what the server process is made of: the `Engine` (the store: LMDB,
the pool, the flock on STORE/lock), the registry of NBD connections (snapdisk.connections), the
control server (STORE/control.sock), the TCP listener, the scheduler thread of snapshot
policies (scheduler.py), and a slot for what comes next (a keyring for encrypted volumes).
The nbdkit plugin (snapdisk.nbd_plugin) is a thin layer of callbacks over it.  Nothing here
imports nbdkit, so the composition can be built in a test without one.

TCP.  nbdkit 1.32 listens on one kind of socket per process (`--unix` and `--port` refuse to
be combined), so the store's server always listens on its unix socket (attach and every local
client use it), and `serve --listen tcp:HOST:PORT` adds a second nbdkit, started here as a
child (`--exit-with-parent`): the `nbd` plugin with `dynamic-export=true` forwarding each TCP
client to the unix socket under its own export name, with `--tls=require --tls-psk=STORE/tls.psk`
(TLS 1.3 with a pre-shared key: only who can read that owner-only file gets in; see
docs/security.md), or in plain text when the operator asked for that by name.  To the store's
server a TCP client is one more unix client: it is counted, refused and revoked like any
other.  The forwarder holds no data (every request waits for the store's server), so stopping
it is like a network drop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from . import daemon, errors
from .connections import ClientSockets, Connection, Connections
from .control.server import ControlServer
from .engine import Engine
from .exportspec import ExportSpec
from .listen import parse_listen
from .pidfile import pidfile_names, write_pidfile
from .scheduler import Clock, Scheduler

FORWARDER_READY_S = 10.0


def _log(msg: str) -> None:
    # stderr is nbdkit's: STORE/server.log in the background, the journal under systemd.
    sys.stderr.write(f"snapdisk: {msg}\n")
    sys.stderr.flush()


class Service:
    """One store's server: the Engine, the NBD connections, the control server, TCP."""

    def __init__(self, store: str, *, socket_path: str, tcp: str | None = None,
                 tls_psk: str | None = None, on_stop: Callable[[], None] | None = None,
                 clock: str | None = None):
        self.store = os.path.abspath(store)
        self.socket_path = socket_path  # the NBD unix socket (nbdkit's --unix)
        self.tcp = tcp  # "tcp:HOST:PORT": served by the forwarder; None: unix only
        self.tls_psk = tls_psk  # the PSK file the forwarder requires; None: plain text
        self.on_stop = on_stop  # the plugin's nbdkit.shutdown
        self.engine: Engine | None = None
        self.sockets = ClientSockets(socket_path)
        self.connections = Connections(on_revoke=self.sockets.disconnect)
        self.control: ControlServer | None = None
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.clock = clock  # tests: `serve --clock FILE`, the scheduler's time (scheduler.py)
        self.scheduler: Scheduler | None = None  # snapshot policies, run here
        self.keyring: Any = None  # next: the keys of encrypted volumes
        self.pidfile = daemon.paths(self.store)["pidfile"]
        self.tcp_pidfile = daemon.paths(self.store)["tcp_pidfile"]

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Record this process as the server, open the store, start the control server and
        the TCP forwarder.  Runs in nbdkit's after_fork (never before: nbdkit forks)."""
        write_pidfile(self.pidfile, os.getpid())
        self.engine = Engine.open(self.store)
        self.scheduler = Scheduler(self.engine, Clock(self.clock), self.connections)
        self.control = ControlServer(
            self.engine, daemon.paths(self.store)["control_socket"],
            connections=self.connections, info=self.info() | {"scheduler": self.scheduler.state},
            on_stop=self.stop)
        self.control.start()
        self.scheduler.start()
        if self.tcp:
            self._start_forwarder()
            self.control.info.update(tcp_pid=self.forwarder.pid if self.forwarder else None)
        _log(f"serving {self.store} (pid {os.getpid()})")

    def info(self) -> dict[str, Any]:
        """What the status op reports about the listeners."""
        return {"nbd_socket": self.socket_path, "listen": f"unix:{self.socket_path}",
                "tcp": self.tcp, "tls": (None if not self.tcp else
                                         "require" if self.tls_psk else "off (insecure)"),
                "tls_psk_file": self.tls_psk if self.tcp else None}

    def stop(self) -> None:
        """The control op `stop`: nbdkit's shutdown, then every NBD client's socket shut down
        (nbdkit 1.32 would wait for idle clients forever: see snapdisk.connections)."""
        if self.on_stop is not None:
            self.on_stop()
        self._stop_forwarder()
        self.sockets.disconnect_all()

    def close(self) -> None:
        """Once every connection is closed (nbdkit's cleanup): stop the control server (it
        waits for requests in progress), then flush and close the store; remove the socket
        and pid files, which nbdkit leaves behind."""
        if self.scheduler is not None:  # before the store closes under it
            self.scheduler.stop()
            self.scheduler = None
        if self.control is not None:
            self.control.close()
            self.control = None
        self._stop_forwarder()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            _log("store closed")
        with suppress(OSError):
            os.unlink(self.socket_path)
        if pidfile_names(self.pidfile, os.getpid()):
            with suppress(OSError):
                os.unlink(self.pidfile)

    # ---- TCP ----------------------------------------------------------------------------

    def forwarder_command(self) -> list[str]:
        _, host, port = parse_listen(self.tcp, self.socket_path)
        # --exit-with-parent: nbdkit ends when this process does.  It then waits for its idle
        # clients, though (nbdkit 1.32 does not end them), keeping the port: STORE/tcp.pid
        # (pid and start time) lets the next serve or stop end it (daemon._remove_stale).
        argv = [os.readlink("/proc/self/exe"),  # this process is an nbdkit
                "--foreground", "--exit-with-parent", "--log=stderr",
                "--ip-addr", host, "--port", str(port)]
        if self.tls_psk:
            argv += ["--tls=require", f"--tls-psk={self.tls_psk}"]
        return argv + ["nbd", f"socket={self.socket_path}", "dynamic-export=true"]

    def _start_forwarder(self) -> None:
        _, host, port = parse_listen(self.tcp, self.socket_path)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # a clear error, not a race
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as e:
                raise errors.ServerError(f"cannot listen on {self.tcp}: {e.strerror}") from None
        # stderr is ours (the log); nbdkit's exe is ours too, since this runs inside nbdkit.
        self.forwarder = subprocess.Popen(self.forwarder_command(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL)
        write_pidfile(self.tcp_pidfile, self.forwarder.pid)
        deadline = time.monotonic() + FORWARDER_READY_S
        while True:
            if self.forwarder.poll() is not None:
                raise errors.ServerError(f"the TCP listener on {self.tcp} exited at start "
                                         f"(status {self.forwarder.returncode})")
            with socket.socket(family, socket.SOCK_STREAM) as s, suppress(OSError):
                s.settimeout(1.0)
                s.connect((host, port))
                return
            if time.monotonic() > deadline:
                self._stop_forwarder()
                raise errors.ServerError(f"the TCP listener on {self.tcp} did not come up")
            time.sleep(0.02)

    def _stop_forwarder(self) -> None:
        p, self.forwarder = self.forwarder, None
        if p is None:
            return
        if pidfile_names(self.tcp_pidfile, p.pid):
            with suppress(OSError):
                os.unlink(self.tcp_pidfile)
        for sig, wait in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 5.0)):
            with suppress(ProcessLookupError):
                p.send_signal(sig)
            with suppress(subprocess.TimeoutExpired):
                p.wait(wait)
                return

    # ---- exports ------------------------------------------------------------------------

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise errors.ServerError("the store is not open (start() did not run or failed)")
        return self.engine

    def resolve(self, export: str) -> tuple[int, int | None, int]:
        """(volume id, snapshot id or None, size in bytes) of an export name."""
        e = self.require_engine()
        spec = ExportSpec.parse(export)
        vol = e.volume_id(spec.volume)
        if spec.snapshot is None:
            return vol, None, e.volume_size(vol)
        epoch = e.snapshot_id(spec.volume, spec.snapshot)
        return vol, epoch, e.snapshot_size(vol, epoch)

    def list_exports(self) -> list[tuple[str, str]]:
        # Read from the store at each call: volumes created or deleted while serving show up
        # or disappear for the next client.
        e = self.require_engine()
        out = []
        for v in e.list_volumes():
            out.append((v.name, f"volume, {v.size_bytes} bytes"))
            for s in e.list_snapshots(v.name, with_usage=False):
                out.append((f"{v.name}@{s.name}", f"snapshot {s.id} of {v.name} ({s.kind}), "
                                                  f"{s.size_bytes} bytes, read-only"))
        return out

    def default_export(self) -> str:
        names = [v.name for v in self.require_engine().list_volumes()]
        if len(names) != 1:
            raise errors.InvalidArgument(
                f"the store has {len(names)} volumes: name the export (VOLUME or "
                "VOLUME@SNAPSHOT)")
        return names[0]

    def open_export(self, export: str, readonly: bool) -> Connection:
        """A registered handle on export, its hot-path callables bound."""
        h = Connection(export, *self.resolve(export), readonly)
        self.connections.register(h)  # waits while a rollback or delete holds the volume
        try:
            if self.resolve(export)[:2] != (h.vol, h.epoch):  # deleted or re-made meanwhile
                raise errors.NotFound(f"export {export!r} went away while connecting")
            if self.require_engine().keys.locked(h.vol):  # nothing of it can be served
                raise errors.BadKey(f"export {export!r}: the volume is encrypted and locked "
                                    "(unlock it: snapdisk key unlock VOLUME)")
            if h.epoch is None:
                h.read, h.write = self.require_engine().live_io(h.vol)
            else:
                h.read = self.require_engine().snapshot_reader(h.vol, h.epoch)
            self.sockets.claim(h)
        except BaseException:
            self.connections.unregister(h)
            raise
        return h

    def close_export(self, h: Connection) -> None:
        self.connections.unregister(h)
        self.sockets.release(h)


def open_log(path: str) -> None:
    """Send this process's stderr to path (nbdkit sends it to /dev/null in the background)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 2)  # dup2 leaves fd 2 inheritable, as stderr should be
    os.close(fd)


__all__ = ["Service", "open_log"]
